"""Safetensors exports split into shards as transformers splits a checkpoint, written a tensor
at a time.

Hub tools expect a large checkpoint in pieces: `model-00001-of-00003.safetensors`, ... and
`model.safetensors.index.json` naming each tensor's file (`weight_map`) with
`metadata.total_size`, the tensors' bytes. A checkpoint that fits in one shard is a single
`model.safetensors` and has no index. transformers' `save_pretrained` and huggingface_hub's
`split_torch_state_dict_into_shards` decide the split the same way, reproduced here so a
plain export's files are the ones `save_pretrained` writes (tested byte for byte): tensors in
transformers 5's order (names sorted part by part, block numbers by value) fill a shard until
the next would tip it over the limit; a tensor larger than the limit gets a shard of its own,
numbered where it was met.

One difference, by choice: tensors that must be read together (a compressed-tensors layer's
packed codes, scales, zero points and shape) form one unit that never straddles two shards,
so every shard decodes on its own (compressed-tensors' per-file converters, a streamed
re-open reading a layer from one file).

The limit's default is huggingface_hub's (5 GB, the size Hub checkpoints are cut at);
transformers 5's `save_pretrained` defaults to 50 GB, which would leave an 8B model's export
in one 16 GB file that many tools and file systems handle badly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch

from studio.core.errors import StudioError
from studio.core.export import safetensors_stream
from studio.core.export.safetensors_stream import TensorSpec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 10 ** 9   # huggingface_hub's MAX_SHARD_SIZE, "5GB"
UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
         "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str | int) -> int:
    """Bytes from "5GB" (10^9, as transformers reads it), "512MiB" (2^20) or a plain count."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not match or match.group(2) not in UNITS:
            raise StudioError(f"A shard size is a number of bytes with an optional unit "
                              f"(e.g. 5GB, 500MB, 2GiB), not {text!r}.")
        size = int(float(match.group(1)) * UNITS[match.group(2)])
    if size <= 0:
        raise StudioError(f"The shard size must be positive, not {text!r}.")
    return size


def describe_size(size: int) -> str:
    """A shard size as the user would type it back (5GB, 500MB, 12345 bytes)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return f"{size} bytes"


def plan(specs: dict[str, TensorSpec], units: list[list[str]], limit: int
         ) -> dict[str, list[str]]:
    """file name -> its tensors' keys. `units`: every key of `specs` once, in state-dict order,
    grouped into what must share a file (one key per unit for a plain checkpoint)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for unit in units:
        nbytes = sum(specs[key].nbytes for key in unit)
        if nbytes > limit:   # alone, in the place it was met (huggingface_hub's order)
            shards.append(list(unit))
            continue
        if size + nbytes > limit and current:
            shards.append(current)
            current, size = [], 0
        current += unit
        size += nbytes
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    count = len(shards)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": keys
            for i, keys in enumerate(shards)}


def write(folder: Path, specs: dict[str, TensorSpec], units: list[list[str]],
          produce: Callable[[str], torch.Tensor], limit: int, total_parameters: int,
          metadata: dict[str, str] | None = None) -> Iterator[str]:
    """Write the shards (and the index when there is more than one), each tensor asked for
    with `produce(key)` when its file reaches it; yields each key as it is written."""
    files = plan(specs, units, limit)
    for name, keys in files.items():
        yield from safetensors_stream.write(folder / name, {k: specs[k] for k in keys},
                                            produce, metadata)
    if len(files) > 1:
        index = {"metadata": {"total_parameters": total_parameters,
                              "total_size": sum(spec.nbytes for spec in specs.values())},
                 "weight_map": {key: name for name, keys in files.items() for key in keys}}
        # transformers' own layout of the file (sorted keys, two spaces, a final newline)
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or the single file."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StudioError(f"{index} is not a valid shard index.") from None
        if any(Path(n).name != n for n in names):
            raise StudioError(f"{index} names shards outside its folder.")
        return [folder / n for n in names]
    return [folder / SINGLE_FILE]


def state_units(specs: dict[str, TensorSpec],
                parts_of: Callable[[str], str | None] = lambda key: None) -> list[list[str]]:
    """Every key of `specs` in the order transformers 5 saves a state dict in (`natural`),
    grouped into units: keys with the same `parts_of(key)` (a quantized layer's name) go
    together, where the first of them comes."""
    units: list[list[str]] = []
    by_unit: dict[str, list[str]] = {}
    for key in sorted(specs, key=natural):
        unit = parts_of(key)
        if unit is None:
            units.append([key])
        elif unit in by_unit:
            by_unit[unit].append(key)
        else:
            by_unit[unit] = [key]
            units.append(by_unit[unit])
    return units


def natural(key: str) -> list[tuple]:
    """transformers' order of names: part by part between dots, numbers by value and before
    words, a word's trailing number by value (layers.2 before layers.10)."""
    parts = []
    for part in key.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
        else:
            word = part.rstrip("0123456789")
            parts.append((1, word, int(part[len(word):])) if word != part else (1, word))
    return parts
