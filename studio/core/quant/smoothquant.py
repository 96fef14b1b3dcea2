"""SmoothQuant (Xiao et al. 2023), after mit-han-lab/smoothquant (`calibration.py`, `smooth.py`,
`fake_quant.py`): W8A8 with per-channel weights and per-token activations, simulated.

1. On the float model, record each linear's per-input-channel max |x| over the calibration
   windows (block by block, so the lm_head is never run).
2. For every norm-preceded group (q/k/v after the attention norm, gate/up or fc1 after the MLP
   norm), s = max|X|^alpha / max|W|^(1 - alpha), with max|W| the column abs-max over all the
   group's linears; fold s into the norm and the linears (the model is unchanged before rounding).
3. Install simulated per-token symmetric activation quantization (`act_bits`, default 8) on the
   input of every SmoothQuant layer, as forward pre-hooks.
The weights are then quantized by the driver with RTN on the spec's grid: SmoothQuant specs are
meant as bits=8, group_size=-1 (per-channel), symmetric=True (the paper's W8A8); other grids run,
but are not what the paper measured.
"""
from __future__ import annotations

import torch
from torch import nn

from studio.core.jobs import Job, Progress, run
from studio.core.layers import weight_matrix
from studio.core.plan import QuantSpec
from studio.core.quant.blocks import capture_block_inputs, decoder_blocks, run_block
from studio.core.quant.scales import smoothing_scales
from studio.core.quant import layout
from studio.core.quant.layout import scaling_groups
from studio.core.quant.scaling import ScaleGroup, fold_scales

BATCH = 4  # windows per block run while recording activation maxima (as the driver's runs)


def prepare(model: nn.Module, windows: torch.Tensor,
            specs_by_name: dict[str, QuantSpec]) -> dict[str, int]:
    """Smooth `model` in place and install activation quantization; returns {layer: act_bits}."""
    return run(prepare_job(model, windows, specs_by_name))


def prepare_job(model: nn.Module, windows: torch.Tensor,
                specs_by_name: dict[str, QuantSpec]) -> Job[dict[str, int]]:
    """`prepare` as a Job, yielding once per block. Changes `model`: pass the variant's copy."""
    prefix, blocks = decoder_blocks(model)
    last = last_smoothed_block(model, specs_by_name)
    yield Progress(0, last + 2, "SmoothQuant: capturing calibration inputs")
    inputs = capture_block_inputs(model, windows) if last >= 0 else None
    for i, block in enumerate(blocks[: last + 1]):
        inputs = inputs.with_hidden(smooth_block(block, f"{prefix}.{i}", inputs.at(i),
                                                 specs_by_name))
        yield Progress(i + 1, last + 2, f"SmoothQuant: smoothed block {i}")
    act_bits = {name: int(spec.option("act_bits")) for name, spec in specs_by_name.items()}
    install_act_quant(model, act_bits)
    return act_bits


def last_smoothed_block(model: nn.Module, specs_by_name: dict[str, QuantSpec]) -> int:
    """Index of the last block with a group to smooth (-1: none)."""
    layout.discover(model)
    prefix, blocks = decoder_blocks(model)
    return max((i for i, block in enumerate(blocks)
                if _groups_to_smooth(block, f"{prefix}.{i}", specs_by_name)), default=-1)


def smooth_block(block: nn.Module, block_name: str, inputs,
                 specs_by_name: dict[str, QuantSpec]) -> torch.Tensor:
    """Fold smoothing scales into the block's groups holding SmoothQuant layers, from their
    inputs' per-channel maxima over `inputs` (the float model's); the block's outputs, taken
    before the fold (the float model's next inputs). Only a block with such a group is
    written to."""
    groups = _groups_to_smooth(block, block_name, specs_by_name)
    absmax, outputs = record_input_absmax(block, inputs, [g.linears[0] for g in groups])
    for group, alpha in groups.items():
        weights = torch.stack([weight_matrix(block.get_submodule(rel)).abs().amax(dim=0)
                               for rel in group.linears]).amax(dim=0)
        fold_scales(block, group, smoothing_scales(absmax[group.linears[0]], weights, alpha))
    return outputs


