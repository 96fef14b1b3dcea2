"""A decoder block's scaling groups, discovered from the block itself instead of listed per family.

AWQ and SmoothQuant fold a per-channel scale s into "the op that produces a linear's input" and
its inverse into the linear (scaling.py). Which ops those are differs between families: Llama's
post_attention_layernorm feeds the MLP, Gemma-2/3's feeds nothing (it normalises the attention
output; pre_feedforward_layernorm feeds the MLP), Phi-3 reads one fused qkv_proj and splits
gate_up_proj's rows in two, GPT-2 stores its linears transposed. A table of names per block class
has to be extended for every new family and is silently wrong when a family reuses a name for
something else, so the groups are found by running the block once:

1. Trace: one forward of the block on a few tokens, with hooks recording every norm's output
   tensor and every linear's input tensor and the order modules ran in.
2. Candidates: a norm whose output tensor *is* some linears' input (the same tensor object: no op
   between them) proposes (norm -> those linears); a linear P and a later linear C with C's
   input width equal to P's output width, or to one contiguous slice of it (fused qkv, gate_up),
   propose (P's rows -> C).
3. Proof: each candidate is folded with random positive scales into a copy of the block, which
   is run again on the same inputs; it is kept only when the block's output is unchanged (to
   1e-4 of its contribution). That is the property AWQ and SmoothQuant rely on, checked rather
   than assumed, so v -> o under grouped-query attention, gate -> down through SiLU, c_fc -> c_proj
   through GELU or a post-norm OPT-350m block are refused by the same rule that accepts
   up -> down, fc1 -> relu -> fc2 or Phi-3's up half of gate_up -> down.

Blocks of one model that have the same structure share the result (checked once per distinct
block), and each block carries its groups as an attribute that deep copies keep. On the demo the
discovery costs one block forward per candidate on 16 tokens.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.layers import is_linear, weight_matrix
from studio.core.streaming import materialise
from studio.core.quant.blocks import BlockInputs, call_block, capture_block_inputs, decoder_blocks
from studio.core.quant.scaling import ScaleGroup, fold_scales, is_norm

ATTRIBUTE = "_studio_scale_groups"   # where a block keeps its groups (deepcopy carries it)
TRACE_TOKENS = 16
TOLERANCE = 1e-4                     # of the block's own contribution (output - input)


def scaling_groups(block: nn.Module, inputs: BlockInputs | None = None) -> list[ScaleGroup]:
    """The block's scaling groups in the order the block runs them; discovered on `inputs`
    when the block has not been (see `discover`)."""
    groups = getattr(block, ATTRIBUTE, None)
    if groups is None:
        if inputs is None:
            raise StudioError(f"The scaling groups of this {type(block).__name__} were not "
                              f"discovered; run layout.discover(model) first.")
        groups = discover_block(block, inputs)
        setattr(block, ATTRIBUTE, groups)
    return list(groups)


@torch.no_grad()
def discover(model: nn.Module) -> None:
    """Give every decoder block of `model` its scaling groups (a no-op when they have them):
    one forward on a few seeded tokens, one proof per candidate per distinct block."""
    _, blocks = decoder_blocks(model)
    if all(hasattr(block, ATTRIBUTE) for block in blocks):
        return
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, TRACE_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, ids)
    hidden = inputs.hidden
    found: dict[tuple, list[ScaleGroup]] = {}
    for index, block in enumerate(blocks):
        mine = inputs.at(index).with_hidden(hidden)
        key = signature(block)
        if key not in found:
            found[key] = discover_block(block, mine)
        setattr(block, ATTRIBUTE, found[key])
        hidden = call_block(block, hidden, mine)


def signature(block: nn.Module) -> tuple:
    """What decides a block's groups: its modules' names, kinds and weight shapes."""
    return (type(block).__name__,) + tuple(
        (name, type(m).__name__, tuple(getattr(m, "weight", torch.empty(0)).shape))
        for name, m in block.named_modules())


@torch.no_grad()
def discover_block(block: nn.Module, inputs: BlockInputs) -> list[ScaleGroup]:
    """The proven scaling groups of one block, traced on the first window of `inputs`."""
    inputs = inputs.with_hidden(inputs.hidden[:1])
    trace = _Trace(block)
    try:
        reference = call_block(block, inputs.hidden, inputs)
    finally:
        trace.remove()
    contribution = (reference - inputs.hidden).abs().max().item()
    work = copy.deepcopy(block)
    materialise(work)   # a streamed block: folds need weights of its own
    if hasattr(work, ATTRIBUTE):
        delattr(work, ATTRIBUTE)
    generator = torch.Generator().manual_seed(0)
    proven = []
    for group in trace.candidates():
        width = weight_matrix(work.get_submodule(group.linears[0])).shape[1]
        s = torch.empty(width).uniform_(0.5, 2.0, generator=generator)
        if _fold_keeps_output(work, group, s, inputs, reference, contribution):
            proven.append(group)
    return _ordered(proven, trace.order)


class _Trace:
    """Hooks recording norms' outputs, linears' inputs and the order modules first ran in."""

    def __init__(self, block: nn.Module) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.order: dict[str, int] = {}
        self.linears = [n for n, m in block.named_modules() if is_linear(m)]
        self.norms = [n for n, m in block.named_modules() if n and is_norm(m)]
        self.hooks = []
        for name in self.linears:
            self.hooks.append(block.get_submodule(name).register_forward_pre_hook(
                self._grab_input(name), with_kwargs=True))
        for name in self.linears + self.norms:
            self.hooks.append(block.get_submodule(name).register_forward_hook(
                self._grab_output(name)))

    def _grab_input(self, name):
        def hook(module, args, kwargs):
            self.inputs.setdefault(name, args[0] if args else kwargs.get("input"))
        return hook

    def _grab_output(self, name):
        def hook(module, args, output):
            self.outputs.setdefault(name, output)
            self.order.setdefault(name, len(self.order))
        return hook

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def readers(self, norm: str) -> tuple[str, ...]:
        out = self.outputs.get(norm)
        return tuple(n for n in self.linears if out is not None and self.inputs.get(n) is out)

    def candidates(self) -> list[ScaleGroup]:
        groups, read_norm = [], set()
        for norm in self.norms:
            readers = self.readers(norm)
            if readers:
                groups.append(ScaleGroup(norm, readers, _inspect(readers), True))
                read_norm.update(readers)
        ran = sorted((n for n in self.linears if n in self.order), key=self.order.get)
        for i, prev in enumerate(ran):
            rows = self.shape(prev)[0]
            for reader in ran[i + 1:]:
                if reader in read_norm:
                    continue
                width = self.shape(reader)[1]
                for span in _spans(rows, width):
                    groups.append(ScaleGroup(prev, (reader,), reader, False, span))
        return groups

    def shape(self, name: str) -> tuple[int, int]:
        """[out, in] of a traced linear, from the tensors it saw (GPT-2's Conv1D included)."""
        return self.outputs[name].shape[-1], self.inputs[name].shape[-1]


def _spans(rows: int, width: int) -> list[tuple[int, int] | None]:
    """Where a reader of `width` inputs can sit in a producer's `rows` outputs: all of them, or
    one of the equal slices of a fused producer (qkv, gate_up), or its last `width` rows."""
    if rows == width:
        return [None]
    if rows < width:
        return []
    starts = sorted(set(range(0, rows - width + 1, width)) | {rows - width})
    return [(start, start + width) for start in starts]


def _inspect(readers: tuple[str, ...]) -> str:
    """The module whose output judges a norm group's scales (AWQ's module2inspect): the
    smallest module holding all the readers (self_attn, mlp), or the reader itself when it sits
    directly in the block."""
    parts = [r.split(".") for r in readers]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if len(readers) == 1:
        common = common[:-1]
    return ".".join(common) or readers[0]


def _fold_keeps_output(work: nn.Module, group: ScaleGroup, s: torch.Tensor, inputs: BlockInputs,
                       reference: torch.Tensor, contribution: float) -> bool:
    touched = [work.get_submodule(group.prev)] + [work.get_submodule(n) for n in group.linears]
    saved = [(p, p.detach().clone()) for m in touched for p in m.parameters(recurse=False)]
    try:
        fold_scales(work, group, s)
        out = call_block(work, inputs.hidden, inputs)
        return bool(torch.isfinite(out).all()) and (
            (out - reference).abs().max().item() <= TOLERANCE * max(contribution, 1e-12))
    except (ValueError, StudioError, RuntimeError):
        return False  # a fold the op cannot take (a norm kind we cannot scale, shapes)
    finally:
        for param, value in saved:
            param.data.copy_(value)


def _ordered(groups: list[ScaleGroup], order: dict[str, int]) -> list[ScaleGroup]:
    """In the order the reference searches them: by when the scaled op runs."""
    return sorted(groups, key=lambda g: (order.get(g.prev, 0), not g.norm_preceded))


def check_groups(model: nn.Module, specs: dict, methods: tuple[str, ...]) -> None:
    """Refuse before any work a plan whose layers of `methods` (those folding scales: AWQ,
    SmoothQuant) sit in blocks where no norm group was found, naming what is missing."""
    prefix, blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        mine = sorted({s.method for n, s in specs.items()
                       if n.startswith(name + ".") and s.method in methods})
        if not mine:
            continue
        groups = scaling_groups(block)
        if not any(g.norm_preceded for g in groups):
            norms = [n for n, m in block.named_modules() if n and is_norm(m)]
            what = (f"its norms ({', '.join(norms)}) each feed something besides linears, or "
                    f"nothing a linear reads directly" if norms else "it has no norm layer")
            raise StudioError(f"{' and '.join(m.upper() for m in mine)} cannot scale the "
                              f"{type(block).__name__} blocks of this model: {what}, so no "
                              f"scale can be folded away exactly. Use RTN or GPTQ for it.")
