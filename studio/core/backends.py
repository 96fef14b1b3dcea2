"""The inference backends a benchmark or an evaluation can run on: declared once here, read by
the CLI's `--backend` choices, the Benchmark tab's list and the jobs.

* torch: the studio's own path (float models, the int8/int4 CPU kernels, the lean decoder);
  always there.
* llama.cpp: a GGUF file run by llama.cpp itself through the optional `cyllama` binding, the
  runtime many users deploy to. Without the binding it is listed as unavailable, with the
  command that installs it.

`build_info(name)` records what produced a figure (versions, CPU flags, threads are added by
the caller), so every speed figure says which backend and build it came from.
"""
from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.core.errors import StudioError


@dataclass(frozen=True)
class Backend:
    name: str                       # what `--backend` takes
    label: str                      # what the window shows
    runs: str                       # what it runs: "model" (a torch model) or "gguf" (a file)
    install: str | None             # the command that makes it available, when optional
    _probe: Callable[[], bool]
    _build: Callable[[], dict]

    def available(self) -> bool:
        return self._probe()

    def unavailable_reason(self) -> str | None:
        """None when usable, else a sentence with the install command."""
        if self.available():
            return None
        return f"the {self.label} backend is not installed: {self.install}"

    def build_info(self) -> dict:
        return {"backend": self.name, **self._build()}


def _torch_build() -> dict:
    from studio.core import q4_native

    return {"torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
            "native_int4": q4_native.unavailable() or q4_native.describe()}


def _llama_probe() -> bool:
    from studio.core.export import llama_cpp
    return llama_cpp.available()


def _llama_build() -> dict:
    from studio.core.export import llama_cpp
    return llama_cpp.build_info()


def _llama_install() -> str:
    from studio.core.export.llama_cpp import INSTALL
    return INSTALL


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", "torch", "model", None, lambda: True, _torch_build),
    "llama.cpp": Backend("llama.cpp", "llama.cpp", "gguf", _llama_install(), _llama_probe,
                         _llama_build),
}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise StudioError(f"Unknown backend {name!r}; choose from "
                          f"{', '.join(BACKENDS)}.") from None


def gguf_of(source) -> Path | None:
    """The GGUF file a MODEL argument stands for, if any: the demo's own file, a .gguf path, a
    folder holding one, or a GGUF export folder (VARIANTs have none until exported)."""
    from studio.core.errors import ModelLoadError
    from studio.core.models import resolve_source

    path = Path(str(source)).expanduser()
    report_file = (path.parent if path.is_file() else path) / "report.json"
    if str(source) != "demo" and report_file.is_file():
        from studio.core.export.reopen import read_report
        folder, report = read_report(path)
        if report.get("format") != "gguf":
            return None
        return folder / Path(report["file"]).name
    if str(source) != "demo" and path.is_dir() and (path / "variant.json").is_file():
        return None
    try:
        kind, found = resolve_source(source)
    except ModelLoadError:
        return None
    return found if kind == "gguf" else None


def gguf_label(path) -> str:
    """How a GGUF run by llama.cpp is named in results (benchmark and evaluation alike, so
    Compare puts both on one row)."""
    return f"llama.cpp {Path(path).name}"


def no_gguf_message(source) -> str:
    return (f"{source} has no GGUF file for the llama.cpp backend: export it first "
            f"(compression-studio export {source} --format gguf --out FOLDER) and benchmark "
            f"that folder, or give --gguf FILE.")
