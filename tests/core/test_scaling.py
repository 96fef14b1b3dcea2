"""Scaling groups and exact folding of per-channel scales, on every tiny architecture."""
import copy

import pytest
import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import run
from studio.core.models import open_model_job
from studio.core.quant.blocks import decoder_blocks
from studio.core.quant.scaling import fold_scales, scaling_groups
from tests.tiny_models import ARCHITECTURES


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_random_scales_leaves_outputs_unchanged(tiny_dirs, arch):
    handle = run(open_model_job(tiny_dirs[arch]))
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(handle.model)
    # Gemma's norms start at weight 0 (multiplier 1 + w); give every norm a non-trivial weight
    # so the fold has something to get wrong.
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            module.weight.data.add_(torch.rand_like(module.weight) * 0.5)
    expected = logits(model, ids)
    gen = torch.Generator().manual_seed(1)
    _, blocks = decoder_blocks(model)
    folded = 0
    for block in blocks:
        for group in scaling_groups(block):
            width = block.get_submodule(group.linears[0]).weight.shape
            width = width[0] if arch == "gpt2" else width[1]  # Conv1D stores [in, out]
            s = torch.exp(torch.randn(width, generator=gen))  # scales spanning ~ e^-3 .. e^3
            fold_scales(block, group, s)
            folded += 1
    assert folded >= 2 * len(blocks)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)


def test_groups_follow_the_reference(tiny_dirs):
    llama = run(open_model_job(tiny_dirs["llama"])).model.model.layers[0]
    names = [g.linears for g in scaling_groups(llama)]
    # grouped-query attention (2 kv heads for 4 heads): no v -> o group
    assert names == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     ("mlp.gate_proj", "mlp.up_proj"),
                     ("mlp.down_proj",)]
    opt = run(open_model_job(tiny_dirs["opt"])).model.model.decoder.layers[0]
    prevs = [g.prev for g in scaling_groups(opt)]
    assert prevs == ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm", "fc1"]
    assert [g.norm_preceded for g in scaling_groups(opt)] == [True, False, True, False]


def test_unknown_block_names_what_is_supported():
    class StrangeBlock(nn.Module):
        pass

    with pytest.raises(StudioError, match="Llama.*GPT-2"):
        scaling_groups(StrangeBlock())


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_folding_on_other_llama_like_blocks(kind):
    import transformers as tf

    config_class = {"mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config}[kind]
    config = config_class(vocab_size=128, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    expected = logits(model, ids)
    block = model.model.layers[0]
    groups = scaling_groups(block)
    assert len(groups) == 4  # no GQA here, so v -> o is a group too
    for group in groups:
        width = block.get_submodule(group.linears[0]).in_features
        fold_scales(block, group, torch.exp(torch.randn(width)))
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)
