"""Weights kept as stored (streaming.py): the same figures as the in-memory model, a lazy open,
memory that grows by one block, and bad checkpoints refused before any work (issue 17)."""
import json
import shutil

import pytest
import torch

from studio.core import streaming
from studio.core.errors import ModelLoadError, NotEnoughMemory
from studio.core.evaluate import perplexity
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job
from studio.core.stats import weight_stats_job
from tests.tiny_models import FAMILIES, tiny_config


def both(folder):
    return run(open_model_job(folder, "memory")), run(open_model_job(folder, "stream"))


def windows(count=4, length=48, seed=0):
    return torch.randint(3, 300, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", FAMILIES)
def test_streamed_model_gives_the_in_memory_statistics_and_perplexity(family_dirs, arch):
    held, streamed = both(family_dirs[arch])
    assert streamed.streamed and not held.streamed
    assert streamed.layers == [l for l in streamed.layers]
    assert [(i.name, i.shape, i.tied_to) for i in streamed.layers] == \
        [(i.name, i.shape, i.tied_to) for i in held.layers]
    a, b = run(weight_stats_job(held)), run(weight_stats_job(streamed))
    for name, stats in a.layers.items():
        other = b.layers[name]
        assert stats.summary() == other.summary()
        assert (stats.heatmap == other.heatmap).all() and (stats.hist_counts ==
                                                           other.hist_counts).all()
    ids = windows()
    assert perplexity(held.model, ids) == perplexity(streamed.model, ids)


# (every method on every family gave identical codes too; these keep the suite short)
@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("gpt2", "rtn"), ("gemma2", "rtn"),
                                         ("qwen2", "awq")])
def test_streamed_quantization_gives_the_same_codes_and_perplexity(family_dirs, arch, method):
    held, streamed = both(family_dirs[arch])
    plan = Plan(QuantSpec(4, 32, False, method))
    ids = windows(16, 32)
    a = run(quantize_job(held, plan, ids, "test", "v"))
    b = run(quantize_job(streamed, plan, ids, "test", "v"))
    assert set(a.qtensors) == set(b.qtensors)
    for name, qt in a.qtensors.items():
        assert torch.equal(qt.codes, b.qtensors[name].codes)
        assert torch.equal(qt.scale, b.qtensors[name].scale)
        assert torch.equal(qt.zero, b.qtensors[name].zero)
    assert streamed.streamed and streaming.streams(b.model)
    assert perplexity(a.model, ids) == perplexity(b.model, ids)


def sharded(tmp_path, tiny_tokenizer_obj, layers=2, hidden=64, name="sharded"):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers, config.hidden_size = layers, hidden
    config.intermediate_size = 2 * hidden
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / name
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer_obj.save_pretrained(folder)
    return folder


def test_a_sharded_checkpoint_opens_reading_only_its_headers(tmp_path, tiny_tokenizer_obj):
    folder = sharded(tmp_path, tiny_tokenizer_obj)
    assert len(list(folder.glob("*.safetensors"))) > 2
    handle = run(open_model_job(folder, "stream"))
    assert handle.store.bytes_read == 0          # the inventory came from the headers
    assert all(p.is_meta for p in handle.model.parameters())
    assert len(handle.quantizable) == 2 * 7
    perplexity(handle.model, windows(1, 16))
    assert handle.store.bytes_read > 0           # ... and a forward reads the layers it runs


def test_memory_grows_with_one_block_not_the_model(tmp_path, tiny_tokenizer_obj):
    """The most read at once is the same for a 2- and an 8-block model of the same shapes."""
    peaks = {}
    for layers in (2, 8):
        folder = sharded(tmp_path, tiny_tokenizer_obj, layers, 64, f"depth{layers}")
        handle = run(open_model_job(folder, "stream"))
        streaming.reset_peak()
        perplexity(handle.model, windows(2, 32))
        forward = streaming.peak_read_bytes()
        streaming.reset_peak()
        run(quantize_job(handle, Plan(QuantSpec(4, 32, False, "gptq")), windows(16, 32), "t",
                         "v"))
        peaks[layers] = (forward, streaming.peak_read_bytes(), 4 * handle.param_count)
    assert peaks[2][:2] == peaks[8][:2]
    block = 4 * sum(i.params for i in run(open_model_job(folder, "stream")).layers
                    if i.block == 0)
    assert peaks[8][1] <= 2 * block + peaks[8][0] < peaks[8][2]


