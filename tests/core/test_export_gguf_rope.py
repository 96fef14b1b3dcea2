"""Llama 3.1-style rotary scaling in a GGUF export: written as rope_freqs (as llama.cpp's
converter does), which transformers' GGUF loader ignores, so the logits are verified in
llama.cpp itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.core.export import gguf_meta, llama_cpp
from studio.core.export.job import export_job
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec
from studio.core.quantize import quantize_job

# A short "original context" so the scaling changes most frequencies at test lengths.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def llama31(tmp_path_factory, tiny_tokenizer_obj):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, rope_parameters=LLAMA3_ROPE,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():   # sharp attention, so where each position is rotated matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    folder = tmp_path_factory.mktemp("llama31")
    model.save_pretrained(folder)
    tiny_tokenizer_obj.save_pretrained(folder)
    handle = run(open_model_job(folder))
    variant = run(quantize_job(handle, Plan(QuantSpec(4, 32, True, scale_dtype="fp16")),
                               None, None, "llama31 q4"))
    return handle, variant


def test_scaled_rope_is_written_as_rope_freqs_and_verified_in_llama_cpp(llama31, tmp_path):
    from gguf import GGUFReader

    if not llama_cpp.available():
        pytest.skip("cyllama is not installed")
    handle, variant = llama31
    result = run(export_job(variant, handle, "gguf", tmp_path / "out"))
    report = json.loads((Path(result.path) / "report.json").read_text())
    assert result.verified and report["logits_by"] == "llama.cpp"
    scale = variant.model(input_ids=torch.arange(3, 67)[None]).logits.abs().max().item()
    assert result.max_logit_diff < 0.03 * scale
    tensors = {t.name: t for t in GGUFReader(result.file).tensors}
    freqs = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    rotary = variant.model.model.rotary_emb
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).double() / 16))
    assert torch.allclose(default / freqs.double(), rotary.inv_freq.double(), rtol=1e-6)
    assert freqs.max() > 1   # the scaling is really there at these lengths


def test_transformers_reload_alone_would_compute_another_model(llama31, tmp_path):
    """Why llama.cpp must verify these files: the loader rebuilds an unscaled rope."""
    import transformers as tf

    handle, _ = llama31
    plain = tf.LlamaConfig(**{**handle.model.config.to_dict(),
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    unscaled = tf.AutoModelForCausalLM.from_config(plain)
    unscaled.load_state_dict(handle.model.state_dict())
    windows = torch.randint(3, 384, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = handle.model(input_ids=windows).logits
        got = unscaled(input_ids=windows).logits
    assert (got - want).abs().max() > 0.1 * want.abs().max()


def test_without_llama_cpp_a_scaled_rope_is_refused_before_any_work(llama31, tmp_path,
                                                                    monkeypatch):
    from studio.core.errors import StudioError

    handle, variant = llama31
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    with pytest.raises(StudioError, match="compression-studio\\[llama-cpp\\]"):
        run(export_job(variant, handle, "gguf", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert gguf_meta.config_problems(handle.model.config, "llama") == []
