"""Read a few scalar keys from a GGUF file's metadata without reading its tensors.

gguf-py's `GGUFReader` parses every tensor record and takes ~10 s on the demo file on a busy
2-core machine; a tokenizer flag such as `tokenizer.ggml.add_bos_token` needs only the key/value
section at the front (GGUF v2/v3 layout: magic, version, tensor count, key count, then keys).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

# GGUF value types -> struct format of one scalar (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


def read_keys(path: str | Path, wanted: set[str]) -> dict[str, object]:
    """{key: value} for the scalar or string keys of `wanted` that the file holds (arrays are
    skipped). Stops as soon as every wanted key was seen. Raises ValueError on a bad header."""
    found: dict[str, object] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _tensors, count = _counts(f)
        for _ in range(count):
            key = _string(f, size)
            kind, = struct.unpack("<I", f.read(4))
            value = _value(f, kind, size)
            if key in wanted:
                found[key] = value
                if len(found) == len(wanted):
                    break
    return found


def raw_values(path: str | Path, prefix: str = "") -> dict[str, bytes]:
    """{key: the value's bytes as stored (its type tag included)} for every key that starts
    with `prefix`: enough to compare keys byte for byte without decoding a 49k-token array
    into numpy views one string at a time, as GGUFReader does (~5 s on the demo)."""
    spans = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        _tensors, count = _counts(f)
        for _ in range(count):
            key = _string(f, size)
            start = f.tell()
            kind, = struct.unpack("<I", f.read(4))
            _value(f, kind, size)
            if key.startswith(prefix):
                spans[key] = (start, f.tell())
        values = {}
        for key, (start, end) in spans.items():
            f.seek(start)
            values[key] = f.read(end - start)
    return values


def _counts(f) -> tuple[int, int]:
    """Check the magic and version at the file's start; (tensor count, key count)."""
    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, = struct.unpack("<I", f.read(4))
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    return struct.unpack("<QQ", f.read(16))


def tensor_table(path: str | Path) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """([(name, shape in torch order, ggml type, offset from the data start)], data start):
    where every tensor's bytes are, read from the header without parsing any array."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        count_tensors, count_keys = _counts(f)
        alignment = 32
        for _ in range(count_keys):
            key = _string(f, size)
            kind, = struct.unpack("<I", f.read(4))
            value = _value(f, kind, size)
            if key == "general.alignment":
                alignment = int(value)
        entries = []
        for _ in range(count_tensors):
            name = _string(f, size)
            dims, = struct.unpack("<I", f.read(4))
            shape = struct.unpack(f"<{dims}Q", f.read(8 * dims))
            ggml_type, offset = struct.unpack("<IQ", f.read(12))
            entries.append((name, tuple(reversed(shape)), ggml_type, offset))
        start = -(-f.tell() // alignment) * alignment
    return entries, start


def _string(f, size: int) -> str:
    length = _length(f, size)
    data = f.read(length)
    if len(data) != length:
        raise ValueError("the metadata ends early")
    return data.decode("utf-8", errors="replace")


def _length(f, size: int) -> int:
    """A string's length, refused when it claims more than the file holds (a hostile header
    would have read() allocate it)."""
    data = f.read(8)
    if len(data) != 8:
        raise ValueError("the metadata ends early")
    length, = struct.unpack("<Q", data)
    if length > size - f.tell():
        raise ValueError("the metadata ends early")
    return length


def _value(f, kind: int, size: int):
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        data = f.read(struct.calcsize(fmt))
        if len(data) != struct.calcsize(fmt):
            raise ValueError("the metadata ends early")
        return struct.unpack(fmt, data)[0]
    if kind == _STRING:
        return _string(f, size)
    if kind == _ARRAY:
        item, length = struct.unpack("<IQ", f.read(12))
        if item in _SCALARS:
            f.seek(length * struct.calcsize("<" + _SCALARS[item]), 1)
        elif item == _STRING:   # (a vocabulary: skipped, not read)
            for _ in range(length):
                f.seek(_length(f, size), 1)
        else:
            for _ in range(length):
                _value(f, item, size)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")
