"""The decoder blocks of a causal LM, and the inputs they receive, for block-by-block quantization.

GPTQ, AWQ and SmoothQuant all work one transformer block at a time (as the reference code does):
capture what the model feeds block 0 (hidden states plus the keyword arguments it passes every
block: attention mask, rotary position embeddings, ...) by stopping the forward at block 0, then
run each block on those inputs and feed its outputs to the next block.

Windows are captured one at a time (batch 1) so every captured keyword tensor has batch size 1
and broadcasts over any batch `run_block` later uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from studio.core.errors import StudioError

# Where Hugging Face causal LMs keep their decoder blocks, most common first.
BLOCK_PATHS = (
    "model.layers",              # Llama, Mistral, Qwen2, Gemma, Phi-3, ...
    "model.decoder.layers",      # OPT
    "transformer.h",             # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",           # GPT-NeoX, Pythia
    "transformer.blocks",        # MPT
    "model.language_model.layers",
)
# Keyword arguments that would make a block keep or return a KV cache.
_CACHE_KWARGS = {"past_key_values": None, "past_key_value": None, "layer_past": None,
                 "use_cache": False, "output_attentions": False}


@dataclass
class BlockInputs:
    hidden: torch.Tensor                       # [n, seq, d]: one row per calibration window
    kwargs: dict = field(default_factory=dict)  # what the model passes every block (batch 1)
    args: tuple = ()                           # positional arguments after the hidden states

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        return BlockInputs(hidden, self.kwargs, self.args)


class _StopForward(Exception):
    """Raised by a hook to end a forward once it has what it needs."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks): e.g. ("model.layers", the ModuleList of decoder layers)."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    # An unknown layout: the longest ModuleList is the stack of blocks in every LM we know.
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise StudioError(f"{type(model).__name__} has no stack of decoder blocks this studio "
                          f"recognises, so it cannot be quantized block by block.")
    return max(lists, key=lambda item: len(item[1]))


def capture_block_inputs(model: nn.Module, windows: torch.Tensor) -> BlockInputs:
    """Run the model on each window [n, seq] until block 0 and keep what block 0 receives."""
    _, blocks = decoder_blocks(model)
    hidden: list[torch.Tensor] = []
    kept: dict = {}

    def grab(module, args, kwargs):
        if "hidden_states" in kwargs:
            hidden.append(kwargs["hidden_states"].detach())
            rest = args
        else:
            hidden.append(args[0].detach())
            rest = args[1:]
        if not kept:
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw.update({k: v for k, v in _CACHE_KWARGS.items() if k in kw})
            kept["kwargs"], kept["args"] = kw, tuple(None if _is_cache(a) else a for a in rest)
        raise _StopForward

    hook = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in windows:
                try:
                    model(input_ids=row[None], use_cache=False)
                except _StopForward:
                    pass
    finally:
        hook.remove()
    if not hidden:
        raise StudioError("No calibration windows were given.")
    return BlockInputs(torch.cat(hidden), kept.get("kwargs", {}), kept.get("args", ()))


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache")


def call_block(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    out = block(hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int = 8) -> torch.Tensor:
    """The block's outputs [n, seq, d] for every captured window, computed in batches."""
    outs = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            outs.append(call_block(block, inputs.hidden[start: start + batch_size], inputs))
    return torch.cat(outs)


def run_block_until(block: nn.Module, inputs: BlockInputs, stop_at: nn.Module,
                    batch_size: int = 8) -> None:
    """Run the block on every batch only as far as `stop_at`'s input (hooks see that input).

    Saves the rest of the block's work when only the inputs of an early layer are wanted.
    """
    def stop(module, args):
        raise _StopForward

    hook = stop_at.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                try:
                    call_block(block, inputs.hidden[start: start + batch_size], inputs)
                except _StopForward:
                    pass
    finally:
        hook.remove()
