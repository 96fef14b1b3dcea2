"""The embedding and lm_head as plan layers (issue 18): quantized, a tied matrix stored once,
saved and loaded, run on the kernels, and one size that equals what an export writes."""
import json

import pytest
import torch

from studio.cli import main
from studio.core.allocate import plan_size
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule, end_spec, with_ends
from studio.core.quant.coded import CodedEmbedding
from studio.core.quantize import quantize_job
from studio.core.variant import load_variant, save_variant

BODY = QuantSpec(4, 32)
HEAD = QuantSpec(8, -1, True)


def _variant(handle, rules, name="v"):
    return run(quantize_job(handle, Plan(BODY, rules), None, None, name))


def test_tied_head_quantized_once_and_run_as_its_codes(tiny_llama, tmp_path):
    variant = _variant(tiny_llama, (Rule("lm_head", HEAD),))
    qt = variant.qtensors["lm_head"]
    assert variant.qtensors["model.embed_tokens"] is qt and variant.shared == {
        "model.embed_tokens": "lm_head"}
    # a direct computation: the float model with the one de-quantized matrix on both sides
    import copy
    reference = copy.deepcopy(tiny_llama.model)
    for name, q in variant.unique_qtensors.items():
        reference.get_submodule(name).weight.data.copy_(q.dequantize())
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(variant.model(ids).logits, reference(ids).logits, atol=1e-5)
    # stored once: the size counts one matrix, and the folder holds its codes once
    size = plan_size(tiny_llama, Plan(BODY, (Rule("lm_head", HEAD),)))
    assert size.size_bytes == variant.size_bytes and size.quantized == len(variant.qtensors)
    folder = save_variant(variant, tmp_path / "v")
    from safetensors import safe_open
    with safe_open(folder / "quantized.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith("model.embed_tokens.")]
    loaded = load_variant(folder, tiny_llama)
    assert loaded.qtensors["model.embed_tokens"] is loaded.qtensors["lm_head"]
    assert isinstance(loaded.model.model.embed_tokens, CodedEmbedding)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, variant.model(ids).logits)
    assert loaded.size_breakdown == variant.size_breakdown


def test_untied_embedding_and_head_each_quantized(tiny_dirs):
    handle = run(open_model_job(tiny_dirs["qwen2"]))
    variant = _variant(handle, (Rule("lm_head", HEAD), Rule("model.embed_tokens", BODY)))
    assert variant.qtensors["lm_head"] is not variant.qtensors["model.embed_tokens"]
    assert not variant.shared
    ids = torch.tensor([[5, 9, 200]])
    rows = variant.model.model.embed_tokens(ids)[0]
    assert torch.equal(rows, variant.qtensors["model.embed_tokens"].dequantize()[ids[0]])
    assert plan_size(handle, variant.plan).size_bytes == variant.size_bytes


def test_gemma3_embedding_keeps_its_scale(family_dirs):
    handle = run(open_model_job(family_dirs["gemma3"]))
    variant = _variant(handle, (Rule("model.embed_tokens", HEAD),))
    emb = variant.model.model.embed_tokens
    ids = torch.tensor([[4, 7]])
    expected = variant.qtensors["model.embed_tokens"].dequantize()[ids[0]] * emb.embed_scale
    assert torch.allclose(emb(ids)[0], expected)


def test_end_words_and_plan_rules(tiny_llama):
    assert end_spec("keep") is None
    assert end_spec("w8") == QuantSpec(8, -1, True)
    assert end_spec("w4g32") == QuantSpec(4, 32)
    assert end_spec("w8", gguf_native=True).scale_dtype == "fp16"
    with pytest.raises(Exception, match="not a setting"):
        end_spec("q9")
    plan = with_ends(Plan(BODY), tiny_llama.layers, HEAD, BODY)
    # tied: the embedding is the head's matrix, so only the head gets a rule
    assert [r.pattern for r in plan.rules] == ["lm_head"]
    named = Plan(BODY, (Rule("lm_head", None),))
    assert with_ends(named, tiny_llama.layers, HEAD, None).rules == named.rules


def test_quantized_head_runs_on_the_int8_kernel(tiny_llama):
    from studio.core.kernels import kernel_model
    from studio.core.q4_native import unavailable

    variant = _variant(tiny_llama, (Rule("lm_head", HEAD),))
    model, choices = kernel_model(variant.model, variant.qtensors)
    kinds = {c.layer: c.kernel for c in choices}
    int8 = "int8pack" if unavailable() else "q8native g64"   # per-channel rows of 64 columns
    assert kinds["lm_head"] == int8 and kinds["model.embed_tokens"] == "coded rows"
    ids = torch.randint(0, 384, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, slow = model(ids).logits, variant.model(ids).logits
    assert (fast - slow).abs().max() < 0.05 * slow.abs().max()   # bf16 / int8 activations


def test_size_breakdown_equals_the_gguf_on_disk(tiny_dirs, tmp_path, capsys):
    """A GGUF-native variant (Q4_0 body, Q8_0 tied head) exports with no rounding: the
    breakdown's parts are the bytes of the file's tensors, the tied matrix once."""
    from gguf import GGUFReader

    out, export = tmp_path / "v", tmp_path / "gguf"
    assert main(["quantize", str(tiny_dirs["llama"]), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "--symmetric", "--gguf-native", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["export", str(out), "--format", "gguf", "--out", str(export), "--json"]) == 0
    capsys.readouterr()
    reader = GGUFReader(next(export.glob("*.gguf")))
    parts = {"quantized": 0, "embedding": 0, "float": 0}
    for tensor in reader.tensors:
        key = ("embedding" if tensor.name in ("token_embd.weight", "output.weight") else
               "quantized" if tensor.tensor_type.name.startswith("Q") else "float")
        parts[key] += int(tensor.n_bytes)
    assert "output.weight" not in {t.name for t in reader.tensors}   # tied: token_embd only
    assert parts == summary["size_breakdown"]
    assert sum(parts.values()) == summary["size_bytes"]


def test_capture_and_quantization_never_compute_logits(tiny_llama):
    """Activation capture and a quantization's error figures run the blocks only: on a
    262k-token vocabulary the head would be most of their time."""
    from studio.core.activations import activation_capture_job
    from studio.core.text import text_windows

    head = tiny_llama.model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda *args: calls.append(1))
    try:
        run(activation_capture_job(tiny_llama, None, windows=2, seqlen=32))
        windows = text_windows(tiny_llama.tokenizer, None, 32, 16, seed=0)[0]
        for method in ("rtn", "gptq"):
            run(quantize_job(tiny_llama, Plan(QuantSpec(4, 32, method=method)), windows,
                             "text", method))
        assert calls == []
        with torch.no_grad():   # the hook does see a forward that computes logits
            tiny_llama.model(input_ids=windows[:1])
        assert calls == [1]
    finally:
        hook.remove()
