"""The quantization driver: a Plan applied to a copy of the model, block by block.

    variant = run(quantize_job(handle, plan, windows, calib_label, name))

Order of work, as the GPTQ reference does it: capture block 0's inputs, then for every decoder
block quantize its layers with the block's inputs taken from the already-quantized previous
blocks, and run the quantized block to get the next block's inputs. Inside a block:
  1. inputs of the RTN / AWQ / SmoothQuant layers are measured (for their error figures);
  2. AWQ searches and folds its scales (Q2's `awq.awq_block`), RTN and SmoothQuant weights are
     rounded;
  3. GPTQ layers go in "true sequential" order: layers reading the same input form a group
     (q/k/v, then o, then gate/up, then down); each group's Hessian comes from running the block
     only as far as that group, with everything before it already quantized.
SmoothQuant smooths each block just before it is quantized, from the float model's activations
(carried through the blocks as they were, so the scales are the ones `smoothquant.prepare`
finds smoothing the whole model first, as the reference does). Layers outside the blocks
(embeddings, lm_head) are quantized only when a rule names them, after the blocks: the
lm_head (a tied pair as one matrix) under a method that learns from a layer's inputs (GPTQ,
SeqMSE, ...) runs it on the final hidden states (the last quantized block's outputs through
the final norm: its Hessian is collected like any layer's); AWQ runs on an untied lm_head from
the same states, its scales folded into the final norm (`quant/awq_head.py`); an untied
embedding, a tied head under AWQ, or SmoothQuant gets RTN on the method's grid
(`plan_ends.end_method`, the note says why).

For every layer the job reports its relative output error on its calibration inputs and the
error plain RTN of the original weight would give on the same inputs (Progress.detail).
The baseline is never touched: all work happens on a copy (sharing only tensors no step writes
into), published only at the end.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress
from studio.core.layers import (get_module, move_pre_hooks, read_weight_matrix,
                                 replace_module, replace_weight_matrix, weight_matrix)
from studio.core.memory import guard_job, release_freed_memory
from studio.core.plan import Plan, QuantSpec, tied_specs
from studio.core.plan_ends import End, end_method, end_of
from studio.core.quant import layout, registry, smoothquant
from studio.core.quant.awq_head import fold_into_feeder
from studio.core.quant.coded import coded_layer
from studio.core.quant.blocks import (FAST_DTYPE, BlockInputs, Replay, capture_block_inputs,
                                      decoder_blocks, run_block)
from studio.core.quant.entry_points import (call_entry, checked_block, layer_result,
                                            quantizers_of, shared_hessian_results)
from studio.core.quant.grid import QTensor
from studio.core.quant.hessians import BATCH, gather_hessians, input_groups
from studio.core.quant.layer_errors import layer_errors
from studio.core.quant.registry import LayerCalibration
from studio.core.quant.rtn import quantize_weight
from studio.core.streaming import materialise, real, stored_bytes_per_block, streams, watch
from studio.core.variant import Variant, untie_if_needed
from studio.core.variant_stream import CodeStore, stored_or_held

log = logging.getLogger(__name__)

MIN_CALIB_TOKENS = 512    # below this a Hessian or an activation statistic means little
MIN_CALIB_SEQLEN = 16
ERROR_WINDOWS = 8         # windows used to measure errors of layers that need no calibration
# Activations Replay may keep to skip recomputation, as a share of the float32 model's size:
# with the block's inputs, the codes and a batch's temporaries beside them, the job then needs
# no more than about one more model's worth of memory. Only small models reach it (the demo
# at 64 x 512 tokens: its down_proj inputs are recomputed instead, ~15% more time).
REPLAY_SHARE = 0.5


def quantize_job(handle, plan: Plan, windows: torch.Tensor | None, calib_label: str | None,
                 name: str) -> Job[Variant]:
    start = time.perf_counter()
    specs = validate(handle, plan, windows)
    methods = {spec.method for spec in specs.values()}
    count, seqlen = (0, 0) if windows is None else windows.shape
    for method in sorted(methods):
        guard_job(handle, "quantize", method=method, windows=count, seqlen=seqlen)
    if not any(registry.get(m).needs_text for m in methods) and windows is not None:
        windows = windows[:ERROR_WINDOWS]  # RTN needs no data: measure errors on a few windows
        calib_label = None
    prefix, base_blocks = decoder_blocks(handle.model)
    shared = tied_specs(handle.layers, specs)   # {embedding: lm_head}: one matrix
    outside = [n for n in specs if not n.startswith(prefix + ".") and n not in shared]
    learning_head = head_that_learns(handle, specs, outside, shared)
    total = len(specs) + 2
    sq = {n: s for n, s in specs.items() if s.quantizer.smoothing}
    yield Progress(0, total, "Copying the model")
    model = copy_to_quantize(handle.model)
    untie_if_needed(model, {n: s for n, s in specs.items() if n not in shared})
    _, blocks = decoder_blocks(model)
    state = _State(specs, handle.model, total)
    state.replay_budget = replay_budget(handle.model)
    if streams(handle.model):   # each block's codes go to disk when it is done (variant_stream)
        state.qtensors = CodeStore.staging()

    act_bits = {n: int(s.option("act_bits")) for n, s in sq.items()}
    last_smoothed = smoothquant.last_smoothed_block(model, sq) if sq else -1
    inputs = smooth_inputs = None
    if windows is not None:
        yield Progress(0, total, "Capturing the inputs of block 0")
        inputs = capture_block_inputs(model, windows[:windows_carried(methods, windows)])
        if sq:
            smooth_inputs = capture_block_inputs(model, windows)
    for index in range(len(blocks)):
        block_name = f"{prefix}.{index}"
        mine = {n: s for n, s in specs.items() if n.startswith(block_name + ".")}
        if not mine and inputs is None:
            continue
        if mine:
            blocks[index] = copy.deepcopy(blocks[index])   # shared until now: private from here
            materialise(blocks[index])   # a streamed block: read into float32 for its turn
        if index <= last_smoothed:
            yield Progress(len(state.qtensors) + 1, total, f"block {index}: SmoothQuant smoothing")
            smooth_inputs = smooth_block_inputs(blocks[index], block_name,
                                                smooth_inputs.at(index), sq,
                                                act_bits, model, last=index == last_smoothed)
        outputs = yield from quantize_block(blocks[index], block_name, index, len(blocks),
                                            None if inputs is None else inputs.at(index),
                                            mine, state,
                                            want_outputs=index + 1 < len(blocks)
                                            or learning_head is not None)
        if mine:
            share_settled(blocks[index], base_blocks[index], block_name, state.qtensors)
            flush_codes(state.qtensors)
        if outputs is not None:
            inputs = inputs.with_hidden(outputs)
        release_freed_memory()
    head_calib = head_x = None
    if learning_head is not None and inputs is not None:
        yield Progress(len(state.qtensors) + 1, total, f"Hessian of {learning_head}'s inputs")
        head_calib = head_calibration(model, inputs.hidden)
        if specs[learning_head].quantizer.quantize_head is not None:   # AWQ: the rows too
            head_x = head_rows(model, inputs.hidden)
    del inputs
    release_freed_memory()
    for layer in outside:
        yield from quantize_outside(model, layer, specs[layer], state,
                                    head_calib if layer == learning_head else None,
                                    own_end(handle, layer, shared),
                                    head_x if layer == learning_head else None)
    for follower, leader in shared.items():
        if isinstance(state.qtensors, CodeStore):
            state.qtensors.alias(follower, leader)   # stored once, in the leader's file
        else:
            state.qtensors[follower] = state.qtensors[leader]   # the same object: stored once
        state.errors.append({"layer": follower, "block": None, "method": specs[leader].method,
                             "bits": specs[leader].bits, "error": None, "rtn_error": None,
                             "note": f"tied: the codes of {leader}"})
    flush_codes(state.qtensors)
    compact(model, state.qtensors)
    release_freed_memory()

    floats = changed_floats(model, handle.model, state.qtensors)
    yield Progress(total, total, f"Quantized {len(state.qtensors)} layers")
    return Variant(name=name, base_source=handle.source, architecture=handle.architecture,
                   plan=plan, model=model, qtensors=state.qtensors,
                   specs={n: specs[n] for n in state.qtensors}, act_bits=act_bits,
                   calibration=calib_label if windows is not None else None,
                   seconds=time.perf_counter() - start, layer_errors=state.errors,
                   floats=floats)


def replay_budget(model: nn.Module) -> int:
    """Bytes of activations Replay may keep: REPLAY_SHARE of the float32 model, or for a
    streamed model (which holds one block, not the model) twice the largest block."""
    if streams(model):
        return 2 * max(stored_bytes_per_block(model))
    return int(REPLAY_SHARE * 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()
                                                            }.values()))


def windows_carried(methods: set[str], windows: torch.Tensor) -> int:
    """How many calibration windows (the first ones) go through the blocks: methods learning
    from the layers' inputs read all of them unless they declare fewer (`windows_used`: AWQ
    reads its first few); every method's errors come from the first ERROR_WINDOWS. Smoothing
    statistics (SmoothQuant) come from all of them, carried apart."""
    count = ERROR_WINDOWS
    for quantizer in map(registry.get, methods):
        if quantizer.windows_used is not None:
            count = max(count, quantizer.windows_used(windows.shape[1]))
        elif quantizer.calibration != "none":
            return len(windows)
    return count


def copy_to_quantize(base: nn.Module) -> nn.Module:
    """The copy the job works on: new modules, every tensor shared with the baseline.

    Nothing is ever written into a shared tensor. Outside the blocks a quantized layer (an
    lm_head) is given a new tensor (`_State.record`); each block gets its own copy when its
    turn comes and, once it is done, keeps only the tensors that changed (`share_settled`);
    the quantized weights exist only as codes (`compact` makes them the variant's layers at
    the end). The job's peak then holds the baseline, the codes, one block and the
    activations, not a second float model as well."""
    return copy.deepcopy(base, {id(t): t for t in (*base.parameters(), *base.buffers())})


def smooth_block_inputs(block: nn.Module, block_name: str, inputs: BlockInputs,
                        sq: dict[str, QuantSpec], act_bits: dict[str, int], model: nn.Module,
                        last: bool) -> BlockInputs | None:
    """SmoothQuant for one block, just before it is quantized: the scales come from the float
    model's activations (`inputs`, carried through the blocks as they were before smoothing,
    as the reference measures them all first), then the block's SmoothQuant layers get their
    activation quantization. The float model's inputs of the next block (None after the last
    smoothed block: nobody needs them)."""
    outputs = smoothquant.smooth_block(block, block_name, inputs, sq)
    smoothquant.install_act_quant(model, {n: b for n, b in act_bits.items()
                                          if n.startswith(block_name + ".")})
    return None if last else inputs.with_hidden(outputs)


def share_settled(block: nn.Module, base_block: nn.Module, block_name: str,
                  qtensors: dict[str, QTensor]) -> None:
    """After a block is done: its tensors equal to the baseline's share the baseline's again,
    and its quantized weights are held as codes only (the baseline's weight stands in until
    `compact`; no one runs a finished block before then)."""
    quantized = {n[len(block_name) + 1:] for n in qtensors if n.startswith(block_name + ".")}
    for rel, module in block.named_modules():
        base_module = base_block.get_submodule(rel)
        for key, param in list(module._parameters.items()):
            base_param = base_module._parameters.get(key)
            if param is None or base_param is None or param.shape != base_param.shape:
                continue
            if (key == "weight" and rel in quantized) or param is base_param or torch.equal(
                    param, real(base_param)):
                module._parameters[key] = base_param


def flush_codes(qtensors) -> None:
    """A streamed model's finished codes to their file, out of memory (in memory: nothing)."""
    if isinstance(qtensors, CodeStore):
        qtensors.flush()


