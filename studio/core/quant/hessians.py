"""What a block's linears read while the block runs: which linears share an input (the
true-sequential groups GPTQ goes through) and the Hessians H = 2/n X X^T of those inputs."""
from __future__ import annotations

import torch
from torch import nn

from studio.core.layers import is_linear
from studio.core.quant.blocks import BlockInputs, run_block, run_block_until
from studio.core.quant.gptq import HessianAccumulator

BATCH = 4                 # windows per block run (8 took ~100 MB more of temporaries, no faster)


def input_groups(block: nn.Module, inputs: BlockInputs) -> list[list[str]]:
    """The block's linears grouped by the input they read, in the order the block runs them
    (found by running one window): [[q, k, v], [o], [gate, up], [down]] for Llama."""
    order: list[tuple[str, torch.Tensor]] = []

    def hook(rel):
        def seen(module, args):
            order.append((rel, args[0]))
        return seen

    handles = [m.register_forward_pre_hook(hook(r)) for r, m in block.named_modules()
               if is_linear(m)]
    try:
        run_block(block, BlockInputs(inputs.hidden[:1], inputs.kwargs, inputs.args), 1)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for rel, x in order:
        for tensor, names in groups:
            if tensor is x:
                names.append(rel)
                break
        else:
            groups.append((x, [rel]))
    return [names for _, names in groups]


def gather_hessians(block: nn.Module, inputs: BlockInputs, names: list[str],
                    max_windows: int | None, stop_at: str | None = None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """H = 2/n X X^T of each named linear's inputs while the block runs on `inputs` (the first
    `max_windows` of them), stopping at `stop_at`'s input when given. Linears reading the same
    input tensor share one accumulator."""
    if max_windows is not None:
        inputs = BlockInputs(inputs.hidden[:max_windows], inputs.kwargs, inputs.args)
    owner: dict[str, HessianAccumulator] = {}
    batch_seen: list[tuple[torch.Tensor, HessianAccumulator]] = []

    def hook(rel):
        def add(module, args):
            x = args[0]
            for tensor, acc in batch_seen:
                if tensor is x:  # another linear already added this very input
                    owner.setdefault(rel, acc)
                    return
            acc = owner.setdefault(rel, HessianAccumulator(x.shape[-1]))
            acc.add(x)
            batch_seen.append((x, acc))
        return add

    def new_batch(module, args, kwargs):
        batch_seen.clear()

    handles = [block.register_forward_pre_hook(new_batch, with_kwargs=True)]
    handles += [block.get_submodule(r).register_forward_pre_hook(hook(r)) for r in names]
    try:
        if stop_at is None:
            run_block(block, inputs, BATCH, dtype)
        else:
            run_block_until(block, inputs, block.get_submodule(stop_at), BATCH, dtype)
    finally:
        for h in handles:
            h.remove()
        batch_seen.clear()
    return {r: owner[r].hessian() for r in names if r in owner}
