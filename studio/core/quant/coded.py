"""Quantized layers held as codes: what a variant's model runs.

A variant used to keep a float32 copy of every quantized weight next to its codes: four fifths
of the model again, per variant. `CodedLinear` keeps only the QTensor (packed codes, scales,
zeros) and the layer's bias; its float weight, scale * (code - zero), is made when the layer
runs and dropped after, the same float32 matrix the copy held, so results are unchanged.

Making it costs about a quarter of a 512-token forward on the demo, so evaluation holds the
float weights for its whole run instead (`expanded`), and lets them go when it ends.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from studio.core.memory import release_freed_memory
from studio.core.quant.grid import QTensor  # or any coded tensor of quant.formats


class CodedLinear(nn.Module):
    """y = x W^T + b with W de-quantized from `qt` ([out, in], float32 unless `dtype`).

    Stands in for nn.Linear and GPT-2's Conv1D alike (both compute x W^T + b)."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.qt = qt
        self.out_features, self.in_features = qt.shape
        self.weight_dtype = dtype
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else \
            nn.Parameter(bias, requires_grad=False)
        self._held: torch.Tensor | None = None
        self._holders = 0

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized weight [out, in] (made afresh unless `expanded` holds it)."""
        return self._held if self._held is not None else self._dense()

    def _dense(self) -> torch.Tensor:
        return self.qt.dequantize().to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def hold(self) -> None:
        self._holders += 1
        if self._held is None:
            with torch.inference_mode(False), torch.no_grad():  # usable in and out of it
                self._held = self._dense()

    def release(self) -> None:
        self._holders = max(0, self._holders - 1)
        if self._holders == 0:
            self._held = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codes={self.qt!r}, "
                f"bias={self.bias is not None}")


@contextlib.contextmanager
def expanded(model: nn.Module):
    """Within: every CodedLinear of `model` keeps its float weight (for a run of many
    forwards: evaluation, generation). Nested and concurrent uses count; the last one out
    drops them."""
    from studio.core.streaming import streams

    # A variant of a streamed model keeps its codes only: its float weights at once would be
    # the float32 model streaming exists to avoid (each layer de-quantizes as it runs).
    coded = [] if streams(model) else [m for m in model.modules() if isinstance(m, CodedLinear)]
    for module in coded:
        module.hold()
    try:
        yield model
    finally:
        for module in coded:
            module.release()
        release_freed_memory()  # the float weights were many heap blocks between temporaries


class CodedEmbedding(nn.Module):
    """A token embedding held as codes [vocab, dim]: a lookup de-quantizes only the rows it
    reads (each row's codes, scales and zeros are its own), so the table is never expanded.
    A tied model's lm_head and embedding hold the same QTensor: one set of codes, as a tied
    checkpoint stores one matrix."""

    def __init__(self, qt: QTensor, module: nn.Embedding,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.qt = qt
        self.num_embeddings, self.embedding_dim = qt.shape
        self.padding_idx = module.padding_idx
        self.weight_dtype = dtype
        # Gemma-3-style embeddings multiply their lookup by sqrt(dim), a buffer of theirs
        scale = getattr(module, "embed_scale", None)
        self.register_buffer("embed_scale", scale if isinstance(scale, torch.Tensor) else None,
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The whole de-quantized table (for exporters and checks; lookups never make it)."""
        return self.qt.dequantize().to(self.weight_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.qt, ids.reshape(-1)).to(self.weight_dtype)
        rows = rows.reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(rows.dtype)
        return rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codes={self.qt!r}"


def dequantize_rows(qt, rows: torch.Tensor) -> torch.Tensor:
    """scale * (code - zero) of the given rows only (affine codes: each row is packed on its
    own); other code formats de-quantize the whole matrix first."""
    from studio.core.quant.grid import dequantize
    from studio.core.quant.pack import unpack_codes

    if getattr(qt, "format", "affine") != "affine":
        return qt.dequantize()[rows]
    codes = unpack_codes(qt.packed[rows], qt.bits, qt.shape[1])
    return dequantize(codes, qt.scale[rows], qt.zero[rows], qt.group_size)


def coded_layer(module: nn.Module, qt: QTensor) -> nn.Module:
    """The CodedLinear for a Linear / Conv1D `module` quantized as `qt` (its bias is shared),
    or the CodedEmbedding for an embedding."""
    from studio.core.streaming import StoredParameter, watch

    weight = getattr(module, "weight", None)
    # a streamed layer computes in float32 whatever its file stores
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and not isinstance(
        weight, StoredParameter) else torch.float32
    if isinstance(module, nn.Embedding):
        return CodedEmbedding(qt, module, dtype)
    coded = CodedLinear(qt, getattr(module, "bias", None), dtype)
    watch(coded)   # a streamed bias is read as the layer runs
    return coded
