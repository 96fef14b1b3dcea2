"""SmoothQuant: exact smoothing before rounding, W8A8 better than naive W8A8 on outliers,
activation quantization hooks that install, survive a deep copy and come off again."""
import copy

import pytest
import torch

from studio.core.jobs import run
from studio.core.layers import is_linear, set_weight_matrix, weight_matrix
from studio.core.models import open_model_job
from studio.core.plan import QuantSpec
from studio.core.quant.blocks import decoder_blocks
from studio.core.quant.grid import fake_quant
from studio.core.quant.smoothquant import (install_act_quant, installed_act_bits, prepare,
                                           quantize_per_token, remove_act_quant)
from studio.core.quant import layout
from studio.core.quant.layout import scaling_groups
from tests.tiny_models import FAMILIES

W8 = QuantSpec(bits=8, group_size=-1, symmetric=True, method="smoothquant")
NORMS = ("input_layernorm", "post_attention_layernorm", "ln_1", "ln_2",
         "self_attn_layer_norm", "final_layer_norm", "pre_feedforward_layernorm")


def windows(count=8, seqlen=32):
    return torch.randint(3, 300, (count, seqlen), generator=torch.Generator().manual_seed(0))


def block_linears(model):
    prefix, _ = decoder_blocks(model)
    return [n for n, m in model.named_modules() if is_linear(m) and n.startswith(prefix + ".")]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def plant_outliers(model):
    """Two input channels of every pre-linear norm 40x louder, as in real LLMs."""
    for name, module in model.named_modules():
        if name.endswith(NORMS):
            module.weight.data[[3, 11]] += 40


@pytest.mark.parametrize("arch", FAMILIES)
def test_smoothing_leaves_outputs_unchanged(family_dirs, arch):
    model = copy.deepcopy(run(open_model_job(family_dirs[arch])).model)
    plant_outliers(model)
    ids = windows()
    expected = logits(model, ids)
    prefix, blocks = decoder_blocks(model)
    layout.discover(model)
    norms_before = {f"{prefix}.{i}.{g.prev}": block.get_submodule(g.prev).weight.clone()
                    for i, block in enumerate(blocks) for g in scaling_groups(block)
                    if g.norm_preceded}
    assert len(norms_before) == 2 * len(blocks)
    names = block_linears(model)
    act_bits = prepare(model, ids, {n: W8 for n in names})
    assert act_bits == {n: 8 for n in names} == installed_act_bits(model)
    assert all(not torch.equal(model.get_submodule(n).weight, w)
               for n, w in norms_before.items()), "every norm should carry smoothing scales"
    quantized = logits(model, ids)
    remove_act_quant(model)
    assert installed_act_bits(model) == {}
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(quantized, expected, rtol=1e-4, atol=1e-4)  # A8 was active


def _fake_quant_weights(model, names):
    for name in names:
        module = model.get_submodule(name)
        set_weight_matrix(module, fake_quant(weight_matrix(module), W8))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_w8a8_with_smoothing_beats_naive_w8a8(tiny_dirs, arch):
    base = copy.deepcopy(run(open_model_job(tiny_dirs[arch])).model)
    plant_outliers(base)
    ids = windows()
    expected = logits(base, ids)
    names = block_linears(base)

    naive = copy.deepcopy(base)
    install_act_quant(naive, {n: 8 for n in names})
    _fake_quant_weights(naive, names)
    smooth = copy.deepcopy(base)
    prepare(smooth, ids, {n: W8 for n in names})
    _fake_quant_weights(smooth, names)

    def error(model):
        return ((logits(model, ids) - expected).pow(2).mean() / expected.pow(2).mean()).item()

    assert error(smooth) < 0.5 * error(naive)


def test_act_quant_hooks_install_once_copy_and_remove(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    ids = windows(2, 16)
    plain = logits(model, ids)
    name = "model.layers.0.mlp.down_proj"
    install_act_quant(model, {name: 4})
    install_act_quant(model, {name: 4})  # re-installing replaces, never stacks
    assert len(model.get_submodule(name)._forward_pre_hooks) == 1
    four_bit = logits(model, ids)
    assert not torch.allclose(four_bit, plain)
    twin = copy.deepcopy(model)  # variants are deep copies: the setting must travel along
    assert installed_act_bits(twin) == {name: 4}
    torch.testing.assert_close(logits(twin, ids), four_bit)
    remove_act_quant(twin)
    torch.testing.assert_close(logits(twin, ids), plain)
    assert installed_act_bits(model) == {name: 4}  # the original keeps its own


def test_per_token_quantization_grid():
    x = torch.tensor([[1.0, -0.5, 0.25, 127.0], [0.0, 0.0, 0.0, 0.0]])
    q = quantize_per_token(x, 8)
    # Row 0: step 1.0 (max 127 / 127), so values round to whole numbers; row 1 stays zero.
    assert torch.equal(q, torch.tensor([[1.0, -0.0, 0.0, 127.0], [0.0, 0.0, 0.0, 0.0]]))
    x = torch.randn(5, 64)
    step = x.abs().amax(dim=-1, keepdim=True) / 7
    assert torch.all((quantize_per_token(x, 4) - x).abs() <= step / 2 + 1e-6)


def test_smoothquant_variant_saves_and_reloads_with_its_activation_quantization(tiny_dirs,
                                                                                 tmp_path):
    """Through the driver: smoothed norms and A8 hooks come back when the variant is loaded."""
    from studio.core.plan import Plan
    from studio.core.quantize import quantize_job
    from studio.core.variant import load_variant, save_variant

    handle = run(open_model_job(tiny_dirs["opt"]))
    baseline = {k: v.clone() for k, v in handle.model.state_dict().items()}
    ids = windows(8, 64)
    variant = run(quantize_job(handle, Plan(W8), ids, "random ids", "sq"))
    assert variant.act_bits and set(variant.act_bits) == set(block_linears(handle.model))
    assert all(torch.equal(v, handle.model.state_dict()[k]) for k, v in baseline.items())
    save_variant(variant, tmp_path / "v")
    loaded = load_variant(tmp_path / "v", handle)
    assert installed_act_bits(loaded.model) == variant.act_bits
    torch.testing.assert_close(logits(loaded.model, ids), logits(variant.model, ids))
