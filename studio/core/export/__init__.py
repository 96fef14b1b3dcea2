"""Export formats: the one place a format is declared. Everything else reads `FORMATS`.

A format is an `ExportFormat` (see `base.py`): a name, a title, what it writes, a `preflight`
that says how each layer will be stored (and refuses what it cannot hold, before any work), a
`write_job` that fills a temporary folder, and a `reload_job` that opens what was written with
the consumer's own library. `job.export_job` drives any of them the same way: check, write,
reload, verify against the variant, then rename into place.
"""
from __future__ import annotations

from studio.core.errors import StudioError
from studio.core.export.base import ExportFormat, ExportOptions, LayerTarget, Preflight, Written


def _formats() -> dict[str, ExportFormat]:
    from studio.core.export.compressed_tensors import COMPRESSED_TENSORS
    from studio.core.export.gguf import GGUF
    from studio.core.export.hf import HF

    return {f.name: f for f in (GGUF, COMPRESSED_TENSORS, HF)}


def get_format(name: str) -> ExportFormat:
    formats = _formats()
    if name not in formats:
        raise StudioError(f"Unknown export format {name!r}; choose one of {', '.join(formats)}.")
    return formats[name]


def all_formats() -> list[ExportFormat]:
    return list(_formats().values())


def format_names() -> list[str]:
    return list(_formats())


__all__ = ["ExportFormat", "ExportOptions", "LayerTarget", "Preflight", "Written",
           "get_format", "all_formats", "format_names"]
