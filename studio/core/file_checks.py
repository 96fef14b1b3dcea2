"""Checks on files from anywhere, made before any library parses or acts on them.

Model folders, GGUF and safetensors files come from strangers. Every count or size a header
claims is checked against the file's real size before anything is allocated from it, and a
folder that asks for code of its own (`auto_map`) is refused before any of it is read by
transformers. Every failure is a `ModelLoadError` whose message names the file and the problem
in the user's terms ("truncated: expected N bytes, found M").
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from studio.core.errors import ModelLoadError
from studio.core.files import read_json

# safetensors' own reader refuses headers above 100 MB; so do we, before reading one.
SAFETENSORS_MAX_HEADER = 100_000_000
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                      "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                      "I64": 8, "U64": 8, "F64": 8, "C64": 8}
GGML_MAX_DIMS = 4  # ggml's own limit on a tensor's dimensions
_GGUF_MAX_ARRAY_DEPTH = 3


# --- config.json and friends -----------------------------------------------------------------

def check_no_remote_code(folder: Path, config: object) -> None:
    """Refuse a folder whose config or tokenizer config asks transformers to run its own code.

    transformers would either refuse, or (for a tokenizer without a built-in class) stop and
    ask on stdin: a hang in the CLI. Nothing of such a folder is loaded.
    """
    asks = []
    if isinstance(config, dict) and config.get("auto_map"):
        asks.append("config.json")
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        raw = read_json(tok_config, "", ModelLoadError)
        if isinstance(raw, dict) and raw.get("auto_map"):
            asks.append("tokenizer_config.json")
    if asks:
        raise ModelLoadError(
            f"{folder.name} asks to run its own Python code ({' and '.join(asks)} name classes "
            f"in 'auto_map'). The studio never runs code from a model folder; use a model whose "
            f"architecture transformers supports without custom code.")


# --- safetensors -----------------------------------------------------------------------------

def safetensors_header(file: Path) -> dict:
    """Parse a safetensors header and check every entry against the file's real size."""
    file = Path(file)
    if not file.is_file():  # a FIFO or device named *.safetensors would block or never end
        raise ModelLoadError(f"{file.name} is not a regular file.")
    size = file.stat().st_size
    bad = lambda why: ModelLoadError(f"{file.name} is not a valid safetensors file ({why}).")  # noqa: E731
    with open(file, "rb") as handle:
        first = handle.read(8)
        if len(first) < 8:
            raise bad(f"it is {size} bytes long, shorter than a header")
        (length,) = struct.unpack("<Q", first)
        if length > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise bad(f"the header claims {length:,} bytes; the file holds {size - 8:,} after "
                      f"the length" if length > size - 8 else "header larger than 100 MB")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = size - 8 - length
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("__metadata__ must map names to strings")
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{key!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise bad(f"{key!r} has a bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise bad(f"{key!r} has bad data offsets {offsets!r}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"{key!r} is {shape} {dtype} ({nbytes:,} bytes) but its offsets span "
                      f"{offsets[1] - offsets[0]:,} bytes")
        spans.append((offsets[0], offsets[1]))
    end = max((e for _, e in spans), default=0)
    if end > data_size:
        raise ModelLoadError(f"{file.name} is truncated: expected {8 + length + end:,} bytes, "
                             f"found {size:,}. Copy or download it again.")
    # safetensors' own reader wants the tensors to tile the data exactly, as its writer does
    spans.sort()
    position = 0
    for start, stop in spans:
        if start != position:
            raise bad("two tensors overlap" if start < position else
                      f"{start - position:,} bytes at {position:,} belong to no tensor")
        position = stop
    if position != data_size:
        raise bad(f"{data_size - position:,} bytes after the last tensor belong to no tensor")
    return header


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_numel(header: dict) -> int:
    return sum(math.prod(e["shape"]) for k, e in header.items() if k != "__metadata__")


# --- GGUF ------------------------------------------------------------------------------------

@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]     # ggml order (fastest dimension first)
    ggml_type: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFSummary:
    version: int
    tensors: list[GGUFTensorInfo]
    keys: dict[str, object]    # scalar and string values only (arrays: their length)
    data_start: int

    @property
    def param_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)


class _Cursor:
    """Reads a GGUF header from a memory map, never past its end."""

    def __init__(self, data, name: str, order: str) -> None:
        self.data, self.name, self.order, self.pos = data, name, order, 0

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.pos + count > len(self.data):
            raise ModelLoadError(
                f"{self.name} is truncated or corrupt: {what} at byte {self.pos:,} needs "
                f"{count:,} bytes but the file ends at {len(self.data):,}.")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        values = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> str:
        length = self.unpack("Q", what)
        self.need(length, what)
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.name} is corrupt: {what} is not UTF-8 text.") from None

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.pos += count