def compact(model: nn.Module, qtensors: dict[str, QTensor]) -> None:
    """Hold every quantized layer as its codes (`CodedLinear`), sharing its bias: the variant
    keeps no float copy of a quantized weight (the job's, or the baseline's standing in)."""
    for name in qtensors:
        module = get_module(model, name)
        coded = coded_layer(module, stored_or_held(qtensors, name))
        move_pre_hooks(module, coded)
        replace_module(model, name, coded)
        watch(coded)


def quantize_text_job(handle, plan: Plan, calib_path, count: int, seqlen: int, seed: int,
                      name: str, bos: str = "auto") -> Job[Variant]:
    """`quantize_job` with calibration windows cut from a text file (None: the built-in text)
    first, starting with BOS as `bos` says (text.py). The plan is checked before the text is
    read; RTN runs even without usable text."""
    from studio.core.text import text_windows

    needs_text = _needs_windows(handle, plan)  # checks the architecture and the rules too
    if not needs_text:
        validate(handle, plan, None)
    yield Progress(0, 1, "Reading the calibration text")
    try:
        windows, label = text_windows(handle.tokenizer, calib_path, seqlen, count, seed, bos)
    except StudioError:
        if needs_text:
            raise
        windows, label = None, None  # RTN needs no data; only the error figures are skipped
    return (yield from quantize_job(handle, plan, windows, label, name))


