"""GGUF exports split into several files, as llama.cpp's gguf-split cuts them.

A GGUF larger than the export's shard size (the one `ExportOptions.shard_size` the safetensors
formats use) is written as NAME-00001-of-0000N.gguf, NAME-00002-of-0000N.gguf, ...: llama.cpp's
naming (`llama_split_path`, "%s-%05d-of-%05d.gguf"). The first file holds every metadata key
and the tokenizer; every file holds `split.no` (u16, from 0), `split.count` (u16) and
`split.tensors.count` (i32, the tensors of all files), and its own tensors' records and data.
llama.cpp, LM Studio and the studio's own checks open the first file and find the rest by
name. Tensors fill a file in the export's order until the next would tip it over the limit (the
metadata is not counted, as gguf-split does not); a tensor larger than the limit gets a file of
its own. gguf-py's `GGUFWriter(split_max_size=...)` does the cutting and writes the keys.

Ollama cannot import a split GGUF (ollama/ollama#5245, open): the export says so, with the two
ways out (a larger shard size, or `llama-gguf-split --merge`).
"""
from __future__ import annotations

import re
from pathlib import Path

from studio.core.errors import StudioError

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
KEYS = ("split.no", "split.count", "split.tensors.count")


def split_name(prefix: str, index: int, count: int) -> str:
    """llama.cpp's `llama_split_path`: index from 0, numbered from 1."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def files(first: Path) -> list[Path]:
    """Every file of the GGUF whose first (or only) file is `first`, checked present and
    numbered as its `split.*` keys say; a single file is itself."""
    from studio.core.gguf_header import read_keys

    first = Path(first)
    try:
        keys = read_keys(first, set(KEYS))
    except (OSError, ValueError, EOFError) as exc:
        raise StudioError(f"{first.name} is not a readable GGUF: {exc}") from None
    count = int(keys.get("split.count", 0) or 0)
    if count <= 1:
        return [first]
    match = SPLIT_NAME.match(first.name)
    if keys.get("split.no", 0) != 0 or not match or int(match["no"]) != 1 \
            or int(match["count"]) != count:
        raise StudioError(f"{first.name} is part {int(keys.get('split.no', 0)) + 1} of a GGUF in "
                          f"{count} files: open its first file, "
                          f"PREFIX-00001-of-{count:05d}.gguf.")
    paths = [first.with_name(split_name(match["prefix"], i, count)) for i in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise StudioError(f"{first.name} is the first of {count} files, and "
                          f"{', '.join(missing[:4])} {'is' if len(missing) == 1 else 'are'} "
                          f"missing from {first.parent}.")
    return paths


def note(paths: list[Path]) -> str:
    """What the user is told of a split export, once written."""
    return (f"Written as {len(paths)} files, {paths[0].name} to {paths[-1].name}: llama.cpp "
            f"and LM Studio open the first and find the rest. For Ollama (one file only, "
            f"ollama#5245) merge them:  llama-gguf-split --merge {paths[0].name} ONE.gguf.")
