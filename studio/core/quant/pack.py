"""Integer codes of 2..8 bits <-> packed words (int32 or uint8), exactly.

Each row is packed on its own as a little-endian bit stream: code j of a row occupies bits
[j*bits, (j+1)*bits) of that row's stream, so with 2, 4 or 8 bits an int32 word holds 32/bits
codes, lowest first, the layout GPTQ / compressed-tensors "pack-quantized" checkpoints use.
Other widths (3, 5, 6, 7) straddle word boundaries; the last word of a row is zero-padded.
"""
from __future__ import annotations

import numpy as np
import torch

from studio.core.errors import StudioError

WORD_BITS = {torch.int32: 32, torch.uint8: 8}
ROWS_PER_CHUNK = 2048  # bounds the temporary bit tensor (rows x in x bits bytes)


def packed_width(in_features: int, bits: int, dtype: torch.dtype = torch.int32) -> int:
    """Words per row."""
    return -(-in_features * bits // WORD_BITS[dtype])


def pack_codes(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """uint8 codes [out, in] with values < 2**bits -> words [out, packed_width]."""
    _check(bits, dtype)
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise StudioError(f"A code does not fit in {bits} bits.")
    return torch.cat([_pack_rows(chunk, bits, dtype)
                      for chunk in codes.split(ROWS_PER_CHUNK)]) if codes.shape[0] else \
        torch.zeros(0, packed_width(codes.shape[1], bits, dtype), dtype=dtype)


def unpack_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """words [out, packed_width] -> uint8 codes [out, in_features]."""
    _check(bits, words.dtype)
    if words.shape[1] != packed_width(in_features, bits, words.dtype):
        raise StudioError(f"Packed rows hold {words.shape[1]} words; {in_features} codes of "
                          f"{bits} bits need {packed_width(in_features, bits, words.dtype)}.")
    return torch.cat([_unpack_rows(chunk, bits, in_features)
                      for chunk in words.split(ROWS_PER_CHUNK)]) if words.shape[0] else \
        torch.zeros(0, in_features, dtype=torch.uint8)


def _check(bits: int, dtype: torch.dtype) -> None:
    if not 2 <= bits <= 8:
        raise StudioError(f"Packing handles 2 to 8 bits, not {bits}.")
    if dtype not in WORD_BITS:
        raise StudioError(f"Codes pack into int32 or uint8 words, not {dtype}.")


def _pack_rows(codes: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = codes.shape
    stream = _byte_stream(codes.to(torch.uint8).numpy(), bits)
    if dtype == torch.uint8:
        return torch.from_numpy(stream)
    words = packed_width(cols, bits, dtype)
    padded = np.zeros((rows, 4 * words), dtype=np.uint8)
    padded[:, : stream.shape[1]] = stream
    return torch.from_numpy(padded.view("<i4").astype(np.int32))


def _byte_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] -> each row's little-endian bit stream in bytes."""
    rows, cols = codes.shape
    if 8 % bits == 0:
        # 2, 4, 8 bits: whole codes per byte, shifted into place.
        per = 8 // bits
        padded = np.zeros((rows, -(-cols // per) * per), dtype=np.uint8)
        padded[:, :cols] = codes
        lanes = padded.reshape(rows, -1, per)
        stream = lanes[..., 0].copy()
        for k in range(1, per):
            stream |= lanes[..., k] << (bits * k)
        return stream
    # 3, 5, 6, 7 bits: 8 codes fill exactly `bits` bytes. Each run of 8 codes is gathered
    # into one 64-bit integer and cut into bytes: a dozen whole-array passes (bit planes
    # through packbits took ~4x longer, unpacking ~10x).
    runs = -(-cols // 8)
    padded = np.zeros((rows, runs * 8), dtype=np.uint64)
    padded[:, :cols] = codes
    lanes = padded.reshape(rows, runs, 8)
    value = lanes[..., 0].copy()
    for k in range(1, 8):
        value |= lanes[..., k] << np.uint64(bits * k)
    stream = np.empty((rows, runs, bits), dtype=np.uint8)
    for k in range(bits):
        stream[..., k] = (value >> np.uint64(8 * k)) & np.uint64(0xFF)
    return stream.reshape(rows, runs * bits)[:, : -(-cols * bits // 8)]


def _unpack_rows(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    rows = words.shape[0]
    raw = words.numpy()
    stream = (raw.astype("<i4").view(np.uint8) if words.dtype == torch.int32 else raw)
    stream = stream.reshape(rows, -1)
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        lanes = np.empty((rows, stream.shape[1], per), dtype=np.uint8)
        for k in range(per):
            np.bitwise_and(stream >> (bits * k), mask, out=lanes[..., k])
        return torch.from_numpy(np.ascontiguousarray(lanes.reshape(rows, -1)[:, :in_features]))
    # the reverse of _byte_stream: `bits` bytes -> one 64-bit integer -> 8 codes
    runs = -(-in_features // 8)
    whole = np.zeros((rows, runs * bits), dtype=np.uint8)
    used = min(stream.shape[1], runs * bits)
    whole[:, :used] = stream[:, :used]
    groups = whole.reshape(rows, runs, bits).astype(np.uint64)
    value = groups[..., 0].copy()
    for k in range(1, bits):
        value |= groups[..., k] << np.uint64(8 * k)
    codes = np.empty((rows, runs, 8), dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for k in range(8):
        codes[..., k] = (value >> np.uint64(bits * k)) & mask
    return torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1)[:, :in_features]))
