"""Versions of the libraries the studio runs on (the About box, bug reports)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("torch", "transformers", "safetensors", "gguf", "compressed-tensors", "numpy",
             "PySide6", "pyqtgraph", "cyllama")


def library_versions() -> dict[str, str]:
    return {name: library_version(name) for name in LIBRARIES}


def library_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
