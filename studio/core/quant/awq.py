"""AWQ (Lin et al. 2024), after mit-han-lab/llm-awq `auto_scale.py` and `auto_clip.py`.

For one decoder block at a time:
1. Scale search, per scaling group (`scaling.py`): with x_mean the mean |x| of each input
   channel, try s = x_mean ** ratio for `grid` ratios in [0, 1), normalised by
   sqrt(max(s) * min(s)); fake-quantize the group's weights as Q(W * s) / s and keep the s whose
   *module* output (attention, MLP or the linear itself) is closest to the float output. The best
   s is folded into the previous norm / linear, so before rounding the block is unchanged.
2. Clip search, per linear (except q and k, whose error the q.k product distorts): shrink each
   group's max |w| over the reference grid (1 - i/20 for i < 10) and keep, per output channel
   and group, the clip whose output error on a token sample is smallest.
3. Quantize the clipped weights onto the studio's integer grid (`grid.quantize_rtn`).

Subsampling (the reference runs everything on all calibration tokens, on a GPU): on a 2-core
CPU that takes about half an hour for the demo model (20 runs of each attention / MLP per block),
so per block
- x_mean comes from the first windows holding STATS_TOKENS tokens (4096 = 8 windows of 512);
- the search loss from the first windows holding SEARCH_TOKENS tokens (1024 = 2 windows of
  512): whole windows, because attention needs its full sequence;
- the clip search from CLIP_TOKENS tokens evenly strided over the stats windows (512, the
  reference's `n_sample_token`).
The scale search picks one of `grid` exponents per group, which such a sample pins down.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from studio.core.jobs import Job, Progress, run
from studio.core.layers import is_linear, role_of, set_weight_matrix, weight_matrix
from studio.core.plan import QuantSpec
from studio.core.quant.blocks import BlockInputs, run_block
from studio.core.quant.grid import (QTensor, effective_group_size, expand_groups,
                                    qparams_from_range, quantize_rtn)
from studio.core.quant.layout import scaling_groups
from studio.core.quant.scaling import ScaleGroup, fold_scales

STATS_TOKENS = 4096
SEARCH_TOKENS = 1024
CLIP_TOKENS = 512
CLIP_GRID = 20
MAX_SHRINK = 0.5
BATCH = 4                    # windows per block run while capturing
CLIP_CHUNK = 16 * 2 ** 20    # elements of the [groups, tokens, out] error tensor at a time


def awq_block(block: nn.Module, block_prefix: str, inputs: BlockInputs,
              specs: dict[str, QuantSpec]) -> dict[str, QTensor]:
    """Scale (in place), clip and quantize the block's layers named in `specs`."""
    return run(awq_block_job(block, block_prefix, inputs, specs))


def awq_block_job(block: nn.Module, block_prefix: str, inputs: BlockInputs,
                  specs: dict[str, QuantSpec]) -> Job[dict[str, QTensor]]:
    """`awq_block` as a Job: yields after the capture, each group's search and each layer."""
    local = {rel: specs[_full(block_prefix, rel)] for rel, m in block.named_modules()
             if is_linear(m) and _full(block_prefix, rel) in specs}
    groups = [g for g in scaling_groups(block, inputs) if any(rel in local for rel in g.linears)]
    total = 1 + len(groups) + len(local)
    yield Progress(0, total, f"AWQ {block_prefix}: capturing inputs")

    first_inputs = sorted({g.linears[0] for g in groups})
    stats = _window_sample(inputs, STATS_TOKENS)
    clipped = [rel for rel, spec in local.items() if spec.option("clip") and not _skips_clip(rel)]
    x_mean, clip_x = capture_linear_stats(block, stats, first_inputs, clipped)
    calls = capture_calls(block, _window_sample(inputs, SEARCH_TOKENS),
                          sorted({g.inspect for g in groups}))

    for i, group in enumerate(groups):
        spec = next(local[rel] for rel in group.linears if rel in local)
        s = search_scale(block, group, calls[group.inspect], x_mean[group.linears[0]], local,
                         int(spec.option("grid")))
        fold_scales(block, group, s)
        # The captured inputs of the scaled linears now arrive divided by s (as the reference's
        # apply_scale does to input_feat before clipping).
        for rel in group.linears:
            if rel in clip_x:
                clip_x[rel] = clip_x[rel] / s
        yield Progress(1 + i, total, f"AWQ {block_prefix}: scaled {', '.join(group.linears)}")

    qtensors: dict[str, QTensor] = {}
    for j, (rel, spec) in enumerate(local.items()):
        w = weight_matrix(block.get_submodule(rel)).float()
        if rel in clipped:
            max_val = search_clip(w, clip_x[rel], spec)
            gs = effective_group_size(spec.group_size, w.shape[1])
            bound = expand_groups(max_val, gs, w.shape[1])
            w = torch.clamp(w, -bound, bound)
        qtensors[_full(block_prefix, rel)] = quantize_rtn(w, spec)
        yield Progress(1 + len(groups) + j, total, f"AWQ {_full(block_prefix, rel)}")
    return qtensors


