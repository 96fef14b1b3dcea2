"""The decoder blocks of a causal LM, and the inputs they receive, for block-by-block quantization.

GPTQ, AWQ and SmoothQuant all work one transformer block at a time (as the reference code does):
capture what the model feeds block 0 (hidden states plus the keyword arguments it passes every
block: attention mask, rotary position embeddings, ...) by stopping the forward at block 0, then
run each block on those inputs and feed its outputs to the next block.

Windows are captured one at a time (batch 1) so every captured keyword tensor has batch size 1
and broadcasts over any batch `run_block` later uses.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.layers import is_linear

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
    kwargs: dict = field(default_factory=dict)  # what the model passes the block (batch 1)
    args: tuple = ()                           # positional arguments after the hidden states
    # (args, kwargs) each block received, when captured: Gemma-2/3 give their sliding- and
    # full-attention layers different masks and rotary embeddings, so block 0's are not every
    # block's. `at(i)` selects block i's.
    per_block: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        return BlockInputs(hidden, self.kwargs, self.args, self.per_block)

    def at(self, index: int) -> "BlockInputs":
        """These hidden states with the arguments block `index` receives."""
        if index >= len(self.per_block):
            return self
        args, kwargs = self.per_block[index]
        return BlockInputs(self.hidden, kwargs, args, self.per_block)


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
    """Run the model on each window [n, seq] until block 0 and keep what block 0 receives; the
    first window goes on to the last block (never the lm_head) so every block's own keyword
    arguments are kept too (`BlockInputs.at`)."""
    _, blocks = decoder_blocks(model)
    hidden: list[torch.Tensor] = []
    per_block: list[tuple[tuple, dict]] = []

    def arguments(args, kwargs) -> tuple[tuple, dict]:
        rest = args if "hidden_states" in kwargs else args[1:]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw.update({k: v for k, v in _CACHE_KWARGS.items() if k in kw})
        return tuple(None if _is_cache(a) else a for a in rest), kw

    def grab(module, args, kwargs):
        hidden.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())
        first = not per_block
        if first:
            per_block.append(arguments(args, kwargs))
        if not first or len(blocks) == 1:
            raise _StopForward  # (the first window runs on through the blocks)

    def follow(index):
        def hook(module, args, kwargs):
            per_block.append(arguments(args, kwargs))
            if index == len(blocks) - 1:
                raise _StopForward
        return hook

    hooks = [blocks[0].register_forward_pre_hook(grab, with_kwargs=True)]
    hooks += [block.register_forward_pre_hook(follow(i), with_kwargs=True)
              for i, block in enumerate(blocks) if i > 0]
    try:
        with torch.no_grad():
            for row in windows:
                try:
                    model(input_ids=row[None], use_cache=False)
                except _StopForward:
                    pass
                for hook in hooks[1:]:
                    hook.remove()
    finally:
        for hook in hooks:
            hook.remove()
    if not hidden:
        raise StudioError("No calibration windows were given.")
    args, kwargs = per_block[0]
    return BlockInputs(torch.cat(hidden), kwargs, args, per_block)


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache")


def _native_bf16() -> bool:
    """bf16 products beat float32 only where the CPU multiplies bf16 natively (AVX512-BF16,
    AMX); elsewhere oneDNN emulates them, slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


# Block runs that only gather statistics or carry activations to the next block may compute in
# bfloat16 where the CPU multiplies it natively (about twice float32's speed here): the
# residual stream, norms and every statistic stay float32. Elsewhere float32 throughout.
FAST_DTYPE: torch.dtype | None = torch.bfloat16 if _native_bf16() else None


def compute_context(dtype: torch.dtype | None):
    """Autocast for one block run (entered and left around each call, never across a yield)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def call_block(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    with compute_context(dtype):
        out = block(hidden, *inputs.args, **inputs.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(hidden.dtype)


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int = 8,
              dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The block's outputs [n, seq, d] for every captured window, computed in batches and
    written into `out` (allocated once when None). `out` may be `inputs.hidden` itself: each
    batch is read before its outputs are written, and the calibration set's activations are
    then held once instead of twice (no concatenation of a list of batches either)."""
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            y = call_block(block, inputs.hidden[start: start + batch_size], inputs, dtype)
            if out is None:
                out = torch.empty((len(inputs), *y.shape[1:]), dtype=y.dtype)
            out[start: start + y.shape[0]].copy_(y)
            del y
    return out


