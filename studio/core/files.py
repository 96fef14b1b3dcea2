"""Atomic writes: a temporary file in the target folder, fsync, rename. Nothing half-written."""
from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# JSON files the studio reads (configs, recipes, sensitivity results, reports) are small; a
# larger one is refused before it is read rather than parsed into memory.
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path, missing: str, error: type | None = None) -> object:
    """A JSON file's content; `missing` is the message when the file is not there.

    Anything that is not JSON (binary, too deep, too large) is a StudioError (or `error`, a
    subclass) naming the file.
    """
    from studio.core.errors import StudioError

    StudioError = error or StudioError  # noqa: N806

    path = Path(path)
    if not path.is_file():
        raise StudioError(missing)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise StudioError(f"{path} is {size / 2**20:.0f} MiB; a JSON file the studio reads is "
                          f"at most {MAX_JSON_BYTES // 2**20} MiB.")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise StudioError(f"{path} is not valid JSON: {exc}.") from None
    except RecursionError:
        raise StudioError(f"{path} is not valid JSON: it nests too deeply.") from None


def safe_name(name: str, default: str = "variant") -> str:
    """`name` as a file or folder name: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or default


# --- writing --------------------------------------------------------------------------------
# A temporary's name carries the writer's process id: a later write to the same target removes
# the temporaries of writers that are gone (killed mid-save) but never one still being written.

def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove what a killed save to `target` left beside it; returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        if not target.exists():  # killed between the two renames of the fallback swap
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            removed.append(old)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = stale.name[len(target.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_error(exc: BaseException, target: Path) -> BaseException:
    """A full disk (or a file-size limit) as a message the user can act on; anything else as
    it is. Libraries written in Rust (safetensors) report the OS error in their text only."""
    from studio.core.errors import StudioError

    code = getattr(exc, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)", str(exc))
        code = int(match.group(1)) if match else None
    if code in _DISK_FULL:
        return StudioError(f"Could not write {target}: {os.strerror(code)} (the disk is full or "
                           f"the file is too large for it). Nothing was changed: free some "
                           f"space and save again.")
    return exc


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash of the machine right after it keeps it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename: it is the old file or the new one, never a
    part. A full disk raises a StudioError and leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's file is private; the result is not
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        error = disk_error(exc, path)
        if error is not exc:
            raise error from None
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `target` in one step.

    On any error (or cancel) the temporary folder is removed and `target` is untouched; a full
    disk is a StudioError. An existing target is swapped with the new folder atomically
    (Linux's renameat2 RENAME_EXCHANGE), so a kill at any moment leaves the old folder or the
    new one in place; the leftover temporary goes at the next save to the same place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private (0700); the result is not
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if target.exists():
            _swap_into_place(tmp, target)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(exc, target)
        if error is not exc:
            raise error from None
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_into_place(new: Path, target: Path) -> None:
    """Put `new` at `target` and the old target at `new`, atomically where the OS can."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is not None:
            if renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target),
                         _RENAME_EXCHANGE) == 0:
                return
            if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(target))
    # Elsewhere two renames; a kill between them leaves the old folder at `.name.old`, which
    # the next save (remove_stale_temporaries) moves back when the target is missing.
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    os.replace(old, new)


def files_identity(paths) -> str:
    """Names, sizes and modification times of the files: what a cache key needs instead of
    every byte."""
    parts = []
    for file in sorted(paths):
        stat = file.stat()
        parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def cache_root() -> Path:
    """The studio's cache folder (de-quantized GGUFs, baselines, autosave): the environment's
    COMPRESSION_STUDIO_CACHE (Preferences set it) or ~/.cache/compression-studio."""
    return Path(os.environ.get("COMPRESSION_STUDIO_CACHE",
                               Path.home() / ".cache" / "compression-studio"))
