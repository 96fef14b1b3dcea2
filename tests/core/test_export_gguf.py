"""The GGUF exporter: codes packed by hand into the type that holds them, the q/k permutation,
metadata and tokenizer carried over, refusals before any work, and the round trip through
transformers' GGUF loader (and llama.cpp, when cyllama is installed)."""
import numpy as np
import pytest
import torch

from studio.core import metrics
from studio.core.errors import StudioError
from studio.core.export import gguf_meta, gguf_pack, gguf_vocab
from studio.core.export.base import ExportOptions
from studio.core.export.gguf import GGUF, source_reader
from studio.core.export.gguf_types import TYPES, exact_type
from studio.core.export.job import export_job
from studio.core.jobs import run
from studio.core.layers import get_module
from studio.core.models import open_model_job
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.quant.grid import QTensor, quantize_codes, quantize_rtn
from studio.core.quantize import quantize_job


def quantized(handle, plan, name="tiny gguf"):
    return run(quantize_job(handle, plan, None, None, name))


def with_fp16_scales(variant, handle):
    """The variant re-quantized with its scales rounded to fp16 (codes re-derived from the base
    weights), as a GGUF-native plan makes them: every mapping is then exact."""
    made = {}   # a tied pair quantized once stays one QTensor
    for name, qt in list(variant.qtensors.items()):
        if id(qt) not in made:
            scale = qt.scale.half().float()
            codes = quantize_codes(handle.weight(name), scale, qt.zero, qt.bits, qt.group_size)
            made[id(qt)] = QTensor(codes, scale, qt.zero, qt.bits, qt.group_size)
        variant.qtensors[name] = made[id(qt)]
        get_module(variant.model, name).qt = made[id(qt)]
    return variant


def read(path):
    from gguf import GGUFReader
    return GGUFReader(path)


def tensor_types(path_or_reader):
    reader = read(path_or_reader) if not hasattr(path_or_reader, "tensors") else path_or_reader
    return {t.name: t.tensor_type.name for t in reader.tensors}


def dequantized(path_or_reader, name):
    from gguf.quants import dequantize
    reader = read(path_or_reader) if not hasattr(path_or_reader, "tensors") else path_or_reader
    t = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))


@pytest.fixture(scope="module")
def handles(tiny_dirs):
    return {arch: run(open_model_job(tiny_dirs[arch])) for arch in ("llama", "qwen2", "opt")}


# --- packing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,sym,asym4", [
    (4, 32, True, "q5_0"), (4, 64, False, "q5_0"), (4, 32, False, "q4_1"), (3, 32, False, "q5_0"),
    (2, 128, True, "q5_0"), (5, 32, True, "q5_0"), (5, 128, False, "q5_0"),
    (6, -1, False, "q5_0"), (7, 64, True, "q5_0"), (8, 32, True, "q5_0")])
def test_packed_codes_read_back_as_the_variant_weights(bits, group, sym, asym4):
    torch.manual_seed(bits)
    w = torch.randn(48, 160) * 0.05                         # 160 = 128 + a ragged 32 group
    qt = quantize_rtn(w, QuantSpec(bits, group, sym))
    qt = QTensor(qt.codes, qt.scale.half().float(), qt.zero, bits, qt.group_size)
    gtype = exact_type(bits, sym, asym4)
    assert gguf_pack.codes_fit(qt, gtype)
    packed = gguf_pack.pack(qt, gtype)
    assert packed.shape == (48, 160 // 32 * gtype.block_bytes)
    got, expected = gguf_pack.dequantize(packed, gtype.name), qt.dequantize()
    if gtype.affine:   # Q4_1 keeps u and stores m = -d*z as an fp16 value
        steps = qt.scale.repeat_interleave(qt.group_size, 1)[:, :160]
        assert ((got - expected).abs() <= 0.01 * steps).all()
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, False), (5, True), (6, False)])
def test_measured_weights_are_what_gguf_reads_back_when_scales_round(bits, sym):
    """The preflight measures exact-type layers without packing (fp16(s) * (u - z)); that must
    be, bit for bit, what gguf reads from the packed bytes when the scales are not fp16."""
    from studio.core.export.gguf_tensors import Choice, stored_weights

    torch.manual_seed(bits)
    qt = quantize_rtn(torch.randn(32, 128) * 0.05, QuantSpec(bits, 32, sym))
    assert not gguf_pack.scales_are_fp16(qt)
    gtype = exact_type(bits, sym)
    measured = stored_weights(qt, Choice(gtype.name, "codes"))
    assert torch.equal(measured, gguf_pack.dequantize(gguf_pack.pack(qt, gtype), gtype.name))
    assert not torch.equal(measured, qt.dequantize())


