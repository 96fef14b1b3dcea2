"""A GGUF in one file or split into parts (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf).

A split GGUF opens as one model: the metadata and the tokenizer are the first file's, the
tensors are found across the files. Every part is checked before any tensor is read: present,
numbered as its `split.*` keys say, of the same split (its count, and the tensors of all files
adding up to the first file's `split.tensors.count`), each header against its own file's size,
and no tensor in two files. A part that fails is named.

The files' names and keys are the studio's own split export's (`export.gguf_split`).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from studio.core.errors import ModelLoadError, StudioError
from studio.core.file_checks import GGUFSummary, gguf_summary

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def parts(path: Path) -> list[Path]:
    """Every file of the GGUF whose first (or only) file is `path`: [path] for one file.
    A missing part, or a path that is not the first file, is refused naming the file. Only a
    file named as llama.cpp names a split's parts (it finds the others by that name) has its
    keys read: the split keys come after the vocabulary, a walk of the whole header."""
    from studio.core.export import gguf_split

    path = Path(path)
    if not gguf_split.SPLIT_NAME.match(path.name):
        return [path]
    try:
        stat = path.stat()
        found = _files(str(path), stat.st_size, stat.st_mtime_ns)
        if all(file.is_file() for file in found):
            return list(found)
        return gguf_split.files(path)   # (a part gone since: named)
    except ModelLoadError:
        raise
    except StudioError as exc:
        raise ModelLoadError(str(exc)) from None
    except OSError as exc:
        raise ModelLoadError(f"{path.name} cannot be read: {exc}") from None


@functools.lru_cache(maxsize=16)
def _files(path: str, size: int, mtime_ns: int) -> tuple[Path, ...]:
    """`gguf_split.files`, once per version of the first file: an open asks several times."""
    from studio.core.export import gguf_split

    return tuple(gguf_split.files(Path(path)))


def first_part(path: Path) -> Path:
    """The first file of the split GGUF `path` is a later part of, by llama.cpp's naming (a
    user who picks any part of a split means the model; it may be missing); else `path`."""
    from studio.core.export import gguf_split

    match = gguf_split.SPLIT_NAME.match(path.name)
    if not match or int(match["no"]) == 1:
        return path
    return path.with_name(gguf_split.split_name(match["prefix"], 0, int(match["count"])))


def is_split(path: Path) -> bool:
    return len(parts(path)) > 1


def summary(path: Path) -> GGUFSummary:
    """One summary over every part (`file_checks.gguf_summary` of each): the first file's
    version, keys and data start; the tensors of all files, in file order."""
    files = parts(path)
    first = gguf_summary(files[0])
    count = first.keys.get("split.count")
    if len(files) == 1 and isinstance(count, int) and count > 1:
        raise ModelLoadError(
            f"{files[0].name} is part {_number(first.keys.get('split.no'))} of a GGUF split into "
            f"{count} files, but is not named as llama.cpp names them (NAME-00001-of-"
            f"{count:05d}.gguf, ...), which is how its other parts are found: give the files "
            f"their split names, or merge them with  llama-gguf-split --merge.")
    if len(files) == 1:
        return first
    total = first.keys.get("split.tensors.count")
    tensors, seen = [], {}
    for index, file in enumerate(files):
        part = first if index == 0 else gguf_summary(file)
        keys = part.keys
        if keys.get("split.no") != index or keys.get("split.count") != count:
            raise ModelLoadError(
                f"{file.name} does not belong to {files[0].name}: its split keys say part "
                f"{_number(keys.get('split.no'))} of {keys.get('split.count')}, where part "
                f"{index + 1} of {count} was expected.")
        if keys.get("split.tensors.count") != total:
            raise ModelLoadError(
                f"{file.name} does not belong to {files[0].name}: it says the split holds "
                f"{keys.get('split.tensors.count')} tensors, the first file says {total}.")
        for tensor in part.tensors:
            if tensor.name in seen:
                raise ModelLoadError(f"{tensor.name} is in both {seen[tensor.name]} and "
                                     f"{file.name}: the parts are of different splits.")
            seen[tensor.name] = file.name
        tensors.extend(part.tensors)
    if len(tensors) != total:
        raise ModelLoadError(f"The {len(files)} files of {files[0].name} hold {len(tensors)} "
                             f"tensors; its split keys say {total}: a part is of another split.")
    return GGUFSummary(first.version, tensors, first.keys, first.data_start)


def tensor_tables(path: Path) -> list[tuple[Path, list, int]]:
    """[(file, its tensor table, its data start)] for every part (`gguf_header.tensor_table`)."""
    from studio.core.gguf_header import tensor_table

    return [(file, *tensor_table(file)) for file in parts(path)]


def total_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in parts(path))


def stamp(path: Path) -> str:
    """A key that changes when any part is replaced: each file's path, size and time (one file:
    the key of earlier versions, so their caches stay valid)."""
    text = "".join(_file_stamp(file) for file in parts(path))
    return hashlib.sha1(text.encode()).hexdigest()


def _file_stamp(file: Path) -> str:
    stat = file.stat()
    return f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _number(value) -> str:
    return str(value + 1) if isinstance(value, int) else "?"
