"""A variant's codes packed by hand into GGUF's 32-weight blocks (never re-rounded).

Block layouts (gguf-py `quants.py`, ggml-quants.c), d and m little-endian fp16:
    Q4_0  d, qs[16]              x = d * (q - 8)
    Q4_1  d, m, qs[16]           x = d * q + m
    Q5_0  d, qh (u32), qs[16]    x = d * (q - 16)
    Q8_0  d, int8[32]            x = d * q
Inside a block, byte j of qs holds element j in its low nibble and element j + 16 in its high
nibble (not consecutive pairs), and bit j of qh is bit 4 of element j.

A studio code is u in [0, 2**bits - 1] with an integer zero z per group, w = s * (u - z). With
d = s of the block's group, q = u - z + offset reproduces w exactly (see gguf_types). Blocks
never straddle groups when the row is a multiple of 32 and the group a multiple of 32 (or the
whole row), which `blocks_fit` checks.
"""
from __future__ import annotations

import numpy as np
import torch

from studio.core.export.gguf_types import BLOCK, GgufType
from studio.core.quant.grid import FP16_MAX

ROW_CHUNK = 4096   # rows per pass: int16 temporaries stay a few MB even for an lm_head


def blocks_fit(qt) -> bool:
    """Every 32-weight block lies inside one group of the layer."""
    cols = qt.shape[1]
    return cols % BLOCK == 0 and (qt.group_size % BLOCK == 0 or qt.group_size >= cols)


def per_block(values: torch.Tensor, group_size: int, cols: int) -> np.ndarray:
    """[out, groups] -> [out, blocks]: each block takes its group's value."""
    group_of_block = (np.arange(cols // BLOCK) * BLOCK) // group_size
    return values.float().numpy()[:, group_of_block]


def stored_q(codes: np.ndarray, zero: np.ndarray, gtype: GgufType) -> np.ndarray:
    """The integers the type stores for codes [rows, in] with per-block zeros [rows, blocks]."""
    blocks = codes.reshape(codes.shape[0], -1, BLOCK).astype(np.int16)
    if gtype.affine:
        return blocks                      # Q4_1 / Q5_1 keep u; the zero goes into m
    return blocks - zero.astype(np.int16)[..., None] + gtype.offset


def codes_fit(qt, gtype: GgufType) -> bool:
    """Every code the layer can hold fits the type's stored range: u spans [0, 2**bits - 1],
    so q = u - z + offset fits when each integer zero z keeps both ends inside (checked on the
    zeros alone: [out, groups], not every weight)."""
    if not blocks_fit(qt):
        return False
    zero = qt.zero
    if not torch.equal(zero, zero.round()):
        return False
    top = 2 ** qt.bits - 1
    if gtype.affine:
        return top <= gtype.qmax
    low, high = gtype.offset - zero, top - zero + gtype.offset
    return bool(low.min() >= gtype.qmin and high.max() <= gtype.qmax)


def scales_are_fp16(qt) -> bool:
    return torch.equal(qt.scale.half().float(), qt.scale.float())


def scales_in_fp16_range(qt) -> bool:
    return bool(qt.scale.abs().max() <= FP16_MAX)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes: element j low, element j + 16 high."""
    low = q.astype(np.uint8) & 0x0F
    return low[..., :16] | (low[..., 16:] << 4)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)    # [..., 2], little-endian


def pack_rows(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
              gtype: GgufType) -> np.ndarray:
    """Codes [rows, in] with per-block scales and zeros [rows, blocks] -> uint8 blocks
    [rows, blocks, block_bytes]."""
    q = stored_q(codes, zero, gtype)
    d = _fp16_bytes(scale)
    if gtype.name == "Q4_0":
        parts = [d, _nibbles(q)]
    elif gtype.name == "Q4_1":
        parts = [d, _fp16_bytes(-scale.astype(np.float16).astype(np.float32) * zero), _nibbles(q)]
    elif gtype.name == "Q5_0":
        qh = np.packbits((q >> 4).astype(np.uint8) & 1, axis=-1, bitorder="little")
        parts = [d, qh, _nibbles(q)]
    elif gtype.name == "Q8_0":
        parts = [d, q.astype(np.int8).view(np.uint8)]
    else:
        raise ValueError(f"no packer for {gtype.name}")
    return np.concatenate(parts, axis=-1)


def pack(qt, gtype: GgufType, row_order: np.ndarray | None = None) -> np.ndarray:
    """The layer as GGUF bytes [out, in / 32 * block_bytes] (what GGUFWriter takes with
    raw_dtype). `row_order`: output rows to write in this order (llama's q/k permutation):
    codes, scales and zeros move together, so any group size survives it."""
    out, cols = qt.shape
    codes = qt.codes.numpy()
    scale = per_block(qt.scale, qt.group_size, cols)
    zero = per_block(qt.zero, qt.group_size, cols)
    if row_order is not None:
        codes, scale, zero = codes[row_order], scale[row_order], zero[row_order]
    packed = np.empty((out, cols // BLOCK, gtype.block_bytes), dtype=np.uint8)
    for start in range(0, out, ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        packed[rows] = pack_rows(codes[rows], scale[rows], zero[rows], gtype)
    return packed.reshape(out, -1)


def dequantize(packed: np.ndarray, type_name: str) -> torch.Tensor:
    """What llama.cpp and transformers' GGUF loader read back from packed bytes (float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(np.ascontiguousarray(
        gguf_dequantize(packed, GGMLQuantizationType[type_name])))


def requantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """The nearest Q8_0 of de-quantized weights, for layers no type holds exactly (re-rounds:
    never used where the codes fit)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(w.float().numpy(), GGMLQuantizationType.Q8_0)


def llama_row_order(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation for `llama` (convert_hf_to_gguf LlamaModel.permute) as an
    index: within each head, GGUF row 2i is HF row i and row 2i + 1 is HF row i + hd/2
    (rotate-half order -> interleaved order). K uses the KV head count."""
    index = np.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
