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
