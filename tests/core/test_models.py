"""Opening models through the user's path: every architecture, shards, GGUF, bad input."""
import shutil

import pytest
import torch

from studio.core.errors import ModelLoadError, NotEnoughMemory
from studio.core.jobs import run
from studio.core.models import open_model_job
from tests.tiny_models import ARCHITECTURES, make_tiny_model


def open_(source):
    return run(open_model_job(source))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_opens_with_an_inventory(tiny_dirs, arch):
    handle = open_(tiny_dirs[arch])
    quantizable = handle.quantizable
    assert handle.text_ready
    assert quantizable, "block linears are quantizable"
    assert {i.block for i in quantizable} == {0, 1}
    roles = {i.role for i in quantizable}
    assert "down" in roles and ("qkv" in roles or {"q", "k", "v"} <= roles)
    kinds = {i.kind for i in handle.layers}
    assert "embedding" in kinds and handle.layers[-1].kind == "lm_head"
    for info in handle.layers:
        w = handle.weight(info.name) if info.kind != "embedding" else handle.module(info.name).weight
        assert tuple(w.shape) == info.shape
        assert info.params >= w.numel()
    # a forward pass works on the opened model
    ids = handle.tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    assert handle.model(ids).logits.shape[-1] == handle.model.config.vocab_size


def test_gpt2_conv1d_is_a_transposed_linear(tiny_dirs):
    handle = open_(tiny_dirs["gpt2"])
    info = handle.layer("transformer.h.0.attn.c_attn")
    assert (info.kind, info.role, info.shape) == ("conv1d", "qkv", (192, 64))
    module = handle.module(info.name)
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ handle.weight(info.name).T + module.bias, atol=1e-5)
    assert handle.layer("transformer.h.0.mlp.c_proj").role == "down"
    assert handle.layer("transformer.h.0.attn.c_proj").role == "o"


def test_tied_lm_head_is_marked_and_counted_once(tiny_dirs):
    handle = open_(tiny_dirs["llama"])
    head = handle.layer("lm_head")
    assert head.tied_to == "model.embed_tokens" and not head.quantizable
    params = sum(p.numel() for p in handle.model.parameters())  # parameters() dedups ties
    assert handle.param_count == params


def test_sharded_safetensors_folder(tmp_path, tiny_tokenizer_obj):
    from transformers import AutoModelForCausalLM

    single = make_tiny_model("qwen2", tmp_path / "single", tiny_tokenizer_obj)
    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    handle = open_(tmp_path / "sharded")
    for key, value in model.state_dict().items():
        assert torch.equal(handle.model.state_dict()[key], value)


def test_missing_path_and_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        open_(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model"):
        open_(tmp_path / "notes.txt")


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    config.save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        open_(tmp_path / "plain")
    config.architectures = ["BertForMaskedLM"]
    config.save_pretrained(tmp_path / "masked")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        open_(tmp_path / "masked")


def test_truncated_safetensors(tmp_path, tiny_dirs):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dirs["llama"], folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        open_(folder)
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        open_(folder)


def test_corrupt_config(tmp_path, tiny_dirs):
    folder = tmp_path / "badconfig"
    shutil.copytree(tiny_dirs["llama"], folder)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        open_(folder)


def test_missing_tokenizer_keeps_weights(tmp_path):
    folder = make_tiny_model("llama", tmp_path / "notok", tokenizer=None)
    handle = open_(folder)
    assert handle.tokenizer is None and not handle.text_ready
    assert any("no tokenizer" in note for note in handle.notes)
    assert handle.weight("model.layers.0.mlp.down_proj").shape == (64, 160)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="GGUF version 0"):
        open_(bad)


def test_refuses_a_model_larger_than_available_memory(tiny_dirs, monkeypatch):
    import psutil

    class Tiny:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(NotEnoughMemory) as info:
        open_(tiny_dirs["llama"])
    assert "GiB of memory" in str(info.value) and "available" in str(info.value)


def test_demo_model_opens_from_gguf_and_then_from_cache(demo_handle):
    handle = demo_handle
    assert handle.architecture == "LlamaForCausalLM"
    assert len(handle.quantizable) == 30 * 7
    assert handle.layer("lm_head").tied_to == "model.embed_tokens"
    assert any("grid" in note for note in handle.notes), "the Q4_1 grid is pointed out"
    from studio.core.gguf_fast import wait_for_cache

    wait_for_cache(handle.folder)   # (a first open writes its cache behind it: not timed here)
    cached = open_("demo")
    assert cached.folder == handle.folder and (cached.folder / "model.safetensors").is_file()
    assert cached.load_seconds < handle.load_seconds
    w = "model.layers.3.mlp.down_proj"
    assert torch.equal(cached.weight(w), handle.weight(w))


def test_truncated_gguf(tmp_path, demo_handle):
    from studio.core.models import demo_gguf_path

    data = demo_gguf_path().read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError):
        open_(bad)


def test_cancel_during_gguf_conversion_leaves_no_cache(tmp_path, monkeypatch, demo_handle):
    from studio.core.errors import Cancelled
    from studio.core.jobs import CancelToken

    monkeypatch.setenv("COMPRESSION_STUDIO_CACHE", str(tmp_path / "cache"))
    token = CancelToken()
    seen = []

    def on_progress(p):
        seen.append(p.message)
        if p.message.startswith("De-quantizing"):
            token.cancel()

    with pytest.raises(Cancelled):
        run(open_model_job("demo"), on_progress, token)
    assert any(m.startswith("De-quantizing") for m in seen)
    cache = tmp_path / "cache" / "gguf"
    leftovers = list(cache.iterdir()) if cache.exists() else []
    assert leftovers == [], leftovers