def test_a_streamed_forward_gives_freed_memory_back_after_each_block(family_dirs, tmp_path,
                                                                      monkeypatch):
    """glibc keeps a streamed forward's freed temporaries: the heap is trimmed after every
    block, in the base model and in a variant made from it (without it the 3B's evaluation
    grew ~9 MiB a block)."""
    from studio.core import memory
    from studio.core.variant import load_variant, save_variant

    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    _, streamed = both(family_dirs["llama"])
    blocks = streamed.model.config.num_hidden_layers
    variant = run(quantize_job(streamed, Plan(QuantSpec(4, 32)), None, None, "v"))
    lazy = load_variant(save_variant(variant, tmp_path / "v"), streamed)
    trims = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(1))
    for model in (streamed.model, lazy.model):
        trims.clear()
        with torch.no_grad():
            model(windows(1, 16))
        assert len(trims) == blocks


def test_a_missing_shard_or_absent_tensor_is_refused_before_work(tmp_path, tiny_tokenizer_obj):
    folder = sharded(tmp_path, tiny_tokenizer_obj)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    moved = tmp_path / "aside"
    moved.mkdir()
    shutil.move(folder / lost, moved / lost)
    for mode in ("stream", "memory"):
        with pytest.raises(ModelLoadError, match=lost):
            run(open_model_job(folder, mode))
    shutil.move(moved / lost, folder / lost)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = lost
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model.layers.9.mlp.up_proj.weight"):
        run(open_model_job(folder, "stream"))