def _full(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix else rel


def _skips_clip(rel: str) -> bool:
    # "due to qk bmm, it is hard to clip precisely" (auto_clip.py)
    return role_of(rel, "attn" in rel or "attention" in rel) in ("q", "k")


def windows_used(seqlen: int) -> int:
    """How many calibration windows (the first ones) the block job reads at this length."""
    return _windows_holding(max(STATS_TOKENS, SEARCH_TOKENS), seqlen)


def _windows_holding(tokens: int, seqlen: int) -> int:
    return max(1, math.ceil(tokens / seqlen))


def _window_sample(inputs: BlockInputs, tokens: int) -> BlockInputs:
    """The first windows holding about `tokens` tokens (calibration windows are already random)."""
    count = min(len(inputs), _windows_holding(tokens, inputs.hidden.shape[1]))
    return inputs.with_hidden(inputs.hidden[:count])


# --- capture -------------------------------------------------------------------------------

def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


@torch.no_grad()
def capture_linear_stats(block: nn.Module, inputs: BlockInputs, mean_of: list[str],
                         sample_of: list[str]) -> tuple[dict, dict]:
    """Run the block once: mean |x| per input channel for `mean_of`, and a strided sample of
    CLIP_TOKENS input rows for `sample_of` (both keyed by name in the block)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list[torch.Tensor]] = {rel: [] for rel in sample_of}
    stride = max(1, inputs.hidden.shape[0] * inputs.hidden.shape[1] // CLIP_TOKENS)

    def hook(rel):
        def grab(module, args, kwargs):
            x = _first_arg(args, kwargs)
            x = x.reshape(-1, x.shape[-1]).float()
            if rel in mean_of:
                sums[rel] = sums.get(rel, 0) + x.abs().sum(0)
                counts[rel] = counts.get(rel, 0) + x.shape[0]
            if rel in samples:
                samples[rel].append(x[::stride].clone())
        return grab

    handles = [block.get_submodule(rel).register_forward_pre_hook(hook(rel), with_kwargs=True)
               for rel in sorted(set(mean_of) | set(sample_of))]
    try:
        run_block(block, inputs, batch_size=BATCH)
    finally:
        for handle in handles:
            handle.remove()
    x_mean = {rel: sums[rel] / counts[rel] for rel in sums}
    return x_mean, {rel: torch.cat(chunks) for rel, chunks in samples.items() if chunks}


@torch.no_grad()
def capture_calls(block: nn.Module, inputs: BlockInputs, names: list[str]) -> dict[str, tuple]:
    """The exact (args, kwargs) each named module receives when the block runs on `inputs`
    (one batch), so the search can call that module alone."""
    calls: dict[str, tuple] = {}

    def hook(rel):
        def grab(module, args, kwargs):
            calls[rel] = (args, dict(kwargs))
        return grab

    handles = [block.get_submodule(rel).register_forward_pre_hook(hook(rel), with_kwargs=True)
               for rel in names]
    try:
        run_block(block, inputs, batch_size=len(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _call(module: nn.Module, call: tuple) -> torch.Tensor:
    out = module(*call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


# --- scale search --------------------------------------------------------------------------

@torch.no_grad()
def search_scale(block: nn.Module, group: ScaleGroup, call: tuple, x_mean: torch.Tensor,
                 specs: dict[str, QuantSpec], n_grid: int = 20) -> torch.Tensor:
    """The s (over `n_grid` exponents of x_mean) minimising the inspected module's output error
    with the group's weights fake-quantized as Q(W * s) / s. Leaves the weights as they were."""
    inspect = block.get_submodule(group.inspect)
    linears = [(block.get_submodule(rel), specs.get(rel)) for rel in group.linears]
    originals = [weight_matrix(lin).clone() for lin, _ in linears]
    reference = _call(inspect, call)
    best_loss, best = math.inf, None
    try:
        for step in range(n_grid):
            s = x_mean.pow(step / n_grid).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for (lin, spec), w in zip(linears, originals):
                if spec is not None:  # layers outside AWQ keep their float weights here
                    set_weight_matrix(lin, fake_quant_matrix(w * s, spec) / s)
            loss = (reference - _call(inspect, call)).float().pow(2).mean().item()
            if loss < best_loss:
                best_loss, best = loss, s
    finally:
        for (lin, _), w in zip(linears, originals):
            set_weight_matrix(lin, w)
    if best is None:  # every loss was NaN: keep the block as it is
        best = torch.ones_like(x_mean)
    return best


# --- clip search ---------------------------------------------------------------------------

@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per (output channel, group) max |w| [out, groups] minimising the error of x @ Q(clip(w))^T
    over the reference's shrink grid. `x` [tokens, in] is the layer's (scaled) input sample."""
    out, cols = w.shape
    gs = effective_group_size(spec.group_size, cols)
    groups = -(-cols // gs)
    wg = _pad_groups(w, groups, gs)                    # [out, G, gs]
    xg = _pad_groups(x, groups, gs).transpose(0, 1)    # [G, tokens, gs]
    org_max = wg.abs().amax(dim=-1)  # [out, G]
    best_max = org_max.clone()
    chunk = max(1, CLIP_CHUNK // (groups * xg.shape[1]))
    for start in range(0, out, chunk):
        rows = slice(start, start + chunk)
        w_rows, max_rows, best_rows = wg[rows], org_max[rows], best_max[rows]  # views
        min_err = torch.full_like(max_rows, math.inf)
        for i in range(int(MAX_SHRINK * CLIP_GRID)):
            max_val = max_rows * (1 - i / CLIP_GRID)
            clipped = torch.clamp(w_rows, -max_val[..., None], max_val[..., None])
            delta = _fake_quant_groups(clipped, spec) - w_rows  # [o, G, gs]
            err = torch.bmm(xg, delta.permute(1, 2, 0)).pow(2).mean(dim=1).t()  # [o, G]
            better = err < min_err
            min_err[better] = err[better]
            best_rows[better] = max_val[better]
    return best_max


def fake_quant_matrix(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`grid.fake_quant` in fewer passes (no codes, no repeated scales): the search calls it
    20 times per group."""
    out, cols = w.shape
    gs = effective_group_size(spec.group_size, cols)
    groups = -(-cols // gs)
    return _fake_quant_groups(_pad_groups(w, groups, gs), spec).reshape(out, groups * gs)[:, :cols]


def _pad_groups(w: torch.Tensor, groups: int, gs: int) -> torch.Tensor:
    """[rows, cols] -> [rows, groups, gs], the ragged last group padded with zeros. Zeros change
    nothing: the grid always spans 0, and zero columns add nothing to a product."""
    return nn.functional.pad(w.float(), (0, groups * gs - w.shape[1])).reshape(-1, groups, gs)


def _fake_quant_groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize w [out, G, gs] group by group on the studio's grid (`grid.py`)."""
    scale, zero = qparams_from_range(w.amin(dim=-1), w.amax(dim=-1), spec.bits, spec.symmetric,
                                     spec.scale_dtype)
    scale, zero = scale[..., None], zero[..., None]
    codes = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** spec.bits - 1)
    return scale * (codes - zero)


# --- the method's declaration (studio.core.quant.registry) ------------------------------------
from dataclasses import dataclass  # noqa: E402

from studio.core.quant.registry import Quantizer, option  # noqa: E402


@dataclass(frozen=True)
class AwqOptions:
    grid: int = option(20, low=1, high=1000, title="Scale grid points",
                       help="exponents tried in the per-channel scale search")
    clip: bool = option(True, title="Clip search",
                        help="search each group's clipping range on a token sample")


def _head(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec):
    from studio.core.quant.awq_head import awq_head   # (it imports this file)

    return awq_head(weight, x, spec)


QUANTIZER = Quantizer(
    name="awq", title="AWQ", options=AwqOptions, calibration="block inputs",
    quantize=awq_block_job, windows_used=windows_used, folds_scales=True, quantize_head=_head,
    summary="per-channel scales from mean |activation|, folded into the previous layer",
    llm_compressor="AWQModifier")