def run_block_until(block: nn.Module, inputs: BlockInputs, stop_at: nn.Module,
                    batch_size: int = 8, dtype: torch.dtype | None = None) -> None:
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
                    call_block(block, inputs.hidden[start: start + batch_size], inputs, dtype)
                except _StopForward:
                    pass
    finally:
        hook.remove()


class Replay:
    """Serves a block's settled parts from memory instead of computing them again.

    True-sequential GPTQ runs a block once per group of linears. Once every linear inside a
    direct child of the block (Llama's self_attn and mlp, GPT-2's attn and mlp) is final, and
    so is everything that runs before it, that child's output can no longer change:
      - its output is recorded the first time it runs complete, and served from then on;
      - better still, when the child's last linear L was the group just quantized, the pass
        that gathered L's Hessian saw L's input: the child's output is then L(that input),
        one product instead of the whole child (attention included). This shortcut is checked
        against the real child on the first batch and dropped if the two differ.
    `settle` is told which linears are final; `active()` wraps each run.

    What it keeps is bounded by `budget` bytes (None: unbounded): a recording that would not fit
    beside the ones alive is not taken, and that part is computed again instead.
    """

    def __init__(self, block: nn.Module, order: list[str], pending: set[str], rows: int,
                 budget: int | None = None) -> None:
        self.block = block
        self.budget = budget
        self.live: weakref.WeakSet[Stash] = weakref.WeakSet()  # what is kept, while it is
        self.rows = rows                     # calibration windows, summed over the batches
        self.order = order                   # the block's linears in the order they run
        self.pending = set(pending)          # linears (names relative to the block) not final
        self.children = {}                   # child -> index of its last linear in `order`
        for name, child in block.named_children():
            mine = [i for i, rel in enumerate(order) if rel.startswith(name + ".")]
            if mine and len(mine) == sum(1 for m in child.modules() if is_linear(m)):
                self.children[name] = max(mine)
        self.recorded: dict[str, list] = {}
        self.inputs: dict[str, list] = {}    # last linear of a child -> its input per batch
        self.failed: set[str] = set()        # children whose shortcut did not hold

    def settle(self, names) -> None:
        self.pending -= set(names)

    def _settled(self, child: str) -> bool:
        """Its own linears and every linear that runs before them are final."""
        return not any(rel in self.pending for rel in self.order[: self.children[child] + 1])

    def _last_linear(self, child: str) -> str:
        return self.order[self.children[child]]

    def stash(self) -> "Stash":
        """A Stash for all rows, admitted only while the kept ones leave room for it."""
        stash = Stash(self.rows, self._room)
        self.live.add(stash)
        return stash

    def _room(self, nbytes: int) -> bool:
        if self.budget is None:
            return True
        return sum(s.nbytes for s in list(self.live)) + nbytes <= self.budget

    @contextlib.contextmanager
    def active(self, batches: int, stop_at: str | None = None, record: bool = True):
        """Within: settled children are served (recorded outputs, or the shortcut), others that
        just settled are recorded; `stop_at`'s inputs are kept when it ends a child.
        Recordings are kept only when complete for every one of the `batches`; the block's last
        run passes `record=False`, since nothing would read them."""
        swapped, hooks, fresh = {}, [], {}
        for child in self.children:
            if not self._settled(child):
                continue
            module = getattr(self.block, child)
            last = self._last_linear(child)
            if child in self.recorded:
                stand_in = _Served(self.recorded[child])
            elif last in self.inputs and child not in self.failed:
                stand_in = _Shortcut(module, self.block.get_submodule(last), self.inputs[last],
                                     self.stash() if record else None)
            elif not record:
                continue
            else:
                fresh[child] = self.stash()
                hooks.append(module.register_forward_hook(
                    lambda m, a, out, bucket=fresh[child]: bucket.append(out)))
                continue
            swapped[child] = (module, stand_in)
            setattr(self.block, child, stand_in)
        seen = self.stash()
        if stop_at is not None and any(self._last_linear(c) == stop_at for c in self.children):
            hooks.append(self.block.get_submodule(stop_at).register_forward_pre_hook(
                lambda m, args: seen.append(args[0])))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for child, (module, _) in swapped.items():
                setattr(self.block, child, module)
        for child, (_, stand_in) in swapped.items():
            if isinstance(stand_in, _Shortcut):
                self.inputs.pop(self._last_linear(child), None)
                if stand_in.failed:
                    self.failed.add(child)
                elif record and len(stand_in.outputs or ()) == batches:
                    self.recorded[child] = stand_in.outputs
        for child, outputs in fresh.items():
            if len(outputs) == batches:
                self.recorded[child] = outputs
        if len(seen) == batches:
            self.inputs[stop_at] = seen