def test_nibble_and_high_bit_order_follow_ggml():
    """Byte j holds element j (low nibble) and element j + 16 (high); qh bit j is bit 4 of
    element j. Built by hand from codes 0..31 of one 5-bit symmetric block."""
    codes = torch.arange(32, dtype=torch.uint8)[None]
    qt = QTensor(codes, torch.ones(1, 1), torch.full((1, 1), 16.0), 5, 32)
    block = gguf_pack.pack(qt, TYPES["Q5_0"])[0]
    assert block[:2].view(np.float16)[0] == 1.0
    assert block[2:6].view("<u4")[0] == 0xFFFF0000                  # elements 16..31 have bit 4
    assert list(block[6:]) == [(j & 15) | ((j & 15) << 4) for j in range(16)]


def test_llama_row_order_is_llama_cpps_permute_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    def llama_cpp_permute(w, n_head):   # convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
                .reshape(w.shape)

    w = np.random.default_rng(0).normal(size=(192, 8))      # SmolLM2's K: 3 KV heads of 64
    order = gguf_pack.llama_row_order(192, 3)
    assert np.array_equal(w[order], llama_cpp_permute(w, 3))
    assert not np.array_equal(w[order], llama_cpp_permute(w, 1))     # a wrong head count
    assert not np.array_equal(w[order], w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(w[order], 9, 3), w)


# --- round trips through transformers' GGUF loader -------------------------------------------

