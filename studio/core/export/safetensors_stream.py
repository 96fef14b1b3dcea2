"""A safetensors file written one tensor at a time, byte for byte what `save_file` writes.

`safetensors.torch.save_file` needs every tensor in memory at once; an export of a streamed
variant (a 3B model: ~1.5 GiB of packed codes, ~0.75 GiB of embedding) must not gather them.
The format lets a writer know the header before any data: each tensor's name, dtype and shape
fix its offsets. So the caller declares every tensor first (`TensorSpec`), then either the
writer asks for each tensor's values in file order (`write`), or the caller hands it tensors in
any order as they come (`Writer.put`: a GGUF de-quantized tensor by tensor, in the GGUF's order,
into a first open's cache), holding one at a time.

The layout is safetensors' own (checked against `save_file` by a test): the header is compact
JSON, `__metadata__` first, then the tensors in data order; it is padded with spaces to a
multiple of 8 bytes; the data are sorted by dtype, widest first (safetensors' dtype order,
descending), then by name, so every tensor stays aligned to its element size.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Self

import torch

# safetensors' Dtype enum order (the data are sorted by it, descending)
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
               "U32", "F32", "F64", "I64", "U64")
NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8",
         torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16",
         torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
         torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
         torch.uint64: "U64"}


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tensor.dtype, tuple(tensor.shape))


def file_order(specs: dict[str, TensorSpec]) -> list[str]:
    """The order safetensors writes tensors in: widest dtype first, then by name."""
    return sorted(specs, key=lambda k: (-DTYPE_ORDER.index(NAMES[specs[k].dtype]), k))


def header_bytes(specs: dict[str, TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and the padded JSON header for tensors `specs`."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key in file_order(specs):
        spec = specs[key]
        header[key] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape),
                       "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class Writer:
    """A safetensors file written from its header: `put` each declared tensor, in any order,
    at its place; `close` checks that every one was put (a hole would read as zeros).

        with Writer(path, specs, metadata) as out:
            out.put(key, tensor)    # for every key of specs
    """

    def __init__(self, path: Path, specs: dict[str, TensorSpec],
                 metadata: dict[str, str] | None = None):
        self.specs = specs
        header = header_bytes(specs, metadata)
        self._starts, start = {}, len(header)
        for key in file_order(specs):
            self._starts[key] = start
            start += specs[key].nbytes
        self._left = set(specs)
        self._file = open(path, "wb")   # noqa: SIM115 (closed by close / __exit__)
        self._file.write(header)
        self._at = len(header)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Write `key`'s values at its place. It must match its spec: the header says it."""
        if key not in self._left:
            raise ValueError(f"{key} was not declared, or was written already.")
        if TensorSpec.of(tensor) != self.specs[key]:
            raise ValueError(f"{key} was declared {self.specs[key]}, produced "
                             f"{TensorSpec.of(tensor)}.")
        if self._at != self._starts[key]:   # (in file order, no seek: `write`, `save`)
            self._file.seek(self._starts[key])
        self._file.write(_raw(tensor))
        self._at = self._starts[key] + self.specs[key].nbytes
        self._left.discard(key)

    def close(self) -> None:
        self._file.close()
        if self._left:
            raise ValueError(f"{len(self._left)} declared tensors were not written, e.g. "
                             f"{min(self._left)}.")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:   # (the caller's error or cancel: the file is the caller's to remove)
            self._file.close()


def write(path: Path, specs: dict[str, TensorSpec],
          produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None
          ) -> Iterator[str]:
    """Write the file, asking `produce(key)` for each tensor in file order; yields each key
    as it is written (for progress). A produced tensor must match its spec: the header was
    written from the specs."""
    with Writer(path, specs, metadata) as out:
        for key in file_order(specs):
            tensor = produce(key)
            out.put(key, tensor)
            del tensor
            yield key


def save(tensors: dict[str, torch.Tensor], path: str | Path,
         metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file(tensors, path, metadata)`, byte for byte, with the
    interpreter's lock free while the bytes are written (a file write releases it): save_file
    copies every tensor into a bytes object and writes the file from Rust with the lock held,
    and the window waited for it (a new variant autosaved after GPTQ, the demo's 538 MB cached
    folder written behind a first open)."""
    for _ in write(Path(path), {k: TensorSpec.of(v) for k, v in tensors.items()},
                   tensors.__getitem__, metadata):
        pass


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian as safetensors stores them (no copy when contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy() if flat.dtype != torch.bool
                      else flat.to(torch.uint8).numpy())
