"""Activation capture: run calibration text through the model and record, with forward hooks,
what every quantizable layer reads and what flows along the residual stream.

Per input (layers that read the same tensor, e.g. q/k/v or gate/up, share one record): the
abs-max and mean |x| of every channel, and a histogram of sampled values. Per block: the L2 norm
and the largest |h| entry of every token at the block's output (and at the first block's
input), which exposes massive activations and the tokens that cause them.

The job yields after every batch of windows; hooks are always removed, and nothing is returned
unless every window ran, so a cancelled capture leaves no partial result behind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from studio.core.errors import StudioError
from studio.core.jobs import Job, Progress
from studio.core.stats import histogram
from studio.core.memory import guard_job
from studio.core.text import text_windows

DEFAULT_WINDOWS = 32
DEFAULT_SEQLEN = 512
SAMPLES_PER_CALL = 4096      # activation values sampled per forward call per input
MAX_SAMPLES = 1 << 16        # kept per input for its histogram
# Tokens per forward pass: four 512-token windows. Bigger batches mean fewer (larger) torch
# ops per token, which matters most when other work shares the cores (8 x 512 per pass ran
# 1.8x faster than 2 x 512 on a busy 2-core machine); four keeps a cancel within seconds.
BATCH_TOKENS = 2048
_BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)\.")


@dataclass
class InputStats:
    """What one group of layers reads (they all see the same input tensor)."""
    layers: list[str]
    block: int | None
    roles: list[str]
    absmax: np.ndarray           # [in] float32
    mean_abs: np.ndarray         # [in] float32
    hist_edges: np.ndarray       # [HIST_BINS + 1] float32
    hist_counts: np.ndarray      # [HIST_BINS] float32 (of the sampled values)
    tokens: int                  # tokens seen

    @property
    def key(self) -> str:
        return self.layers[0]

    @property
    def label(self) -> str:
        prefix = _block_prefix(self.layers[0]) or ""
        return f"{prefix} {'/'.join(self.roles)}".strip()


@dataclass
class ActivationCapture:
    model: str
    source: str                  # the text's label
    windows: int
    seqlen: int
    seed: int
    inputs: list[InputStats]
    token_ids: np.ndarray        # [windows, seqlen] int32
    stream_norm: np.ndarray      # [blocks + 1, windows, seqlen] float32; 0 = first block input
    stream_max: np.ndarray       # [blocks + 1, windows, seqlen] float32: max |h| over channels
    stream_dim: np.ndarray       # [blocks + 1, windows, seqlen] int32: the channel of that max
    stream_names: list[str] = field(default_factory=list)   # "embeddings", then block names
    token_text: list[str] = field(default_factory=list)     # decoded vocabulary of token_ids

    def input_of(self, layer: str) -> InputStats | None:
        for group in self.inputs:
            if layer in group.layers:
                return group
        return None

    def token(self, window: int, pos: int) -> str:
        """The text of one token, for the massive-activation table."""
        tid = int(self.token_ids[window, pos])
        return self.token_text[tid] if 0 <= tid < len(self.token_text) else str(tid)


class _InputRecorder:
    """Running per-channel statistics of one input tensor, fed a batch at a time.

    NumPy, not torch: these small reductions run ~150 times per forward pass, and torch's
    thread pool makes each of them 10-100x slower when other work shares the two cores."""

    def __init__(self, first_layer: str, rng: np.random.Generator) -> None:
        self.layers = [first_layer]
        self.absmax: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.tokens = 0
        self.samples: list[np.ndarray] = []
        self.sampled = 0
        self.rng = rng

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1]).numpy()
        a = np.abs(x)
        amax, asum = a.max(axis=0), a.sum(axis=0).astype(np.float64)
        if self.absmax is None:
            self.absmax, self.abs_sum = amax, asum
        else:
            np.maximum(self.absmax, amax, out=self.absmax)
            self.abs_sum += asum
        self.tokens += x.shape[0]
        if self.sampled < MAX_SAMPLES:
            take = min(SAMPLES_PER_CALL, MAX_SAMPLES - self.sampled)
            flat = x.reshape(-1)
            flat = flat[self.rng.integers(0, flat.size, take)] if flat.size > take else flat.copy()
            self.samples.append(flat)
            self.sampled += flat.size

    def finish(self, roles: list[str], block: int | None) -> InputStats:
        absmax = self.absmax.astype(np.float32)
        edges, counts = histogram(np.concatenate(self.samples), float(absmax.max()))
        return InputStats(
            layers=self.layers, block=block, roles=roles, absmax=absmax,
            mean_abs=(self.abs_sum / max(self.tokens, 1)).astype(np.float32),
            hist_edges=edges, hist_counts=counts, tokens=self.tokens)


def activation_capture_job(handle, path: str | Path | None = None,
                           windows: int = DEFAULT_WINDOWS, seqlen: int = DEFAULT_SEQLEN,
                           seed: int = 0, bos: str = "auto") -> Job[ActivationCapture]:
    """Feed `windows` random windows of `seqlen` tokens from `path` (None: the built-in text)
    through the model and return what every quantizable layer's input looked like."""
    if windows < 1:
        raise StudioError(f"The number of windows must be at least 1, not {windows}.")
    if not handle.quantizable:
        raise StudioError("This model has no quantizable layers to record activations for.")
    guard_job(handle, "capture", windows=windows, seqlen=seqlen)
    yield Progress(0, windows, "Tokenizing calibration text")
    ids, label = text_windows(handle.tokenizer, path, seqlen, windows, seed, bos)
    layer_names = [info.name for info in handle.quantizable]
    blocks = block_modules(handle)
    recorder = _Recorder(handle, layer_names, blocks, windows, seqlen, seed)
    batch = max(1, BATCH_TOKENS // seqlen)
    body = handle.model.base_model  # the blocks without the lm_head: logits are not needed
    recorder.attach()
    try:
        for start in range(0, windows, batch):
            yield Progress(start, windows, f"Capturing activations: windows {start + 1}-"
                                           f"{min(start + batch, windows)} of {windows}")
            recorder.window = start
            with torch.inference_mode():
                body(input_ids=ids[start: start + batch], use_cache=False)
    finally:
        recorder.detach()
    yield Progress(windows, windows, "Summarising activations")
    return recorder.result(handle, label, ids)


def block_modules(handle) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks, in order: the modules whose names prefix the layers' blocks."""
    names: list[str] = []
    for info in handle.quantizable:
        prefix = _block_prefix(info.name)
        if prefix and prefix not in names:
            names.append(prefix)
    return [(name, handle.model.get_submodule(name)) for name in names]


class _Recorder:
    """The hooks of one capture and the statistics they accumulate."""

    def __init__(self, handle, layer_names, blocks, windows: int, seqlen: int, seed: int):
        self.handle, self.layer_names, self.blocks = handle, layer_names, blocks
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.groups: list[_InputRecorder] = []
        self.group_of: dict[str, _InputRecorder] = {}
        self.last_input: torch.Tensor | None = None     # the tensor the previous hook saw
        self.last_group: _InputRecorder | None = None
        shape = (len(blocks) + 1, windows, seqlen)
        self.norm = np.zeros(shape, np.float32)
        self.peak = np.zeros(shape, np.float32)
        self.dim = np.zeros(shape, np.int32)
        self.window = 0
        self.hooks: list = []

    def attach(self) -> None:
        for name in self.layer_names:
            module = self.handle.module(name)
            self.hooks.append(module.register_forward_pre_hook(self._layer_hook(name)))
        for index, (_, module) in enumerate(self.blocks):
            self.hooks.append(module.register_forward_hook(self._block_hook(index),
                                                           with_kwargs=True))

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.last_input = self.last_group = None

    def _layer_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            # q/k/v (or gate/up) are called one after another on the same tensor object:
            # record it once, and remember that these layers share an input.
            if x is self.last_input and self.last_group is not None:
                group = self.last_group
                if name not in group.layers:
                    group.layers.append(name)
                    self.group_of[name] = group
                return
            group = self.group_of.get(name)
            if group is None:
                group = _InputRecorder(name, self.rng)
                self.groups.append(group)
                self.group_of[name] = group
            group.add(x)
            self.last_input, self.last_group = x, group
        return hook

    def _block_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if index == 0:
                self._stream(0, args[0] if args else kwargs["hidden_states"])
            self._stream(index + 1, output[0] if isinstance(output, tuple) else output)
        return hook

    def _stream(self, row: int, h: torch.Tensor) -> None:
        h = h.detach().float().numpy()
        batch = slice(self.window, self.window + h.shape[0])
        self.norm[row, batch] = np.sqrt(np.einsum("bsd,bsd->bs", h, h))
        a = np.abs(h)
        dim = a.argmax(axis=-1)
        self.dim[row, batch] = dim
        self.peak[row, batch] = np.take_along_axis(a, dim[..., None], axis=-1)[..., 0]

    def result(self, handle, label: str, ids: torch.Tensor) -> ActivationCapture:
        info = {layer.name: layer for layer in handle.quantizable}
        inputs = []
        for group in self.groups:
            group.layers.sort(key=self.layer_names.index)
            roles = [info[name].role for name in group.layers]
            inputs.append(group.finish(roles, info[group.layers[0]].block))
        vocab = _vocabulary(handle.tokenizer, ids)
        return ActivationCapture(
            model=handle.name, source=label, windows=int(ids.shape[0]),
            seqlen=int(ids.shape[1]), seed=self.seed, inputs=inputs,
            token_ids=ids.numpy().astype(np.int32), stream_norm=self.norm,
            stream_max=self.peak, stream_dim=self.dim,
            stream_names=["embeddings"] + [name for name, _ in self.blocks],
            token_text=vocab)


def _vocabulary(tokenizer, ids: torch.Tensor) -> list[str]:
    """Readable text of every token id that occurs (others are left empty)."""
    present = np.unique(ids.numpy())
    size = int(present.max()) + 1 if present.size else 0
    text = [""] * size
    for tid in present.tolist():
        text[tid] = tokenizer.decode([tid])
    return text


def _block_prefix(name: str) -> str | None:
    match = _BLOCK_PREFIX.match(name)
    return match.group(1) if match else None
