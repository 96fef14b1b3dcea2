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
