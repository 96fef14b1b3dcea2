"""Scaling groups discovered per block (layout.py) and exact folding of per-channel scales, on
every tiny family."""
import copy

import pytest
import torch

from studio.core.errors import StudioError
from studio.core.jobs import run
from studio.core.layers import weight_matrix
from studio.core.models import open_model_job
from studio.core.plan import QuantSpec
from studio.core.quant import layout
from studio.core.quant.blocks import decoder_blocks
from studio.core.quant.layout import scaling_groups
from studio.core.quant.scaling import fold_scales, norm_offset
from tests.tiny_models import FAMILIES

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj")
UP_DOWN = ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", None)
V_O = ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", None)
# What each family's blocks must be found to hold: (prev, linears, inspect, rows). Written from
# the models' code (and llm-awq / AutoAWQ where they cover the family), not from the discovery.
EXPECTED = {
    # grouped-query attention (2 kv heads for 4): v's rows cannot carry o's columns
    "llama": [("input_layernorm", ATTN, "self_attn", None),
              ("post_attention_layernorm", MLP, "mlp", None), UP_DOWN],
    "qwen2": [("input_layernorm", ATTN, "self_attn", None),
              ("post_attention_layernorm", MLP, "mlp", None), UP_DOWN],
    "gemma": [("input_layernorm", ATTN, "self_attn", None),
              ("post_attention_layernorm", MLP, "mlp", None), UP_DOWN],
    "mistral": [("input_layernorm", ATTN, "self_attn", None),
                ("post_attention_layernorm", MLP, "mlp", None), UP_DOWN],
    # full multi-head attention: v -> o is exact (q/k norms sit after q/k, outside the fold)
    "qwen3": [("input_layernorm", ATTN, "self_attn", None), V_O,
              ("post_attention_layernorm", MLP, "mlp", None), UP_DOWN],
    # sandwich norms: post_attention_layernorm normalises o's output; pre_feedforward feeds MLP
    "gemma2": [("input_layernorm", ATTN, "self_attn", None),
               ("pre_feedforward_layernorm", MLP, "mlp", None), UP_DOWN],
    "gemma3": [("input_layernorm", ATTN, "self_attn", None), V_O,
               ("pre_feedforward_layernorm", MLP, "mlp", None), UP_DOWN],
    # fused qkv (v = last third) and gate_up (up = second half)
    "phi3": [("input_layernorm", ("self_attn.qkv_proj",), "self_attn", None),
             ("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", (128, 192)),
             ("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp", None),
             ("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", (128, 256))],
    # Conv1D c_attn holds q|k|v; GELU between c_fc and c_proj: no fold there
    "gpt2": [("ln_1", ("attn.c_attn",), "attn", None),
             ("attn.c_attn", ("attn.c_proj",), "attn.c_proj", (128, 192)),
             ("ln_2", ("mlp.c_fc",), "mlp", None)],
    # ReLU between fc1 and fc2 is positively homogeneous: fc1 -> fc2 folds
    "opt": [("self_attn_layer_norm", ("self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.q_proj"), "self_attn", None),
            ("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", None),
            ("final_layer_norm", ("fc1",), "fc1", None),
            ("fc1", ("fc2",), "fc2", None)],
}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def roughened(model):
    """A copy whose norms have non-trivial weights (Gemma's start at 0, i.e. x1), so a fold
    has something to get wrong."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.weight.data.add_(torch.rand_like(module.weight) * 0.5)
    return model


@pytest.mark.parametrize("arch", FAMILIES)
def test_layout_is_discovered_per_family(family_dirs, arch):
    model = run(open_model_job(family_dirs[arch])).model
    layout.discover(model)
    _, blocks = decoder_blocks(model)
    for block in blocks:
        found = [(g.prev, g.linears, g.inspect, g.rows) for g in scaling_groups(block)]
        assert found == EXPECTED[arch]
        assert [g.norm_preceded for g in scaling_groups(block)] == \
            ["norm" in g[0] or g[0].startswith("ln_") for g in EXPECTED[arch]]


@pytest.mark.parametrize("arch", FAMILIES)
def test_folding_random_scales_leaves_outputs_unchanged(family_dirs, arch):
    model = roughened(run(open_model_job(family_dirs[arch])).model)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    layout.discover(model)
    gen = torch.Generator().manual_seed(1)
    _, blocks = decoder_blocks(model)
    folded = 0
    for block in blocks:
        for group in scaling_groups(block):
            width = weight_matrix(block.get_submodule(group.linears[0])).shape[1]
            s = torch.exp(torch.randn(width, generator=gen))  # scales spanning ~ e^-3 .. e^3
            fold_scales(block, group, s)
            folded += 1
    assert folded >= 3 * len(blocks)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)


def test_one_plus_w_norms_are_probed_not_named(family_dirs):
    gemma3 = run(open_model_job(family_dirs["gemma3"])).model.model.layers[0]
    llama = run(open_model_job(family_dirs["llama"])).model.model.layers[0]
    assert norm_offset(gemma3.input_layernorm) and norm_offset(gemma3.self_attn.q_norm)
    assert not norm_offset(llama.input_layernorm)


def test_a_block_with_nothing_to_fold_into_is_refused():
    """A post-norm OPT block (like OPT-350m): its norms' outputs are the residual stream, so no
    scale folds away; the refusal names what is missing."""
    import transformers as tf

    config = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                          num_attention_heads=4, max_position_embeddings=64,
                          word_embed_proj_dim=64, do_layer_norm_before=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    layout.discover(model)
    assert not any(g.norm_preceded for g in scaling_groups(model.model.decoder.layers[0]))
    spec = QuantSpec(4, 32, method="awq")
    with pytest.raises(StudioError, match="AWQ cannot scale the OPTDecoderLayer blocks.*"
                                          "self_attn_layer_norm"):
        layout.check_groups(model, {"model.decoder.layers.0.fc1": spec}, ("awq", "smoothquant"))
    layout.check_groups(model, {"model.decoder.layers.0.fc1": QuantSpec(4, 32, method="gptq")},
                        ("awq", "smoothquant"))


def test_undiscovered_block_without_inputs_says_so(tiny_llama):
    block = copy.deepcopy(tiny_llama.model.model.layers[0])
    if hasattr(block, layout.ATTRIBUTE):
        delattr(block, layout.ATTRIBUTE)
    with pytest.raises(StudioError, match="not discovered"):
        scaling_groups(block)
