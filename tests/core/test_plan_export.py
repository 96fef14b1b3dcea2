"""Plans exported for llama.cpp and llm-compressor name every tensor right."""
import re

import pytest
import yaml

from studio.core.errors import StudioError
from studio.core.plan import Plan, QuantSpec, Rule
from studio.core.plan_export import (llama_cpp_args, llama_cpp_export, llm_compressor_export,
                                     llm_compressor_recipe)


@pytest.fixture
def mixed_plan(tiny_llama):
    plan = Plan(default=QuantSpec(bits=4, group_size=32), architecture=tiny_llama.architecture)
    plan = plan.with_rule(Rule(r".*mlp\.down_proj", QuantSpec(bits=8, group_size=64), regex=True))
    plan = plan.with_rule(Rule("model.layers.0.self_attn.q_proj", QuantSpec(bits=2,
                                                                            group_size=-1)))
    return plan.with_rule(Rule("model.layers.1.self_attn.v_proj", None))


def gguf_names(handle):
    """The GGUF names llama.cpp's converter gives a Llama's block tensors."""
    roles = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    return {i.name: f"blk.{i.block}.{roles[i.name.rsplit('.', 1)[1]]}.weight"
            for i in handle.quantizable}


def test_llama_cpp_overrides_hit_exactly_their_tensor(tiny_llama, mixed_plan):
    export = llama_cpp_export(tiny_llama, mixed_plan)
    lines = export.text.strip().splitlines()
    names = gguf_names(tiny_llama)
    assert len(lines) == len(names)
    # Decoys a loose pattern would also hit: blk.10 / blk.11 and a norm beside attn_q.
    decoys = [re.sub(r"blk\.(\d+)", lambda m: f"blk.1{m.group(1)}", n) for n in names.values()]
    all_tensors = list(names.values()) + decoys + ["blk.0.attn_q_norm.weight"]
    by_layer = {}
    for line in lines:
        pattern, kind = line.rsplit("=", 1)
        hits = [t for t in all_tensors if re.search(pattern, t)]  # llama.cpp uses regex_search
        assert len(hits) == 1, (pattern, hits)
        by_layer[hits[0]] = kind
    assert by_layer[names["model.layers.0.self_attn.q_proj"]] == "q2_K"
    assert by_layer[names["model.layers.1.self_attn.v_proj"]] == "f16"
    assert by_layer[names["model.layers.0.mlp.down_proj"]] == "q8_0"
    assert by_layer[names["model.layers.1.self_attn.k_proj"]] == "q4_K"
    # Rows of 64 or 160 are not multiples of 256: llama-quantize falls back, and we say so.
    assert any("q5_0 instead" in note for note in export.notes)
    args = llama_cpp_args(tiny_llama, mixed_plan)
    assert args[0] == "--tensor-type" and len(args) == 2 * len(lines)


def test_llm_compressor_recipe_targets_every_layer_once(tiny_llama, mixed_plan):
    recipe = yaml.safe_load(llm_compressor_export(tiny_llama, mixed_plan).text)
    assert recipe == llm_compressor_recipe(tiny_llama, mixed_plan)
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert "model.layers.1.self_attn.v_proj" in modifier["ignore"]
    assert "lm_head" in modifier["ignore"]
    seen = {}
    for group in modifier["config_groups"].values():
        for target in group["targets"]:
            assert target.startswith("re:^")
            matches = [i.name for i in tiny_llama.layers if re.match(target[3:], i.name)]
            assert len(matches) == 1
            seen[matches[0]] = group["weights"]
    assert len(seen) == len(tiny_llama.quantizable) - 1
    assert seen["model.layers.0.self_attn.q_proj"] == {"num_bits": 2, "type": "int",
                                                       "symmetric": False, "strategy": "channel"}
    assert seen["model.layers.0.mlp.down_proj"]["group_size"] == 64
    assert seen["model.layers.0.self_attn.k_proj"] == {"num_bits": 4, "type": "int",
                                                       "symmetric": False, "strategy": "group",
                                                       "group_size": 32}


def test_gptq_options_go_on_the_modifier(tiny_llama):
    plan = Plan(default=QuantSpec(bits=4, method="gptq", options={"damp": 0.05}))
    recipe = llm_compressor_recipe(tiny_llama, plan)
    gptq = recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert gptq["dampening_frac"] == 0.05
    mixed = plan.with_rule(Rule("model.layers.0.mlp.up_proj",
                                QuantSpec(bits=4, method="gptq", options={"damp": 0.1})))
    with pytest.raises(StudioError, match="one set of gptq options"):
        llm_compressor_recipe(tiny_llama, mixed)


def test_plan_for_another_architecture_is_refused(tiny_llama):
    plan = Plan(default=QuantSpec(bits=4), architecture="GPT2LMHeadModel")
    with pytest.raises(StudioError, match="written for GPT2LMHeadModel"):
        llama_cpp_export(tiny_llama, plan)


def _gguf_of(handle, folder, plan):
    """`handle` quantized by `plan` and exported as GGUF by the studio (as llama.cpp's
    converter names the tensors: a tied pair as token_embd only)."""
    from studio.core.export.base import ExportOptions
    from studio.core.export.gguf import GGUF
    from studio.core.jobs import run
    from studio.core.quantize import quantize_job

    folder.mkdir(parents=True, exist_ok=True)
    variant = run(quantize_job(handle, plan, None, None, "for llama.cpp"))
    return run(GGUF.write_job(variant, handle, ExportOptions(), None, folder)).file