def _needs_windows(handle, plan: Plan) -> bool:
    plan.check_architecture(handle.architecture)
    specs = plan.resolve(handle.layers).values()
    return any(s is not None and s.quantizer.needs_text for s in specs)


def relay(job: Job, done: float, total: float):
    """Run a sub-job, passing its messages on within this job's own progress count."""
    try:
        while True:
            p = next(job)
            yield Progress(done, total, p.message)
    except StopIteration as stop:
        return stop.value


def validate(handle, plan: Plan, windows: torch.Tensor | None) -> dict[str, QuantSpec]:
    """Everything checked before any work: {layer: spec} of the layers to quantize."""
    plan.check_architecture(handle.architecture)
    specs = {n: s for n, s in plan.resolve(handle.layers).items() if s is not None}
    if not specs:
        raise StudioError("The plan quantizes no layer: give a default spec or a rule.")
    needs = sorted({s.method for s in specs.values() if s.quantizer.needs_text})
    if needs:
        if windows is None:
            raise StudioError(f"{', '.join(m.upper() for m in needs)} needs calibration text.")
        if windows.dim() != 2 or windows.shape[1] < MIN_CALIB_SEQLEN:
            raise StudioError(f"Calibration windows must hold at least {MIN_CALIB_SEQLEN} "
                              f"tokens each.")
        if windows.numel() < MIN_CALIB_TOKENS:
            raise StudioError(f"The calibration text gives only {windows.numel()} tokens; "
                              f"{', '.join(m.upper() for m in needs)} needs at least "
                              f"{MIN_CALIB_TOKENS}. Use a longer text or more windows.")
    folding = tuple(sorted({s.method for s in specs.values() if s.quantizer.folds_scales}))
    if folding:
        # Their scales fold into norms and linears found by tracing a block (layout.py): a
        # block with nothing to fold into is refused here, before any calibration work.
        layout.discover(handle.model)
        layout.check_groups(handle.model, specs, folding)
    return specs


