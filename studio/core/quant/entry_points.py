"""Calling a registered method's entry points from the quantize job, and checking what they
return: one coded tensor of the layer's shape per layer asked for. A plug-in's exception or a
wrong result becomes a StudioError naming the method, the plug-in and the layer (the job
stops; the baseline was never touched)."""
from __future__ import annotations

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.layers import weight_matrix
from studio.core.plan import QuantSpec
from studio.core.quant import registry
from studio.core.quant.registry import LayerCalibration, Quantizer


def quantizers_of(specs, calibration: str) -> list[Quantizer]:
    """The methods of `specs` with that calibration, each once, in the registry's order."""
    wanted = {s.method for s in specs if s.quantizer.calibration == calibration}
    return [q for q in registry.all_quantizers() if q.name in wanted]


def shared_hessian_results(quantizer: Quantizer, block_name: str, names: list[str],
                           weights: dict[str, torch.Tensor], calib: LayerCalibration,
                           rel: dict[str, QuantSpec], block: nn.Module
                           ) -> list[tuple[object, str]]:
    """[(coded tensor, note)] for layers `names` sharing one Hessian."""
    where = ", ".join(f"{block_name}.{r}" for r in names)
    if quantizer.quantize_shared is not None:
        got = call_entry(quantizer, where, quantizer.quantize_shared,
                         [weights[r] for r in names], calib, [rel[r] for r in names])
        if not isinstance(got, (list, tuple)) or len(got) != len(names):
            raise registry.QuantizerFailed(f"{quantizer.title} ({quantizer.origin}) returned "
                                           f"{type(got).__name__} for {len(names)} layers.")
        return [layer_result(quantizer, f"{block_name}.{r}", block.get_submodule(r), item)
                for r, item in zip(names, got)]
    return [layer_result(quantizer, f"{block_name}.{r}", block.get_submodule(r),
                         call_entry(quantizer, f"{block_name}.{r}", quantizer.quantize,
                                    weights[r], rel[r], calib)) for r in names]


def call_entry(quantizer: Quantizer, where: str, function, *args):
    """Call a method's entry point; a plug-in's failure becomes a StudioError naming the
    method, the plug-in and the layer (the job stops; the baseline was never touched)."""
    if quantizer.origin == "built-in":
        return function(*args)
    try:
        return function(*args)
    except StudioError:
        raise
    except Exception as exc:
        raise registry.QuantizerFailed(
            f"{quantizer.title} ({quantizer.origin}) failed on {where}: "
            f"{type(exc).__name__}: {exc}") from exc


def layer_result(quantizer: Quantizer, name: str, module: nn.Module, got) -> tuple[object, str]:
    """(coded tensor, note) from what an entry point returned, checked against the layer."""
    qt, note = got if isinstance(got, tuple) else (got, "")
    registry.check_result(quantizer, name, qt, tuple(weight_matrix(module).shape))
    return qt, str(note or "")


def checked_block(quantizer: Quantizer, got, specs: dict[str, QuantSpec], block: nn.Module,
                   block_name: str) -> dict[str, object]:
    """What a "block inputs" entry point returned: one coded tensor per layer asked for."""
    if not isinstance(got, dict) or set(got) != set(specs):
        raise registry.QuantizerFailed(f"{quantizer.title} ({quantizer.origin}) did not return "
                                       f"one result per layer of {block_name}.")
    for name, qt in got.items():
        module = block.get_submodule(name[len(block_name) + 1:])
        registry.check_result(quantizer, name, qt, tuple(weight_matrix(module).shape))
    return got