def _groups_to_smooth(block: nn.Module, block_name: str,
                      specs: dict[str, QuantSpec]) -> dict[ScaleGroup, float]:
    """The block's norm-preceded groups holding a SmoothQuant layer, with their alpha.

    A group is smoothed whole even when only some of its linears are SmoothQuant layers: the
    norm's output is shared, so all readers must take the scale for the block to stay exact.
    """
    if not any(name.startswith(block_name + ".") for name in specs):
        return {}
    chosen = {}
    for group in scaling_groups(block):
        mine = [specs[f"{block_name}.{rel}"] for rel in group.linears
                if f"{block_name}.{rel}" in specs]
        if group.norm_preceded and mine:
            chosen[group] = float(mine[0].option("alpha"))
    return chosen


@torch.no_grad()
def record_input_absmax(block: nn.Module, inputs,
                        names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-input-channel max |x| of the named linears while the block runs on `inputs`, and
    the block's outputs (the next block's inputs), written over `inputs.hidden`: the float
    model's activations are held once."""
    absmax: dict[str, torch.Tensor] = {}

    def hook(rel):
        def grab(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[rel] = peak if rel not in absmax else torch.maximum(absmax[rel], peak)
        return grab

    handles = [block.get_submodule(rel).register_forward_pre_hook(hook(rel), with_kwargs=True)
               for rel in names]
    try:
        outputs = run_block(block, inputs, batch_size=BATCH, out=inputs.hidden)
    finally:
        for handle in handles:
            handle.remove()
    return absmax, outputs


# --- simulated activation quantization -----------------------------------------------------

def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token (last dimension) abs-max fake quantization, as the reference's
    `quantize_activation_per_token_absmax`."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / qmax
    return torch.round(x / scale) * scale


class ActQuant:
    """A forward pre-hook quantizing a linear's input per token. A plain object (not a closure)
    so it survives `copy.deepcopy` of the model and can be found again to remove it."""

    def __init__(self, bits: int) -> None:
        if not 2 <= int(bits) <= 16:
            raise ValueError(f"activation bits must lie in 2..16, not {bits}")
        self.bits = int(bits)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (quantize_per_token(args[0], self.bits),) + tuple(args[1:]), kwargs
        key = "input" if "input" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: quantize_per_token(kwargs[key], self.bits)}

    def __repr__(self) -> str:
        return f"ActQuant(bits={self.bits})"


def install_act_quant(model: nn.Module, act_bits: dict[str, int]) -> None:
    """Quantize the inputs of the named layers per token (replacing any earlier setting).
    Not saved with weights: whoever loads a variant calls this again with its act_bits."""
    for name, bits in act_bits.items():
        module = model.get_submodule(name)
        _remove_from(module)
        module.register_forward_pre_hook(ActQuant(bits), with_kwargs=True)


def remove_act_quant(model: nn.Module) -> None:
    for module in model.modules():
        _remove_from(module)


def installed_act_bits(model: nn.Module) -> dict[str, int]:
    """{layer: bits} of the activation quantization currently installed on `model`."""
    return {name: hook.bits for name, module in model.named_modules()
            for hook in module._forward_pre_hooks.values() if isinstance(hook, ActQuant)}


def _remove_from(module: nn.Module) -> None:
    # Hooks are found by type rather than by handle: a deep-copied model carries copies of the
    # hooks but no handles to them.
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, ActQuant):
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


# --- the method's declaration (studio.core.quant.registry) ------------------------------------
from dataclasses import dataclass  # noqa: E402

from studio.core.quant.registry import Quantizer, option  # noqa: E402


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = option(0.5, low=0.0, high=1.0, title="Migration alpha",
                          help="how much of the activations' range moves into the weights")
    act_bits: int = option(8, low=2, high=16, title="Activation bits",
                           help="per-token symmetric quantization of the layer's inputs")


def _round(w: torch.Tensor, spec: QuantSpec, calib=None):
    from studio.core.quant.grid import quantize_rtn
    return quantize_rtn(w.float(), spec)


QUANTIZER = Quantizer(
    name="smoothquant", title="SmoothQuant (W8A8)", options=SmoothQuantOptions,
    calibration="none", quantize=_round, smoothing=True, folds_scales=True,
    suggested={"bits": 8, "group_size": -1, "symmetric": True},
    summary="activation outliers migrated into the weights; weights and inputs quantized",
    llm_compressor="QuantizationModifier")