class Stash:
    """A list of per-batch tensors (or (tensor, None, ...) tuples) kept for a later run,
    copied into one buffer allocated for all `rows` at the first append.

    Why not keep the tensors themselves: each is a few MB from the allocator's heap, held
    between the short-lived temporaries of every batch; the heap then cannot shrink and the
    process grew by hundreds of MB more than the data. One large buffer lives outside it.

    `room(nbytes)`, when given, is asked before the buffer is made; if it says no, the stash
    declines: it keeps nothing, and its length never reaches the number of batches."""

    def __init__(self, rows: int, room=None) -> None:
        self.rows, self.filled = rows, 0
        self.room = room
        self.declined = False
        self.buffer: torch.Tensor | None = None
        self.items: list = []

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def append(self, value) -> None:
        if self.declined:
            return
        tensor, rest = (value, None) if isinstance(value, torch.Tensor) else \
            (value[0], value[1:]) if _tensor_then_nothing(value) else (None, None)
        if tensor is None or tensor.dim() == 0 or self.filled + len(tensor) > self.rows:
            self.items.append(value)         # an unexpected shape: kept as it came
            return
        if self.buffer is None:
            shape = (self.rows, *tensor.shape[1:])
            room, self.room = self.room, None  # asked once (and no cycle kept with the asker)
            if room is not None and not room(math.prod(shape) * tensor.element_size()):
                self.declined = True
                self.items.clear()
                return
            self.buffer = torch.empty(shape, dtype=tensor.dtype)
        if self.buffer.shape[1:] != tensor.shape[1:] or self.buffer.dtype != tensor.dtype:
            self.items.append(value)
            return
        view = self.buffer[self.filled: self.filled + len(tensor)]
        view.copy_(tensor.detach())
        self.filled += len(tensor)
        self.items.append(view if rest is None else (view, *rest))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _tensor_then_nothing(value) -> bool:
    return isinstance(value, tuple) and bool(value) and isinstance(value[0], torch.Tensor) \
        and all(v is None for v in value[1:])


class _Served(nn.Module):
    """Stands in for a settled child: returns its recorded outputs in order."""

    def __init__(self, outputs: list) -> None:
        super().__init__()
        self.outputs, self.next = outputs, 0

    def forward(self, *args, **kwargs):
        out = self.outputs[self.next]
        self.next += 1
        return out


class _Shortcut(nn.Module):
    """Stands in for a settled child whose output is its last linear applied to a known input.

    The first call runs the real child too and compares; any difference (another structure,
    extra outputs) turns the shortcut off and the real child runs from then on. Outputs are
    kept (for later runs of the block) in `outputs` when one is given."""

    def __init__(self, child: nn.Module, last: nn.Module, inputs: list,
                 outputs: "Stash | None" = None) -> None:
        super().__init__()
        self.child, self.last, self.inputs = [child], [last], inputs  # lists: not submodules
        self.outputs = outputs
        self.first = None
        self.calls = 0
        self.failed = False

    def forward(self, *args, **kwargs):
        index = self.calls
        self.calls += 1
        if self.failed:
            out = self.child[0](*args, **kwargs)
        else:
            short = self.last[0](self.inputs[index])
            if index == 0:
                real = self.child[0](*args, **kwargs)
                out = _with_first(real, short)
                if out is None:
                    self.failed = True
                    out = real
                self.first = out
            else:
                first = self.first
                out = short if isinstance(first, torch.Tensor) else (short,) + first[1:]
        if self.outputs is not None:
            self.outputs.append(out)
        return out


def _with_first(template, tensor: torch.Tensor):
    """`template` with its (first) tensor replaced by `tensor` when they are equal and the rest
    is empty (None); None when the shortcut does not reproduce it."""
    if isinstance(template, torch.Tensor):
        return tensor if torch.equal(template, tensor) else None
    if isinstance(template, tuple) and template and isinstance(template[0], torch.Tensor):
        if torch.equal(template[0], tensor) and all(t is None for t in template[1:]):
            return (tensor,) + template[1:]
    return None