# GGUF value types -> struct format (8 string, 9 array are handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_summary(path: Path) -> GGUFSummary:
    """Walk a GGUF file's header and tensor table, checking every claim against the file size.

    Does what gguf's reader does first, but in bounded steps: a count or length larger than
    what is left of the file is refused at once, and the tensors' data must fit in the file.
    One file: the parts of a split GGUF are put together by `gguf_parts.summary`.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path.name} is not a regular file.")
    size = path.stat().st_size
    if size < 24:
        raise ModelLoadError(f"{path.name} is not a GGUF file (it is {size} bytes long).")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ModelLoadError(f"{path.name} is not a GGUF file (no GGUF magic number).")
        (version,) = struct.unpack_from("<I", data, 4)
        order = "<"
        if version & 0xFFFF == 0:  # written on a big-endian machine
            order, (version,) = ">", struct.unpack_from(">I", data, 4)
        if version not in (2, 3):
            raise ModelLoadError(f"{path.name} is GGUF version {version}; versions 2 and 3 "
                                 f"are supported.")
        cur = _Cursor(data, path.name, order)
        cur.pos = 8
        n_tensors, n_kv = cur.unpack("QQ", "the counts")
        # every key takes at least 12 bytes, every tensor entry at least 24
        if n_kv * 12 > size or n_tensors * 24 > size:
            raise ModelLoadError(f"{path.name} is corrupt: it claims {n_kv:,} keys and "
                                 f"{n_tensors:,} tensors in {size:,} bytes.")
        keys: dict[str, object] = {}
        for index in range(n_kv):
            key = cur.string(f"key {index}")
            kind = cur.unpack("I", f"the type of {key}")
            keys[key] = _gguf_value(cur, kind, key, 0)
        alignment = keys.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{path.name} is corrupt: alignment {alignment!r} is not a "
                                 f"power of two.")
        tensors, names = [], set()
        for index in range(n_tensors):
            name = cur.string(f"tensor name {index}")
            if name in names:
                raise ModelLoadError(f"{path.name} is corrupt: tensor {name} appears twice.")
            names.add(name)
            n_dims = cur.unpack("I", f"the dimensions of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise ModelLoadError(f"{path.name} is corrupt: {name} has {n_dims} dimensions.")
            shape = tuple(cur.unpack("Q", f"the shape of {name}") for _ in range(n_dims))
            ggml_type, offset = cur.unpack("IQ", f"the type of {name}")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise ModelLoadError(f"{path.name}: {name} has an unknown type {ggml_type}.") from None
            if shape[0] % block:
                raise ModelLoadError(f"{path.name} is corrupt: {name}'s rows of {shape[0]} do "
                                     f"not divide into blocks of {block}.")
            nbytes = math.prod(shape) // block * type_size
            tensors.append((GGUFTensorInfo(name, shape, ggml_type, nbytes), offset))
        data_start = -(-cur.pos // alignment) * alignment
    expected = max((data_start + off + t.nbytes for t, off in tensors), default=cur.pos)
    if expected > size:
        raise ModelLoadError(f"{path.name} is truncated: expected {expected:,} bytes, found "
                             f"{size:,}. Copy or download it again.")
    return GGUFSummary(version, [t for t, _ in tensors], keys, data_start)


def _gguf_value(cur: _Cursor, kind: int, key: str, depth: int) -> object:
    if kind in _GGUF_SCALARS:
        return cur.unpack(_GGUF_SCALARS[kind], f"the value of {key}")
    if kind == 8:
        return cur.string(f"the value of {key}")
    if kind != 9:
        raise ModelLoadError(f"{cur.name} is corrupt: {key} has an unknown value type {kind}.")
    if depth >= _GGUF_MAX_ARRAY_DEPTH:
        raise ModelLoadError(f"{cur.name} is corrupt: {key} nests arrays too deeply.")
    item_kind, count = cur.unpack("IQ", f"the array {key}")
    if item_kind in _GGUF_SCALARS:
        cur.skip(count * struct.calcsize("<" + _GGUF_SCALARS[item_kind]), f"the array {key}")
    elif item_kind == 8:  # strings: skipped, not decoded (a vocabulary's tokens need not be UTF-8)
        cur.need(count * 8, f"the array {key}")  # each takes at least its length
        for _ in range(count):
            cur.skip(cur.unpack("Q", f"the array {key}"), f"the array {key}")
    elif item_kind == 9:
        cur.need(count * 12, f"the array {key}")
        for _ in range(count):
            _gguf_value(cur, item_kind, key, depth + 1)
    else:
        raise ModelLoadError(f"{cur.name} is corrupt: {key} holds items of unknown type "
                             f"{item_kind}.")
    return count
