"""Code formats: how a quantized layer's codes are held, and who can take them.

Three formats, one small abstraction. Each is a tensor class (the "coded tensor" a method
returns and a variant keeps) that owns its de-quantization, its saving and loading as plain
tensors (safetensors in the variant folder, never pickle) and its size as stored, tables and
scales counted; and a `CodeFormat` record here that says which CPU kernels and which export
formats can hold it. Everything else falls back visibly: a kernel benchmark runs such a layer
de-quantized and says why, an export format that cannot hold it refuses with the reason.

    affine    scale * (code - zero) per group: grid.QTensor (RTN, GPTQ, AWQ, SmoothQuant)
    codebook  a lookup table of 2**bits values per tensor, per output channel or per group,
              optionally times a per-group scale: codebook.CodebookTensor (NF4, k-means)
    vector    tables of d-dimensional vectors per group of columns, one index per d weights:
              vector.VectorTensor (GPTVQ)

Every coded tensor has: `format` (a name below), `shape` (out, in), `bits` (per weight, as
the spec says), `numel()`, `dequantize()` -> float32 [out, in], `storage_bits()` (every bit
it stores), `to_state()` -> (tensors, info) and `from_state(tensors, info, shape)`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from studio.core.errors import StudioError


@dataclass(frozen=True)
class CodeFormat:
    name: str
    title: str
    tensor: str              # "module:Class" of its coded tensor
    kernels: tuple[str, ...]  # CPU kernel families that run it (kernels.py)
    exports: tuple[str, ...]  # export formats that hold it (studio/core/export)
    why_not: str = ""         # what the other export formats lack, for their refusal

    def tensor_class(self) -> type:
        module, _, name = self.tensor.partition(":")
        return getattr(importlib.import_module(module), name)


FORMATS: dict[str, CodeFormat] = {f.name: f for f in (
    CodeFormat("affine", "integer grid (scale x (code - zero))", "studio.core.quant.grid:QTensor",
               kernels=("q4native", "int4pack", "int8pack"), exports=("gguf", "compressed-tensors", "hf")),
    CodeFormat("codebook", "lookup table (non-uniform levels)",
               "studio.core.quant.codebook:CodebookTensor", kernels=(), exports=("hf",),
               why_not="it stores integer grids (scale x (code - zero)) only, not a lookup "
                       "table of levels"),
    CodeFormat("vector", "vector codebooks (d weights per index)",
               "studio.core.quant.vector:VectorTensor", kernels=(), exports=("hf",),
               why_not="it stores one code per weight on an integer grid, not indices into "
                       "tables of vectors"),
)}


def get(name: str) -> CodeFormat:
    if name not in FORMATS:
        raise StudioError(f"Unknown code format {name!r}; this studio knows "
                          f"{', '.join(FORMATS)}.")
    return FORMATS[name]


def format_of(qt) -> CodeFormat:
    return get(getattr(qt, "format", "affine"))


def export_problems(qtensors: dict, export_name: str) -> list[str]:
    """One sentence per code format in `qtensors` that export format `export_name` cannot
    hold, naming the layers and where the variant can go instead."""
    by_format: dict[str, list[str]] = {}
    for name, qt in qtensors.items():
        fmt = format_of(qt)
        if export_name not in fmt.exports:
            by_format.setdefault(fmt.name, []).append(name)
    problems = []
    for fmt_name, layers in by_format.items():
        fmt = FORMATS[fmt_name]
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        problems.append(f"{len(layers)} layer(s) hold {fmt.title} codes ({shown}), which "
                        f"{export_name} cannot store: {fmt.why_not}. Export to "
                        f"{' or '.join(fmt.exports)} instead (de-quantized weights).")
    return problems
