"""A model built from tensors at hand (a GGUF's cached folder, a first open's de-quantized
tensors) is the model transformers' `from_pretrained` loads: every parameter, every buffer and
the logits, on every family the studio opens."""
import pytest
import torch

from studio.core.errors import ModelLoadError
from studio.core.model_build import folder_tensors, model_from_tensors, skeleton
from studio.core.models import load_model, read_config
from tests.tiny_models import FAMILIES


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_model_from_tensors_is_the_loaders_model(family_dirs, arch):
    folder = family_dirs[arch]
    config = read_config(folder)
    loaded = load_model(folder, config)
    built = model_from_tensors(config, folder_tensors(folder), arch)
    a, b = dict(loaded.named_parameters()), dict(built.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    buffers = dict(loaded.named_buffers())
    assert buffers.keys() == dict(built.named_buffers()).keys()
    for name, buffer in built.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    head, embedding = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    if head.weight is embedding.weight:   # a tied head stays tied (a quantizer sees one tensor)
        assert built.get_output_embeddings().weight is built.get_input_embeddings().weight
    assert not built.training and not any(p.requires_grad for p in built.parameters())
    ids = torch.randint(0, config.vocab_size, (1, 12))
    assert torch.equal(loaded(ids).logits, built(ids).logits)


def test_the_skeleton_counts_a_tied_head_once(tiny_dirs):
    config = read_config(tiny_dirs["llama"])
    meta = skeleton(config)
    assert all(p.is_meta for p in meta.parameters())
    loaded = load_model(tiny_dirs["llama"], config)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in loaded.parameters())


def test_tensors_that_do_not_fit_are_refused_by_name(tiny_dirs):
    config = read_config(tiny_dirs["llama"])
    tensors = folder_tensors(tiny_dirs["llama"])
    dropped = dict(tensors)
    dropped.pop("model.norm.weight")
    with pytest.raises(ModelLoadError, match="no tensor for model.norm.weight"):
        model_from_tensors(config, dropped, "x")
    with pytest.raises(ModelLoadError, match="no place for model.extra"):
        model_from_tensors(config, {**tensors, "model.extra": torch.zeros(2)}, "x")


def test_a_gguf_open_builds_from_its_tensors_and_defers_the_tokenizer(tiny_dirs, tmp_path,
                                                                      monkeypatch):
    """First open: the model takes the tensors just de-quantized (the folder, written behind on
    a thread, is not read back); cached open: the studio's folder without transformers' loader.
    A cached open does not parse the tokenizer: the first job that asks for it does, once."""
    from transformers import AutoTokenizer

    from studio.core import models
    from studio.core.export.base import ExportOptions
    from studio.core.export.gguf import GGUF
    from studio.core.jobs import run
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job

    handle = run(models.open_model_job(tiny_dirs["llama"]))
    variant = run(quantize_job(handle, Plan(QuantSpec(8, 32, True)), None, None, "built"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(dtype="f16"), None, tmp_path))
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_model", lambda *a: pytest.fail("transformers' loader"))
    parsed = []
    original = AutoTokenizer.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        parsed.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counted))
    monkeypatch.setattr(models, "folder_tensors", lambda f: pytest.fail("read back"))
    first = run(models.open_model_job(written.file))
    assert first.text_ready and first.tokenizer is not None
    assert len(parsed) == 1               # the conversion's own, also written to the folder
    monkeypatch.undo()
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_model", lambda *a: pytest.fail("transformers' loader"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counted))
    parsed.clear()
    cached = run(models.open_model_job(written.file))
    assert parsed == [] and cached.text_ready
    for a, b in zip(first.model.parameters(), cached.model.parameters()):
        assert torch.equal(a, b)
    ids = cached.tokenizer("def f(x): return x")["input_ids"]
    assert ids == first.tokenizer("def f(x): return x")["input_ids"]
    assert len(parsed) == 1
    assert cached.tokenizer is not None
    assert len(parsed) == 1               # once


def test_a_first_open_does_not_wait_for_its_cache(tiny_dirs, tmp_path, monkeypatch):
    """The tokenizer and the cached folder are made behind the open; a later open of the same
    file waits for them instead of de-quantizing again."""
    import threading

    from studio.core import gguf_fast, models
    from studio.core.export.base import ExportOptions
    from studio.core.export.gguf import GGUF
    from studio.core.jobs import run
    from studio.core.plan import Plan, QuantSpec
    from studio.core.quantize import quantize_job

    handle = run(models.open_model_job(tiny_dirs["llama"]))
    variant = run(quantize_job(handle, Plan(QuantSpec(8, 32, True)), None, None, "behind"))
    written = run(GGUF.write_job(variant, handle, ExportOptions(dtype="f16"), None, tmp_path))
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    release = threading.Event()
    make = gguf_fast.gguf_tokenizer
    monkeypatch.setattr(gguf_fast, "gguf_tokenizer",
                        lambda *a: release.wait(60) and make(*a))
    first = run(models.open_model_job(written.file))
    assert not (first.folder / "config.json").exists()       # still being made
    assert first.model(torch.tensor([[1, 2, 3]])).logits.shape[1] == 3
    release.set()
    monkeypatch.setattr(models, "check_gguf", lambda p: pytest.fail("de-quantized again"))
    again = run(models.open_model_job(written.file))
    assert (again.folder / "model.safetensors").is_file()
    assert again.tokenizer("x y")["input_ids"] == first.tokenizer("x y")["input_ids"]
