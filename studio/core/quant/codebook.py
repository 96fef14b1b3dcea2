"""The codebook format: each weight is an index into a table of 2**bits levels.

    w[r, c] = table[r // rows or 0, group(c) or 0, index[r, c]] * (scale[r, group(c)] if scaled)

The table may be one for the whole tensor ([1, 1, K]: NF4's fixed normal-float levels), one
per output channel ([out, 1, K]: SqueezeLLM's k-means), one per block of `rows` consecutive
output channels ([ceil(out / rows), 1, K]: a table's cost shared by its rows), and any of
these per group of columns ([.., groups, K]). An optional per-group scale multiplies it
(NF4's absmax). Groups run along the input dimension with a ragged last group, as on the
affine grid; the last block of rows may be ragged too (its table is counted whole).

Indices are held packed, `bits` per index (`pack.pack_codes`); tables and scales are float32
tensors holding fp16 values (methods round them with `fp16_values`), so `storage_bits`
counts them at 16 bits and a 16-bit store loses nothing. A table that is a constant of the
method (`constant_table`: NF4's published levels, which every reader of the format knows) is
saved with the variant but not counted, as llama.cpp does not count IQ4_NL's table.
"""
from __future__ import annotations

import torch

from studio.core.errors import StudioError
from studio.core.quant.grid import ROW_CHUNK, effective_group_size, expand_groups
from studio.core.quant.pack import pack_codes, unpack_codes

TABLE_BITS = 16   # each table entry and scale as stored (fp16)


def fp16_values(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to fp16 values (kept float32), inside fp16's finite range."""
    return x.float().clamp(-65504.0, 65504.0).half().float()


class CodebookTensor:
    format = "codebook"

    def __init__(self, indices: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None,
                 bits: int, group_size: int, constant_table: bool = False,
                 rows: int = 1) -> None:
        out, cols = indices.shape
        gs = effective_group_size(group_size, cols)
        groups = -(-cols // gs)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise StudioError(f"A codebook table serves a whole number of rows, not {rows!r}.")
        row_tables = -(-out // rows)
        if table.dim() != 3 or table.shape[0] not in (1, row_tables) \
                or table.shape[1] not in (1, groups) or table.shape[2] != 2 ** bits:
            raise StudioError(f"A codebook for [{out}, {cols}] at {bits} bits, groups of {gs}, "
                              f"{rows} row(s) per table, is [1 or {row_tables}, 1 or {groups}, "
                              f"{2 ** bits}], not {list(table.shape)}.")
        if scale is not None and tuple(scale.shape) != (out, groups):
            raise StudioError(f"A codebook's scales are [{out}, {groups}], not "
                              f"{list(scale.shape)}.")
        self.packed = pack_codes(indices, bits, torch.uint8)
        self.shape = indices.shape
        self.table, self.scale = table.float(), None if scale is None else scale.float()
        self.bits, self.group_size, self.rows = bits, gs, rows
        self.constant_table = bool(constant_table)
        if self.constant_table and tuple(self.table.shape[:2]) != (1, 1):
            raise StudioError("A constant table is one table for the whole tensor.")

    @property
    def indices(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits, self.shape[1])

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        out, cols = self.shape
        rows_of_table, groups_of_table, k = self.table.shape
        flat = self.table.reshape(-1)
        column_group = torch.arange(cols) // self.group_size if groups_of_table > 1 \
            else torch.zeros(cols, dtype=torch.long)
        indices = self.indices
        w = torch.empty(out, cols)
        for start in range(0, out, ROW_CHUNK):
            rows = slice(start, min(start + ROW_CHUNK, out))
            r = torch.arange(rows.start, rows.stop) // self.rows if rows_of_table > 1 \
                else torch.zeros(rows.stop - rows.start, dtype=torch.long)
            where = (r[:, None] * groups_of_table + column_group[None, :]) * k \
                + indices[rows].long()
            w[rows] = flat[where]
            if self.scale is not None:
                w[rows] *= expand_groups(self.scale[rows], self.group_size, cols)
        return w

    def storage_bits(self) -> float:
        """Every bit stored: the indices, the tables and the scales (16 bits each)."""
        extra = (0 if self.constant_table else self.table.numel()) \
            + (0 if self.scale is None else self.scale.numel())
        return self.bits * self.numel() + TABLE_BITS * extra

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"indices": pack_codes(self.indices, self.bits), "table": self.table.contiguous()}
        if self.scale is not None:
            tensors["scale"] = self.scale.contiguous()
        info = {"bits": self.bits, "group_size": self.group_size}
        if self.constant_table:
            info["constant_table"] = True
        if self.rows != 1:
            info["rows"] = self.rows
        return tensors, info

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], info: dict,
                   shape: tuple[int, int]) -> "CodebookTensor":
        out, cols = shape
        words, table, scale = tensors.get("indices"), tensors.get("table"), tensors.get("scale")
        if words is None or table is None:
            raise StudioError("a codebook layer needs its indices and table")
        if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != out \
                or not table.is_floating_point() or (scale is not None
                                                     and not scale.is_floating_point()):
            raise StudioError(f"its codebook tensors do not match the shape {[out, cols]}")
        return cls(unpack_codes(words, info["bits"], cols), table, scale, info["bits"],
                   info["group_size"], info.get("constant_table") is True, info.get("rows", 1))

    def __repr__(self) -> str:
        return (f"CodebookTensor({list(self.shape)}, bits={self.bits}, "
                f"table={list(self.table.shape)}, rows={self.rows}, scaled={self.scale is not None})")
