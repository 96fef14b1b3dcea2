"""The vector format: each run of `dim` consecutive weights of a row is one index into a table
of `dim`-dimensional vectors (GPTVQ, van Baalen et al. 2024).

    w[r, j*dim:(j+1)*dim] = tables[r // rows, (j*dim) // columns, index[r, j]]
                            * (scale[r, (j*dim) // columns] if scaled)

A table serves a block of `rows` output rows x `columns` input columns (the last ones may be
ragged); `columns` is a multiple of `dim`, and so is the layer's width. `bits` is bits per
weight as the spec says it: an index holds bits * dim bits, so a table has at most
2**(bits * dim) entries (2-D at 3 bits per weight: 64 vectors). Tables and scales are float32
holding fp16 values, counted at 16 bits each.

Indices of up to 8 bits are held packed (`pack.pack_codes`); wider ones as int32.
"""
from __future__ import annotations

import torch

from studio.core.errors import StudioError
from studio.core.quant.codebook import TABLE_BITS
from studio.core.quant.pack import pack_codes, unpack_codes

MAX_INDEX_BITS = 16


class VectorTensor:
    format = "vector"

    def __init__(self, indices: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor | None,
                 bits: int, dim: int, rows: int, columns: int) -> None:
        out, vectors = indices.shape
        cols = vectors * dim
        index_bits = bits * dim
        if not 1 <= dim <= 8 or index_bits > MAX_INDEX_BITS:
            raise StudioError(f"Vectors of {dim} weights at {bits} bits each need "
                              f"{index_bits}-bit indices; at most {MAX_INDEX_BITS}.")
        if columns % dim or not 0 < columns or not 0 < rows:
            raise StudioError(f"A vector table covers whole vectors: {columns} columns is not a "
                              f"multiple of {dim}.")
        blocks = (-(-out // rows), -(-cols // columns))
        if tables.dim() != 4 or tuple(tables.shape[:2]) != blocks or tables.shape[3] != dim \
                or not 0 < tables.shape[2] <= 2 ** index_bits:
            raise StudioError(f"Vector tables for [{out}, {cols}] in blocks of {rows} x {columns} "
                              f"are [{blocks[0]}, {blocks[1]}, <= {2 ** index_bits}, {dim}], not "
                              f"{list(tables.shape)}.")
        if scale is not None and tuple(scale.shape) != (out, blocks[1]):
            raise StudioError(f"Vector scales are [{out}, {blocks[1]}], not {list(scale.shape)}.")
        if indices.numel() and int(indices.max()) >= tables.shape[2]:
            raise StudioError("A vector index points past its table.")
        self.index_bits = index_bits
        self.packed = pack_codes(indices, index_bits, torch.uint8) if index_bits <= 8 \
            else indices.to(torch.int32)
        self.shape = torch.Size((out, cols))
        self.tables, self.scale = tables.float(), None if scale is None else scale.float()
        self.bits, self.dim, self.rows, self.columns = bits, dim, rows, columns

    @property
    def indices(self) -> torch.Tensor:
        if self.index_bits <= 8:
            return unpack_codes(self.packed, self.index_bits, self.shape[1] // self.dim)
        return self.packed

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        out, cols = self.shape
        _, col_blocks, k, dim = self.tables.shape
        flat = self.tables.reshape(-1, dim)
        vectors = cols // dim
        row_block = torch.arange(out) // self.rows
        col_block = (torch.arange(vectors) * dim) // self.columns
        where = (row_block[:, None] * col_blocks + col_block[None, :]) * k + self.indices.long()
        w = flat[where].reshape(out, cols)
        if self.scale is not None:
            w *= self.scale.repeat_interleave(self.columns, dim=1)[:, :cols]
        return w

    def storage_bits(self) -> float:
        extra = self.tables.numel() + (0 if self.scale is None else self.scale.numel())
        return self.index_bits * (self.numel() // self.dim) + TABLE_BITS * extra

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"indices": pack_codes(self.indices, self.index_bits) if self.index_bits <= 8
                   else self.packed.contiguous(), "tables": self.tables.contiguous()}
        if self.scale is not None:
            tensors["scale"] = self.scale.contiguous()
        return tensors, {"bits": self.bits, "dim": self.dim, "rows": self.rows,
                         "columns": self.columns}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict,
                   shape: tuple[int, int]) -> "VectorTensor":
        out, cols = shape
        dim, bits = info.get("dim"), info["bits"]
        for key in ("dim", "rows", "columns"):
            value = info.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StudioError(f"its {key} is {value!r}")
        if cols % dim:
            raise StudioError(f"its width {cols} is not a multiple of its vector size {dim}")
        words, tables = tensors.get("indices"), tensors.get("tables")
        if words is None or tables is None or words.dim() != 2 or words.shape[0] != out \
                or words.dtype != torch.int32 or not tables.is_floating_point():
            raise StudioError("its vector indices or tables are missing or malformed")
        indices = unpack_codes(words, bits * dim, cols // dim) if bits * dim <= 8 else words
        if indices.shape[1] != cols // dim:
            raise StudioError(f"its indices do not match the shape {[out, cols]}")
        return cls(indices, tables, tensors.get("scale"), bits, dim, info["rows"],
                   info["columns"])

    def __repr__(self) -> str:
        return (f"VectorTensor({list(self.shape)}, bits={self.bits}, dim={self.dim}, "
                f"tables={list(self.tables.shape)})")