def _hits(text, names):
    """{line's type: [tensors its pattern finds]} as llama-quantize searches (std::regex_search,
    first matching pattern wins)."""
    hits = {}
    for line in text.splitlines():
        pattern, kind = line.rsplit("=", 1)
        hits[pattern] = (kind, [n for n in names if re.search(pattern, n)])
    return hits


NATIVE_Q4 = QuantSpec(4, 32, True, scale_dtype="fp16")


def test_the_ends_map_to_llama_cpp_names_a_tied_pair_once(tiny_llama, tiny_dirs, tmp_path):
    from gguf import GGUFReader

    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from studio.core.plan import end_spec

    # Untied (Qwen2): output and token_embd each, anchored: "output\.weight" alone would also
    # hit every blk.N.attn_output.weight.
    qwen2 = run(open_model_job(tiny_dirs["qwen2"]))
    plan = Plan(NATIVE_Q4).with_rule(Rule("lm_head", end_spec("w8")))
    plan = plan.with_rule(Rule("model.embed_tokens", QuantSpec(bits=4, group_size=64)))
    names = [t.name for t in GGUFReader(_gguf_of(qwen2, tmp_path / "q", Plan(NATIVE_Q4))).tensors]
    hits = _hits(llama_cpp_export(qwen2, plan).text, names)
    assert hits[r"^output\.weight$"] == ("q8_0", ["output.weight"])
    assert hits[r"^token_embd\.weight$"] == ("q4_K", ["token_embd.weight"])
    assert all(len(found) == 1 for _, found in hits.values())

    # Tied (the tiny Llama): one matrix, one line, token_embd; nothing names output.weight.
    names = [t.name for t in GGUFReader(_gguf_of(tiny_llama, tmp_path / "l",
                                                 Plan(NATIVE_Q4))).tensors]
    assert "output.weight" not in names
    plan = Plan(NATIVE_Q4).with_rule(Rule("model.embed_tokens", end_spec("w8")))
    export = llama_cpp_export(tiny_llama, plan)
    hits = _hits(export.text, names)
    assert [p for p in hits if "token_embd" in p or "output" in p and "attn" not in p] == [
        r"^token_embd\.weight$"]
    assert hits[r"^token_embd\.weight$"] == ("q8_0", ["token_embd.weight"])
    assert not any("apart" in note for note in export.notes)
    # Planned apart, the GGUF still holds one tensor: the lm_head's type, and a note.
    apart = plan.with_rule(Rule("lm_head", QuantSpec(bits=6, group_size=32)))
    export = llama_cpp_export(tiny_llama, apart)
    assert _hits(export.text, names)[r"^token_embd\.weight$"][0] == "q6_K"
    assert any("one tensor (token_embd.weight)" in note for note in export.notes)
    # Ends the plan does not set are left to llama-quantize's own choice.
    assert "token_embd" not in llama_cpp_export(tiny_llama, Plan(NATIVE_Q4)).text


@pytest.mark.skipif(not __import__("studio.core.export.llama_cpp", fromlist=["x"]).available(),
                    reason="cyllama is not installed")
def test_llama_quantize_takes_the_tied_head_type(tiny_llama, tmp_path):
    """llama.cpp's own quantizer, given the type the export names for the tied pair, writes it
    once as token_embd and the result runs."""
    import torch
    from gguf import GGUFReader

    from studio.core.export import llama_cpp
    from studio.core.plan import end_spec

    source = _gguf_of(tiny_llama, tmp_path / "src", Plan(NATIVE_Q4))
    plan = Plan(NATIVE_Q4).with_rule(Rule("lm_head", end_spec("w8")))
    kind, _ = _hits(llama_cpp_export(tiny_llama, plan).text, [])[r"^token_embd\.weight$"]
    out = llama_cpp.quantize_file(source, tmp_path / "out.gguf", "Q4_0",
                                  token_embedding_type=kind)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    logits = llama_cpp.logits(out, torch.arange(3, 19).reshape(1, 16))
    assert logits.shape == (1, 16, 384) and torch.isfinite(logits).all()


def test_a_positional_embedding_is_position_embd(tiny_dirs, tmp_path):
    """GPT-2's wpe set by a rule is llama.cpp's position_embd, not a second token_embd line
    (which would also retype the token embedding). Tensor names from gguf-py's own map, as
    llama.cpp's converter writes them (the studio's GGUF export does not take GPT-2)."""
    import gguf

    from studio.core.jobs import run
    from studio.core.models import open_model_job
    from studio.core.plan import end_spec

    gpt2 = run(open_model_job(tiny_dirs["gpt2"]))
    plan = Plan(NATIVE_Q4).with_rule(Rule("transformer.wpe", end_spec("w8")))
    export = llama_cpp_export(gpt2, plan)
    lines = export.text
    assert any("never quantizes positional" in note for note in export.notes)
    names_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 2)
    names = [names_map.get_name(f"{i.name}.weight", try_suffixes=(".weight",))
             for i in gpt2.layers if i.name != "lm_head"]   # tied: one token_embd
    assert {"position_embd.weight", "token_embd.weight"} <= set(names)
    hits = _hits(lines, names)
    assert hits[r"^position_embd\.weight$"] == ("q8_0", ["position_embd.weight"])
    assert not any("token_embd.weight" in found for _, found in hits.values())
    # With the tied head + token embedding set too, each table keeps its own line.
    both = plan.with_rule(Rule("lm_head", end_spec("w4g32")))
    hits = _hits(llama_cpp_export(gpt2, both).text, names)
    assert hits[r"^token_embd\.weight$"] == ("q4_K", ["token_embd.weight"])
    assert hits[r"^position_embd\.weight$"][1] == ["position_embd.weight"]
