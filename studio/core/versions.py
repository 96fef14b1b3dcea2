"""Versions of the libraries the studio runs on (the About box, bug reports)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

LIBRARIES = ("torch", "transformers", "safetensors", "gguf", "compressed-tensors", "numpy",
             "PySide6", "pyqtgraph", "cyllama")


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
