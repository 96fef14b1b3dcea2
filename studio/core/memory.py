"""Giving freed memory back to the operating system.

torch's CPU tensors come from the C library's malloc. After a block of quantization, glibc
keeps the freed batch temporaries in its heaps (tens of MB each, fragmented between tensors
that live on), so the process's resident size ratchets up by hundreds of MB that nothing
uses. `malloc_trim(0)` returns those free pages; elsewhere (macOS, musl, Windows) there is no
such call and this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def guard_convert(param_count: int, what: str) -> None:
    """A GGUF is de-quantized to float32 in a child process that holds about two copies."""
    from studio.core.models import check_memory
    check_memory(4 * param_count, what)