class _State:
    """What the job builds on the side: QTensors, per-layer errors, progress count."""

    def __init__(self, specs: dict[str, QuantSpec], base: nn.Module, total: int) -> None:
        self.specs, self.base, self.total = specs, base, total
        self.qtensors: dict[str, QTensor] = {}
        self.errors: list[dict] = []
        self.replay_budget: int | None = None   # bytes Replay may keep (None: no bound)

    def record(self, name: str, block: int | None, spec: QuantSpec, qt: QTensor,
               model_module: nn.Module, w_pre: torch.Tensor | None,
               hessian: torch.Tensor | None, note: str = "", install: bool = True) -> Progress:
        """Install the de-quantized weight (a new tensor: the old one may be the baseline's),
        note the errors; the Progress to yield. `install=False` for a layer nothing runs
        before `compact` makes it codes (outside the blocks: an lm_head's float32 copy would
        be half the model on a large vocabulary)."""
        error = rtn_error = None
        measured = hessian is not None and w_pre is not None
        w_q = qt.dequantize() if measured or install else None
        if measured:
            error, rtn_error = layer_errors(w_pre, weight_matrix(model_module).float(), w_q,
                                            spec, read_weight_matrix(get_module(self.base, name)),
                                            hessian)
        if install:
            replace_weight_matrix(model_module, w_q)
        self.qtensors[name] = qt
        entry = {"layer": name, "block": block, "method": spec.method, "bits": spec.bits,
                 "error": error, "rtn_error": rtn_error, "note": note}
        self.errors.append(entry)
        where = f"block {block}: " if block is not None else ""
        return Progress(len(self.qtensors) + 1, self.total,
                        f"{where}{spec.method.upper()} {name}" + (f" ({note})" if note else ""),
                        detail=dict(entry))