def test_an_integer_checkpoint_is_refused_naming_its_dtype(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "int8"
    shutil.copytree(tiny_dirs["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="I8"):
        run(open_model_job(folder, "stream"))


def test_a_block_that_does_not_fit_is_refused_with_both_numbers(tiny_dirs, monkeypatch):
    from studio.core import memory

    monkeypatch.setattr(memory, "available", lambda: 1000)
    with pytest.raises(NotEnoughMemory) as info:
        run(open_model_job(tiny_dirs["llama"], "stream"))
    text = str(info.value)
    assert "one block" in text and "GiB" in text and "available" in text


def test_the_guard_offers_settings_that_fit(tiny_llama, monkeypatch):
    from studio.core import memory

    est = memory.estimate_job(tiny_llama, "quantize", method="gptq", windows=64, seqlen=512)
    assert est.added > 0 and est.offers
    with pytest.raises(NotEnoughMemory, match=r"at most \d+ calibration windows \(64 asked\)"):
        memory.guard_job(tiny_llama, "quantize", free=est.added - 1, method="gptq", windows=64,
                         seqlen=512)
    assert memory.guard(est, free=est.added) is est


def test_streamed_sensitivity_and_activations_match(tiny_dirs):
    import numpy as np

    from studio.core.activations import activation_capture_job
    from studio.core.sensitivity import sensitivity_job

    held, streamed = both(tiny_dirs["llama"])
    ids = windows(8, 32)
    a = run(sensitivity_job(held, ids, bits=(4,), group_sizes=(32,), kl_group=32))
    b = run(sensitivity_job(streamed, ids, bits=(4,), group_sizes=(32,), kl_group=32))
    assert np.array_equal(a.kl, b.kl) and np.array_equal(a.ppl, b.ppl)
    ca, cb = run(activation_capture_job(held)), run(activation_capture_job(streamed))
    assert np.array_equal(ca.stream_norm, cb.stream_norm)


# --- a streamed model's variant: codes written block by block, read lazily -------------------

def streamed_variant_made(handle, plan, ids, cache, blocks):
    """Run the quantize job, checking at every block's start that the earlier blocks' codes are
    already files of the staging folder (and that the job made exactly one file per block)."""
    from studio.core.jobs import Progress

    job = quantize_job(handle, plan, ids, "test", "v")
    seen = set()
    try:
        while True:
            p = next(job)
            if isinstance(p, Progress) and p.message.startswith("block "):
                index = int(p.message.split()[1].rstrip(":"))
                if index not in seen:
                    seen.add(index)
                    files = sorted(cache.glob("variant-codes/*/codes-*.safetensors"))
                    assert len(files) == index, (index, files)
    except StopIteration as stop:
        variant = stop.value
    assert len(list(cache.glob("variant-codes/*/codes-*.safetensors"))) == blocks
    return variant


def test_a_streamed_variant_is_written_block_by_block_and_loads_lazily(
        family_dirs, tmp_path, monkeypatch):
    from studio.core.evaluate import evaluate_job
    from studio.core.quant.coded import CodedLinear
    from studio.core.variant import load_variant, save_variant
    from studio.core.variant_stream import CodeStore, StoredCodes

    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(cache))
    held, streamed = both(family_dirs["llama"])
    plan = Plan(QuantSpec(4, 32, False, "gptq"))
    ids = windows(16, 32)
    a = run(quantize_job(held, plan, ids, "test", "v"))
    b = streamed_variant_made(streamed, plan, ids, cache, streamed.model.config.num_hidden_layers)
    assert isinstance(b.qtensors, CodeStore) and not isinstance(a.qtensors, CodeStore)
    assert list(a.qtensors) == list(b.qtensors)
    coded = [m for m in b.model.modules() if isinstance(m, CodedLinear)]
    assert coded and all(isinstance(m.qt, StoredCodes) for m in coded)   # nothing held
    assert b.bits_per_weight == a.bits_per_weight and b.size_bytes == a.size_bytes

    saved_a, saved_b = save_variant(a, tmp_path / "a"), save_variant(b, tmp_path / "b")
    assert not (saved_b / "quantized.safetensors").exists()
    assert len(list(saved_b.glob("codes-*.safetensors"))) == streamed.model.config.num_hidden_layers
    del b, coded   # the staging folder goes with the variant; the saved one stays whole
    import gc
    gc.collect()
    assert not list(cache.glob("variant-codes/*/*"))

    lazy = load_variant(saved_b, streamed)
    assert isinstance(lazy.qtensors, CodeStore)
    eager = load_variant(saved_b, held)      # the same folder onto the in-memory model
    reference = load_variant(saved_a, held)
    for name, qt in reference.qtensors.items():
        for other in (lazy.qtensors[name], eager.qtensors[name], a.qtensors[name]):
            assert torch.equal(qt.codes, other.codes) and torch.equal(qt.scale, other.scale)
            assert torch.equal(qt.zero, other.zero)
    ppl = {v: run(evaluate_job(m.model, None, held.tokenizer, None, 32, 3)).ppl
           for v, m in (("a", a), ("lazy", lazy), ("eager", eager), ("reference", reference))}
    assert len(set(ppl.values())) == 1, ppl


def test_a_streamed_variant_keeps_a_tied_head_once(tiny_dirs, tmp_path, monkeypatch):
    """The tied embedding holds the lm_head's codes: stored once in the block files, loaded
    as one pair, and the same logits as the in-memory variant."""
    from studio.core.plan import Rule
    from studio.core.variant import load_variant, save_variant

    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    held, streamed = both(tiny_dirs["llama"])   # tiny llama: tied
    plan = Plan(QuantSpec(4, 32), (Rule("lm_head", QuantSpec(8, -1, True)),))
    a = run(quantize_job(held, plan, None, None, "v"))
    b = run(quantize_job(streamed, plan, None, None, "v"))
    assert a.shared == b.shared == {"model.embed_tokens": "lm_head"}
    assert a.size_bytes == b.size_bytes
    meta = json.loads((save_variant(b, tmp_path / "b") / "variant.json").read_text())
    assert meta["layers"]["model.embed_tokens"]["codes_of"] == "lm_head"
    for handle in (streamed, held):
        loaded = load_variant(tmp_path / "b", handle)
        assert loaded.shared == {"model.embed_tokens": "lm_head"}
        ids = windows(2, 24)
        with torch.no_grad():
            assert torch.equal(loaded.model(ids).logits, a.model(ids).logits)


def test_a_streamed_variant_exports_the_same_files(family_dirs, tmp_path):
    from studio.core.export.base import ExportOptions
    from studio.core.export.job import export_job

    held, streamed = both(family_dirs["llama"])
    plan = Plan(QuantSpec(4, 32, True, "rtn"))
    a = run(quantize_job(held, plan, None, None, "v"))
    b = run(quantize_job(streamed, plan, None, None, "v"))
    for fmt, main_file in (("gguf", "v.gguf"), ("compressed-tensors", "model.safetensors")):
        for variant, handle, where in ((a, held, "held"), (b, streamed, "streamed")):
            run(export_job(variant, handle, fmt, tmp_path / f"{fmt}-{where}",
                           ExportOptions(dtype="f32")))
        files = [sorted((tmp_path / f"{fmt}-{w}").glob("*.gguf" if fmt == "gguf" else main_file))
                 for w in ("held", "streamed")]
        assert files[0] and [f.name for f in files[0]] == [f.name for f in files[1]]
        assert files[0][0].read_bytes() == files[1][0].read_bytes(), fmt


def test_a_crash_while_saving_leaves_no_variant_and_stale_staging_goes(
        family_dirs, tmp_path, monkeypatch):
    from studio.core import variant_stream
    from studio.core.variant import save_variant

    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(cache))
    _, streamed = both(family_dirs["llama"])
    b = run(quantize_job(streamed, Plan(QuantSpec(4, 32, False, "rtn")), None, None, "v"))

    def cut(self, folder):
        (folder / "codes-00000.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(variant_stream.CodeStore, "copy_into", cut)
    with pytest.raises(Exception, match="space"):
        save_variant(b, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    dead = cache / "variant-codes" / "999999999-abc"   # a process that is gone
    dead.mkdir()
    (dead / "codes-00000.safetensors").write_bytes(b"x")
    variant_stream.CodeStore.staging()
    assert not dead.exists()


def test_a_variant_naming_a_file_outside_its_folder_is_refused(family_dirs, tmp_path):
    from studio.core.errors import StudioError
    from studio.core.variant import load_variant, save_variant

    held, streamed = both(family_dirs["llama"])
    b = run(quantize_job(streamed, Plan(QuantSpec(4, 32, False, "rtn")), None, None, "v"))
    folder = save_variant(b, tmp_path / "v")
    meta = json.loads((folder / "variant.json").read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["file"] = "../elsewhere.safetensors"
    (folder / "variant.json").write_text(json.dumps(meta))
    with pytest.raises(StudioError, match="names the file"):
        load_variant(folder, streamed)
    meta["layers"][first]["file"] = "codes-00099.safetensors"
    (folder / "variant.json").write_text(json.dumps(meta))
    for handle in (streamed, held):
        with pytest.raises(StudioError, match="codes-00099.safetensors is missing"):
            load_variant(folder, handle)


def test_cli_quantizes_evaluates_and_refuses_to_bench_a_streamed_model(
        tiny_dirs, tmp_path, monkeypatch, capsys):
    from studio.cli import main
    from studio.core import bench

    monkeypatch.setenv("COMPRESSION_STUDIO_WEIGHTS", "stream")   # (restored after the test)
    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "variant"
    assert main(["--weights", "stream", "quantize", str(tiny_dirs["llama"]), "--method", "rtn",
                 "--bits", "4", "--group-size", "32", "--out", str(out), "--json"]) == 0
    assert list(out.glob("codes-*.safetensors"))
    capsys.readouterr()
    assert main(["--weights", "stream", "eval", str(out), "--windows", "2", "--seqlen", "32",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1
    monkeypatch.setattr(bench, "bench_job", lambda *a, **k: pytest.fail("work started"))
    for model in (out, tiny_dirs["llama"]):
        assert main(["--weights", "stream", "bench", str(model)]) == 2
        err = capsys.readouterr().err
        assert "streamed" in err and "--format gguf" in err and "--weights memory" in err