def test_llama_gqa_symmetric_4bit_is_q4_0_exact_and_round_trips(handles, tmp_path):
    handle = handles["llama"]                # 4 heads, 2 KV heads: K is permuted by 2
    variant = with_fp16_scales(quantized(handle, Plan(QuantSpec(4, 32, True))), handle)
    preflight = GGUF.preflight(variant, handle, ExportOptions())
    assert not preflight.problems and all(t.exact for t in preflight.targets)
    assert {t.stored_as for t in preflight.targets} == {"Q4_0"}
    # Floats in F32: with every weight exact, the logits may differ by float op order only.
    result = run(export_job(variant, handle, "gguf", tmp_path / "out", ExportOptions(dtype="f32")))
    assert result.verified and result.tokenizer_equal
    assert result.file.endswith("tiny_gguf.gguf")
    assert all(layer["max_weight_diff"] == 0.0 for layer in result.layers)
    assert result.max_logit_diff < 1e-5
    types = tensor_types(result.file)
    assert types["blk.0.attn_k.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "F32" and "output.weight" not in types   # tied
    # The file holds K in llama.cpp's row order, not Hugging Face's.
    k = variant.qtensors["model.layers.0.self_attn.k_proj"].dequantize()
    written = dequantized(result.file, "blk.0.attn_k.weight")
    assert torch.equal(written, k[torch.from_numpy(gguf_pack.llama_row_order(32, 2))])
    assert not torch.equal(written, k)
    assert result.bits_per_weight_on_disk == pytest.approx(4.5)     # 18 bytes per 32 weights


@pytest.mark.parametrize("asym4,stored,exact", [("q5_0", "Q5_0", True), ("q4_1", "Q4_1", False)])
def test_qwen2_asymmetric_4bit_as_q5_0_exact_or_q4_1_smaller(handles, tmp_path, asym4, stored,
                                                             exact):
    handle = handles["qwen2"]
    variant = with_fp16_scales(quantized(handle, Plan(QuantSpec(4, 64, False))), handle)
    options = ExportOptions(gguf_asym4=asym4)
    preflight = GGUF.preflight(variant, handle, options)
    assert {t.stored_as for t in preflight.targets} == {stored}
    assert all(t.exact == exact for t in preflight.targets)
    if not exact:    # measured on what is written: Q4_1's fp16 offset, a small fraction of a step
        assert all(0 < t.error < 1e-5 for t in preflight.targets)
    result = run(export_job(variant, handle, "gguf", tmp_path / "out", options))
    assert result.verified and result.tokenizer_equal
    assert set(tensor_types(result.file)[f"blk.{b}.{r}.weight"]
               for b in (0, 1) for r in ("attn_q", "ffn_down")) == {stored}
    assert "output.weight" in tensor_types(result.file)              # qwen2 here is untied
    assert result.max_logit_diff < (2e-3 if exact else 1e-2)      # F16 embeddings either way
    if exact:
        assert all(layer["max_weight_diff"] == 0.0 for layer in result.layers)


def test_mixed_plan_each_tensor_in_the_type_the_preflight_said(handles, tmp_path):
    handle = handles["llama"]
    plan = Plan(QuantSpec(4, 32, True), rules=(
        Rule(r".*k_proj", QuantSpec(3, 64, False), regex=True),          # Q4_0
        Rule(r".*v_proj", QuantSpec(5, 32, True), regex=True),           # Q5_0
        Rule(r".*o_proj", QuantSpec(6, -1, False), regex=True),          # Q8_0
        Rule(r".*gate_proj", QuantSpec(4, 32, False), regex=True),       # Q5_0
        Rule(r".*up_proj", QuantSpec(8, 32, True), regex=True),          # Q8_0
        Rule(r".*down_proj", QuantSpec(5, 128, False), regex=True),      # Q8_0, ragged 160
        Rule("lm_head", QuantSpec(8, -1, True)),                         # untied output.weight
    ))
    variant = with_fp16_scales(quantized(handle, plan), handle)
    preflight = GGUF.preflight(variant, handle, ExportOptions())
    assert not preflight.problems and all(t.exact for t in preflight.targets)
    said = {t.name: t.stored_as for t in preflight.targets}
    assert said["model.layers.0.self_attn.k_proj"] == "Q4_0"
    assert said["model.layers.1.self_attn.v_proj"] == "Q5_0"
    assert said["model.layers.0.mlp.down_proj"] == "Q8_0" and said["lm_head"] == "Q8_0"
    result = run(export_job(variant, handle, "gguf", tmp_path / "out"))
    assert result.verified and result.tokenizer_equal
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
             "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    types = tensor_types(result.file)
    for layer, stored in said.items():
        if layer in ("lm_head", "model.embed_tokens"):
            continue
        block, rest = layer.split(".")[2], ".".join(layer.split(".")[3:])
        assert types[f"blk.{block}.{names[rest]}.weight"] == stored, layer
    # tied and quantized once: token_embd holds the one matrix, with no output.weight
    assert types["token_embd.weight"] == said["lm_head"] and "output.weight" not in types
    assert all(layer["max_weight_diff"] == 0.0 for layer in result.layers)


# --- what no GGUF type holds -----------------------------------------------------------------

def test_8bit_asymmetric_is_refused_or_written_as_the_nearest_q8_0(handles, tmp_path):
    handle = handles["llama"]
    variant = quantized(handle, Plan(QuantSpec(4, 32, True), rules=(
        Rule(r".*mlp\.up_proj", QuantSpec(8, 32, False), regex=True),)))
    with pytest.raises(StudioError, match=r"8-bit asymmetric codes fit no GGUF type in "
                                          r"model\.layers\.0\.mlp\.up_proj, "
                                          r"model\.layers\.1\.mlp\.up_proj.*nearest type is Q8_0"):
        run(export_job(variant, handle, "gguf", tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    options = ExportOptions(inexact="nearest")
    preflight = GGUF.preflight(variant, handle, options)
    up = [t for t in preflight.targets if t.name.endswith("up_proj")]
    assert all(t.stored_as == "Q8_0" and not t.exact and 0 < t.error < 1e-3 for t in up)
    result = run(export_job(variant, handle, "gguf", tmp_path / "nearest", options))
    assert result.verified
    assert tensor_types(result.file)["blk.1.ffn_up.weight"] == "Q8_0"
    layer = next(x for x in result.layers if x["name"] == "model.layers.1.mlp.up_proj")
    assert not layer["exact"] and 0 < layer["relative_error"] <= 1.5 * up[1].error


def test_rows_that_are_not_whole_blocks_are_refused_or_stored_as_floats(tmp_path,
                                                                       tiny_tokenizer_obj):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=144, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    folder = tmp_path / "llama144"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer_obj.save_pretrained(folder)
    handle = run(open_model_job(folder))
    variant = quantized(handle, Plan(QuantSpec(4, 32, True)))   # down_proj rows: 144 = 4.5 blocks
    refused = GGUF.preflight(variant, handle, ExportOptions())
    assert len(refused.problems) == 1
    assert "Rows of 144 weights are not whole 32-weight blocks in model.layers.0.mlp.down_proj" \
        in refused.problems[0] and "F16" in refused.problems[0]
    nearest = GGUF.preflight(variant, handle, ExportOptions(inexact="nearest"))
    down = next(t for t in nearest.targets if t.name.endswith("down_proj"))
    assert down.stored_as == "F16" and not down.exact and 0 < down.error < 1e-6
    f32 = GGUF.preflight(variant, handle, ExportOptions(dtype="f32"))  # exact as F32: no refusal
    assert not f32.problems
    assert next(t for t in f32.targets if t.name.endswith("down_proj")).stored_as == "F32"
    written = run(GGUF.write_job(variant, handle, ExportOptions(inexact="nearest"), nearest,
                                 tmp_path))
    assert tensor_types(written.file)["blk.0.ffn_down.weight"] == "F16"
    assert tensor_types(written.file)["blk.0.ffn_up.weight"] == "Q4_0"


@pytest.mark.parametrize("arch", ["opt", "gemma", "gpt2"])
def test_architectures_without_a_verifiable_gguf_are_refused_before_any_work(tiny_dirs, tmp_path,
                                                                           arch):
    handle = run(open_model_job(tiny_dirs[arch]))
    variant = quantized(handle, Plan(QuantSpec(4, 32, True)))
    with pytest.raises(StudioError, match=f"A {arch} model has no GGUF form"):
        run(export_job(variant, handle, "gguf", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_configs_the_gguf_loader_would_rebuild_differently_are_refused():
    import transformers as tf

    from tests.tiny_models import tiny_config

    assert gguf_meta.config_problems(tiny_config("llama"), "llama") == []
    extra = tiny_config("llama")
    extra.is_llama_config = True                  # SmolLM2-style extra keys change nothing
    assert gguf_meta.config_problems(extra, "llama") == []
    biased = tiny_config("llama")
    biased.attention_bias = True                   # the loader would drop the q/k/v biases
    assert "attention_bias=True" in gguf_meta.config_problems(biased, "llama")[0]
    scaled = tiny_config("llama")
    scaled.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert "rope_parameters" in gguf_meta.config_problems(scaled, "llama")[0]
    qwen = tiny_config("qwen2")                    # sliding-window settings no layer uses
    qwen.max_window_layers = 21
    assert gguf_meta.config_problems(qwen, "qwen2") == []
    gemma = tf.Gemma2Config(head_dim=128, query_pre_attn_scalar=144)   # 27B-style scaling
    assert any("1/sqrt(144)" in p for p in gguf_meta.config_problems(gemma, "gemma2"))


# --- GGUF sources (Gemma 2 folders: test_export_gguf_vocab.py) ----------------------------------------------------------------

def test_a_gguf_source_keeps_its_keys_tensor_order_and_tokenizer(handles, tmp_path):
    llama = handles["llama"]
    first = run(GGUF.write_job(quantized(llama, Plan(QuantSpec(8, 32, True))), llama,
                               ExportOptions(), None, tmp_path))
    source = run(open_model_job(first.file))          # now a GGUF source, like the demo
    variant = quantized(source, Plan(QuantSpec(4, 32, False)), name="second")
    result = run(export_job(variant, source, "gguf", tmp_path / "second",
                            ExportOptions(dtype="bf16")))
    assert result.verified and result.tokenizer_equal
    before, after = read(first.file), read(result.file)
    assert [t.name for t in after.tensors] == [t.name for t in before.tensors]
    assert set(after.fields) == set(before.fields)
    for key, field in before.fields.items():
        if not key.startswith("GGUF.") and key != "general.file_type":
            assert after.fields[key].contents() == field.contents(), key
    assert after.get_field("general.file_type").contents() == 8              # MOSTLY_Q5_0
    assert tensor_types(result.file)["token_embd.weight"] == "BF16"


# --- pre-tokenizer names ---------------------------------------------------------------------

def test_pre_tokenizer_named_from_the_tokenizer_structure(handles):
    assert gguf_vocab.pre_tokenizer(handles["llama"].tokenizer) == (
        "gpt-2", "from the tokenizer's pre-tokenizer steps")
    # transformers loads the qwen2 folder's tokenizer as Qwen2Tokenizer, with Qwen2's split
    assert gguf_vocab.pre_tokenizer(handles["qwen2"].tokenizer)[0] == "qwen2"
    assert gguf_vocab.pre_from_structure({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "use_regex": True}]}) is None    # no llama.cpp name: say so


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """SmolLM2's Hugging Face tokenizer rebuilt from the demo GGUF's vocabulary and merges with
    SmolLM's own pre-tokenizer (digits split, then GPT-2's byte-level regex)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from studio.core.models import demo_available, demo_gguf_path

    if not demo_available():
        pytest.skip("demo model not installed")
    reader = source_reader(demo_gguf_path())   # parsed once, for the export tests too
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    merges = [tuple(m.split(" ")) for m in reader.get_field("tokenizer.ggml.merges").contents()]
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == 3])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_pre_tokenizer_checksum_names_smollm2_as_llama_cpp_does(smollm_tokenizer):
    assert gguf_vocab.pre_tokenizer(smollm_tokenizer) == (
        "smollm", "llama.cpp's checksum of the tokenizer")


# --- llama.cpp itself ------------------------------------------------------------------------

def test_llama_cpp_runs_the_export_close_to_the_variant(handles, tmp_path):
    from studio.core.export import llama_cpp
    from studio.core.quant.coded import expanded

    if not llama_cpp.available():
        pytest.skip("cyllama is not installed")
    handle = handles["llama"]
    variant = with_fp16_scales(quantized(handle, Plan(QuantSpec(4, 32, True))), handle)
    written = run(GGUF.write_job(variant, handle, ExportOptions(), None, tmp_path))
    windows = torch.randint(3, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    got = llama_cpp.logits(written.file, windows)
    with expanded(variant.model), torch.inference_mode():
        ref = variant.model(input_ids=windows).logits
    # llama.cpp quantizes activations to 8 bits in its dot products: close, not equal. A wrong
    # q/k permutation or metadata key would be far off.
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    ppl, tokens = run(llama_cpp.perplexity_job(written.file, windows))
    assert tokens == 62 and 1 < ppl < 2 * 384


# --- the demo --------------------------------------------------------------------------------

def test_demo_gguf_permutation_on_real_weights_and_tokenizer_keys_survive(demo_handle, tmp_path):
    from studio.core.models import demo_gguf_path

    variant = quantized(demo_handle, Plan(QuantSpec(4, 32, True)), name="demo w4")
    result = run(export_job(variant, demo_handle, "gguf", tmp_path / "out"))
    assert result.verified and result.tokenizer_equal
    # the export parsed the source once (cached); gguf-py re-reads what was written
    source, written = source_reader(demo_gguf_path()), read(result.file)
    for key, field in source.fields.items():                  # every tokenizer key, byte for byte
        if key.startswith("tokenizer."):
            assert [p.tobytes() for p in written.fields[key].parts] == \
                [p.tobytes() for p in field.parts], key
    assert written.get_field("tokenizer.ggml.pre").contents() == "smollm"
    for key, field in source.fields.items():                  # and every other key but one
        if not key.startswith(("GGUF.", "tokenizer.", "general.file_type")):
            assert written.fields[key].contents() == field.contents(), key
    assert written.get_field("general.file_type").contents() == 2            # MOSTLY_Q4_0
    # Real weights: the written K (9 heads, 3 KV heads) must line up row for row with the
    # source's K, which llama.cpp's converter permuted; re-quantized W4 differs only a little.
    original = dequantized(source, "blk.5.attn_k.weight")
    mine = dequantized(written, "blk.5.attn_k.weight")
    assert metrics.relative_error(original, mine) < 0.05
    wrong = gguf_pack.llama_row_order(192, 1)                 # permuted with a wrong count
    unpermuted = np.argsort(gguf_pack.llama_row_order(192, 3))
    assert metrics.relative_error(original, mine[torch.from_numpy(wrong)]) > 0.5
    assert metrics.relative_error(original, mine[torch.from_numpy(unpermuted)]) > 0.5
    assert tensor_types(written)["blk.5.attn_k.weight"] == "Q4_0"