def quantize_block(block: nn.Module, block_name: str, index: int, count: int,
                   inputs: BlockInputs | None, specs: dict[str, QuantSpec], state: _State,
                   want_outputs: bool = False) -> Job[torch.Tensor | None]:
    """Quantize the block's layers in `specs`; the block's outputs (the next block's inputs)
    when `want_outputs` and there are inputs."""
    label = f"block {index} of {count}"
    yield Progress(len(state.qtensors) + 1, state.total, f"{label}: measuring inputs")
    rel = {n[len(block_name) + 1:]: s for n, s in specs.items()}
    groups = input_groups(block, inputs) if inputs is not None else [[r] for r in rel]
    # Layers quantized from the block's inputs as they arrive (or from nothing); the
    # "hessian" ones come after, true-sequential.
    later = {r: s for r, s in rel.items() if s.quantizer.calibration != "hessian"}
    # Their inputs' statistics: from every carried window when a method learns from them,
    # else from the first ERROR_WINDOWS (the error figures only).
    learns = any(s.quantizer.calibration == "activations" for s in later.values())
    hessians = gather_hessians(block, inputs, list(later), None if learns else ERROR_WINDOWS) \
        if later and inputs is not None else {}
    tokens = 0 if inputs is None else inputs.hidden.shape[0] * inputs.hidden.shape[1]
    w_pre = {r: weight_matrix(block.get_submodule(r)).float().clone() for r in later}

    from_block: dict[str, object] = {}   # "block inputs" methods (AWQ): the block at once
    for quantizer in quantizers_of(later.values(), "block inputs"):
        mine = {f"{block_name}.{r}": s for r, s in later.items() if s.method == quantizer.name}
        got = yield from relay(call_entry(quantizer, block_name, quantizer.quantize, block,
                                          block_name, inputs, mine),
                               len(state.qtensors) + 1, state.total)
        from_block.update(checked_block(quantizer, got, mine, block, block_name))
    for r, spec in later.items():
        full = f"{block_name}.{r}"
        module = block.get_submodule(r)
        quantizer = spec.quantizer
        if full in from_block:
            qt, note = from_block[full], ""
        else:
            calib = LayerCalibration(hessians[r], tokens) \
                if quantizer.calibration == "activations" else None
            qt, note = layer_result(quantizer, full, module, call_entry(
                quantizer, full, quantizer.quantize, weight_matrix(module).float(), spec, calib))
        yield state.record(full, index, spec, qt, module, w_pre[r], hessians.get(r), note)
    del hessians, w_pre

    # "hessian" methods (GPTQ), true-sequential: each group's Hessian from the block run as
    # far as that group, everything before it already quantized; parts of the block that can
    # no longer change are served from memory (Replay) instead of being computed again.
    pending = {r for r, s in rel.items() if s.quantizer.calibration == "hessian"}
    replay = Replay(block, [r for group in groups for r in group], pending,
                    len(inputs) if inputs is not None else 0, state.replay_budget)
    batches = -(-len(inputs) // BATCH) if inputs is not None else 0
    for group in groups:
        todo = [r for r in group if r in pending]
        if not todo:
            continue
        yield Progress(len(state.qtensors) + 1, state.total,
                       f"{label}: Hessian for {', '.join(todo)}")
        # The group's linears read one input: its first linear's Hessian serves them all, and
        # the block need run no further than that linear.
        with replay.active(batches, stop_at=group[0]):
            h = gather_hessians(block, inputs, [group[0]], None, stop_at=group[0],
                                dtype=FAST_DTYPE)[group[0]]
        release_freed_memory()  # the run's temporaries, before the next run's differ in size
        calib = LayerCalibration(h, tokens)
        weights = {r: weight_matrix(block.get_submodule(r)).float().clone() for r in todo}
        results = {}
        for quantizer in quantizers_of((rel[r] for r in todo), "hessian"):
            names = [r for r in todo if rel[r].method == quantizer.name]
            results.update(zip(names, shared_hessian_results(
                quantizer, block_name, names, weights, calib, rel, block)))
        for r in todo:
            qt, note = results[r]
            yield state.record(f"{block_name}.{r}", index, rel[r], qt, block.get_submodule(r),
                               weights[r], h, note)
        replay.settle(todo)
        del h, weights, results, calib
        release_freed_memory()  # n x n temporaries, before the next run keeps more
    if not want_outputs or inputs is None:
        return None
    with replay.active(batches, record=False):
        return run_block(block, inputs, BATCH, FAST_DTYPE, out=inputs.hidden)


def own_end(handle, name: str, shared: dict[str, str]):
    """The End `name` is quantized as: a tied pair planned alike is one matrix (both sides);
    planned apart (each stored), each side is its own end."""
    end = end_of(handle.layers, name)
    if end is None or not end.tied or name in shared or name in shared.values():
        return end
    index = end.names.index(name)
    return End(end.roles[index], (name,), (end.roles[index],))


def head_that_learns(handle, specs: dict[str, QuantSpec], outside: list[str],
                     shared: dict[str, str]) -> str | None:
    """The lm_head when its spec's method learns from its inputs and can run there (its own
    matrix: `plan_ends.end_method`), so the job collects its inputs' Hessian; else None."""
    for name in outside:
        end = own_end(handle, name, shared)
        spec = specs[name]
        if (end is not None and "lm_head" in end.roles and spec.quantizer.calibration != "none"
                and end_method(end, spec.method)[0] == spec.method):
            return name
    return None


def head_calibration(model: nn.Module, hidden: torch.Tensor) -> LayerCalibration:
    """H = 2/n X X^T of what the lm_head reads: the last block's outputs `hidden` [n, seq, d]
    (from the quantized blocks, as GPTQ takes every layer's inputs) through the final norm."""
    from studio.core.quant.gptq import HessianAccumulator
    from studio.core.sensitivity import head_input

    to_head = head_input(model)
    accumulator = None
    with torch.no_grad():
        for batch in hidden.split(BATCH):
            x = to_head(batch.float())
            accumulator = accumulator or HessianAccumulator(x.shape[-1])
            accumulator.add(x)
    return LayerCalibration(accumulator.hessian(), accumulator.count)


def head_rows(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the lm_head reads, one row per token [n * seq, d]: the last block's outputs
    `hidden` through the final norm (AWQ's statistics and search sample)."""
    from studio.core.sensitivity import head_input

    to_head = head_input(model)
    with torch.no_grad():
        return torch.cat([to_head(batch.float()).reshape(-1, batch.shape[-1])
                          for batch in hidden.split(BATCH)])


def quantize_outside(model: nn.Module, name: str, spec: QuantSpec, state: _State,
                     calib: LayerCalibration | None = None, end=None,
                     rows: torch.Tensor | None = None) -> Job[None]:
    """A layer outside the blocks (embedding, lm_head): its own method when that needs no
    calibration, or learns from the layer's inputs and `calib` holds the head's (`rows`, the
    inputs themselves, for a method quantizing a head from them: AWQ); else RTN on the
    method's grid (the note says why: `plan_ends.end_method`)."""
    module = get_module(model, name)
    materialise(module)   # (streamed: the layer's own float32 copy)
    quantizer = spec.quantizer
    runs, note = end_method(end, spec.method) if end is not None else (spec.method, "")
    w_pre = None
    if quantizer.calibration == "none" and not quantizer.smoothing:
        qt, note = layer_result(quantizer, name, module, call_entry(
            quantizer, name, quantizer.quantize, weight_matrix(module).float(), spec, None))
    elif runs == spec.method and quantizer.quantize_head is not None and rows is not None:
        # AWQ on an untied head: codes of W s, s folded into the final norm; the module holds
        # W s until `compact` (the error figures recover the fold, `layer_errors`).
        w_pre = weight_matrix(module).float()
        qt, s = quantizer.quantize_head(w_pre, rows, spec)
        fold_into_feeder(model, s)
        replace_weight_matrix(module, w_pre * s)
    elif runs == spec.method and calib is not None:
        w_pre = weight_matrix(module).float()
        qt, own = layer_result(quantizer, name, module, call_entry(
            quantizer, name, quantizer.quantize, w_pre, spec, calib))
        note = "; ".join(n for n in (note, own) if n)
    else:
        note = note or (f"outside the blocks, so {registry.REFERENCE.upper()} instead of "
                        f"{spec.method}")
        qt = quantize_weight(weight_matrix(module), spec, mse_clip=False)
    yield state.record(name, None, spec, qt, module, w_pre,
                       None if calib is None else calib.hessian, note, install=False)


def changed_floats(model: nn.Module, base: nn.Module,
                   qtensors: dict[str, QTensor]) -> dict[str, torch.Tensor]:
    """Float tensors of `model` that differ from the baseline, other than quantized weights."""
    quantized = {f"{n}.weight" for n in qtensors}
    base_tensors = dict(base.named_parameters(remove_duplicate=False))
    base_tensors.update(dict(base.named_buffers(remove_duplicate=False)))
    changed = {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for key, value in tensors.items():
        if key in quantized or key not in base_tensors or value is base_tensors[key]:
            continue
        if value.shape != base_tensors[key].shape or not torch.equal(value,
                                                                     real(base_tensors[key])):
            changed[key] = value.detach().clone()
    return changed
