"""AWQ: exact scaling before rounding, lower error than RTN on salient channels, clip search."""
import copy

import pytest
import torch

from studio.core.jobs import run
from studio.core.layers import is_linear, weight_matrix
from studio.core.models import open_model_job
from studio.core.plan import QuantSpec
from studio.core.quant.awq import awq_block, search_clip
from studio.core.quant.blocks import capture_block_inputs, decoder_blocks, run_block
from studio.core.quant.grid import effective_group_size, expand_groups, quantize_rtn
from tests.tiny_models import FAMILIES


def windows(count=4, seqlen=32, seed=0):
    return torch.randint(3, 300, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def block_specs(prefix, block, spec):
    return {f"{prefix}.{rel}": spec for rel, m in block.named_modules() if is_linear(m)}


@pytest.mark.parametrize("arch", FAMILIES)
def test_awq_scaling_leaves_outputs_unchanged(family_dirs, arch):
    """Scaling before rounding (scales folded into norms / producing linears, their inverse into
    the linears, no rounding: the float weights) leaves every family's outputs unchanged."""
    model = copy.deepcopy(run(open_model_job(family_dirs[arch])).model)
    for module in model.modules():  # non-trivial norms (Gemma's start at 0, i.e. x1)
        if "norm" in type(module).__name__.lower():
            module.weight.data.add_(torch.rand_like(module.weight) * 0.5)
    ids = windows()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix, blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, ids)
    # A coarse grid and no clip keep it quick: clipping never touches the float weights.
    spec = QuantSpec(bits=3, group_size=32, method="awq", options={"grid": 5, "clip": False})
    for i, block in enumerate(blocks):
        specs = block_specs(f"{prefix}.{i}", block, spec)
        qtensors = awq_block(block, f"{prefix}.{i}", inputs, specs)
        assert set(qtensors) == set(specs)
        inputs = inputs.with_hidden(run_block(block, inputs))
    changed = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
    assert changed, "the search chose s = 1 everywhere, so this test proves nothing"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def _layer_inputs(block, inputs, rels):
    got = {rel: [] for rel in rels}
    hooks = [block.get_submodule(rel).register_forward_pre_hook(
        lambda m, args, rel=rel: got[rel].append(args[0].reshape(-1, args[0].shape[-1])))
        for rel in rels]
    run_block(block, inputs)
    for hook in hooks:
        hook.remove()
    return {rel: torch.cat(chunks) for rel, chunks in got.items()}


def _relative_error(x, w_q, w):
    ref = x @ w.T
    return ((x @ w_q.T - ref).pow(2).sum() / ref.pow(2).sum()).item()


# g64 makes the MLP's 160-wide down_proj input ragged (2.5 groups).
@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, -1)])
def test_awq_beats_rtn_on_salient_channels(tiny_llama, bits, group_size):
    model = copy.deepcopy(tiny_llama.model)
    block = model.model.layers[0]
    # Plant outlier input channels, as LLMs have: a few norm channels 30x larger.
    block.input_layernorm.weight.data[[5, 17]] *= 30
    block.post_attention_layernorm.weight.data[[9]] *= 30
    inputs = capture_block_inputs(model, windows(8, 64))
    rels = [rel for rel, m in block.named_modules() if is_linear(m)]
    x_before = _layer_inputs(block, inputs, rels)
    w_before = {rel: weight_matrix(block.get_submodule(rel)).clone() for rel in rels}
    spec = QuantSpec(bits=bits, group_size=group_size, method="awq")
    qtensors = awq_block(block, "model.layers.0", inputs, block_specs("model.layers.0", block, spec))
    x_after = _layer_inputs(block, inputs, rels)  # the folded norms now feed x / s
    for rel in rels:
        # Each method against its own float layer on its own inputs (AWQ's up_proj output is
        # deliberately divided by down_proj's scales).
        awq = _relative_error(x_after[rel], qtensors[f"model.layers.0.{rel}"].dequantize(),
                              weight_matrix(block.get_submodule(rel)))
        rtn = _relative_error(x_before[rel], quantize_rtn(w_before[rel], spec).dequantize(),
                              w_before[rel])
        assert awq < 0.6 * rtn, (rel, awq, rtn)


@pytest.mark.parametrize("cols,group_size", [(100, 32), (96, -1)])
def test_clip_search_never_worse_than_no_clip(cols, group_size):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, cols, generator=gen)
    w[:, 7] *= 8  # a few large weights make clipping worth it
    x = torch.randn(256, cols, generator=gen)
    spec = QuantSpec(bits=3, group_size=group_size, method="awq")
    max_val = search_clip(w, x, spec)
    gs = effective_group_size(group_size, cols)
    assert max_val.shape == (48, -(-cols // gs))
    bound = expand_groups(max_val, gs, cols)
    clipped = quantize_rtn(torch.clamp(w, -bound, bound), spec).dequantize()
    plain = quantize_rtn(w, spec).dequantize()
    # The search minimises each group's share of the output error, per output channel.
    for start in range(0, cols, gs):
        cut = slice(start, start + gs)
        err_clip = (x[:, cut] @ (clipped - w)[:, cut].T).pow(2).mean(0)
        err_plain = (x[:, cut] @ (plain - w)[:, cut].T).pow(2).mean(0)
        assert torch.all(err_clip <= err_plain * (1 + 1e-5) + 1e-7)
        assert err_clip.sum() < 0.97 * err_plain.sum()  # and clipping does help


def test_awq_without_clip_is_rtn_of_the_scaled_weights(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, windows())
    spec = QuantSpec(bits=4, group_size=32, method="awq", options={"clip": False, "grid": 5})
    qtensors = awq_block(block, "model.layers.0", inputs, block_specs("model.layers.0", block, spec))
    for name, qt in qtensors.items():
        w = weight_matrix(model.get_submodule(name))
        assert torch.equal(qt.codes, quantize_rtn(w, spec).codes), name


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, 32, False), (4, 128, True),
                                                       (4, -1, False)])
def test_search_fake_quant_matches_the_grid(bits, group_size, symmetric):
    from studio.core.quant.awq import fake_quant_matrix
    from studio.core.quant.grid import fake_quant

    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(3))  # 200: ragged groups
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, method="awq")
    torch.testing.assert_close(fake_quant_matrix(w, spec), fake_quant(w, spec), rtol=0, atol=1e-6)


def test_awq_variant_saves_and_reloads_with_its_folded_scales(tiny_dirs, tmp_path):
    """Through the driver: the folded norms travel with the variant, the baseline is untouched."""
    from studio.core.plan import Plan
    from studio.core.quantize import quantize_job
    from studio.core.variant import load_variant, save_variant

    handle = run(open_model_job(tiny_dirs["llama"]))
    baseline = {k: v.clone() for k, v in handle.model.state_dict().items()}
    ids = windows(8, 64)
    spec = QuantSpec(bits=3, group_size=32, method="awq", options={"grid": 10})
    variant = run(quantize_job(handle, Plan(spec), ids, "random ids", "awq"))
    assert any("layernorm" in key for key in variant.floats)  # scales went into the norms
    assert all(torch.equal(v, handle.model.state_dict()[k]) for k, v in baseline.items())
    save_variant(variant, tmp_path / "v")
    loaded = load_variant(tmp_path / "v", handle)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits,
                                   variant.model(input_ids=ids).logits)
