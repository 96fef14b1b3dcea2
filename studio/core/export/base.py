"""What every export format provides, and the records they pass to the export job.

A format writes a variant's own codes (never re-rounded from de-quantized floats where the format
can hold them exactly), says before writing how each layer will be stored (`preflight`), and
re-opens what it wrote with the consumer's library (`reload_job`) so the job can compare it with
the variant. Subclass `ExportFormat` and register it in `studio/core/export/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from studio.core.errors import StudioError
from studio.core.export.shards import DEFAULT_SHARD_SIZE, describe_size
from studio.core.jobs import Job

FLOAT_DTYPES = ("f16", "bf16", "f32")
INEXACT_POLICIES = ("refuse", "nearest")


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "f16"          # tensors that are not quantized: f16 | bf16 | f32
    inexact: str = "refuse"     # a layer no exact type holds: refuse the export, or take the nearest
    gguf_asym4: str = "q5_0"    # GGUF, 4-bit asymmetric layers: q5_0 (exact) or q4_1 (smaller)
    shard_size: int = DEFAULT_SHARD_SIZE   # bytes of tensors per file, every format that splits

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise StudioError(f"The float type must be one of {', '.join(FLOAT_DTYPES)}, "
                              f"not {self.dtype!r}.")
        if self.inexact not in INEXACT_POLICIES:
            raise StudioError(f"Layers without an exact type are either 'refuse'd or take the "
                              f"'nearest' type, not {self.inexact!r}.")
        if self.gguf_asym4 not in ("q5_0", "q4_1"):
            raise StudioError(f"4-bit asymmetric layers go to GGUF as q5_0 or q4_1, "
                              f"not {self.gguf_asym4!r}.")
        if not isinstance(self.shard_size, int) or self.shard_size <= 0:
            raise StudioError(f"The shard size is a positive number of bytes, not "
                              f"{self.shard_size!r}.")

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "inexact": self.inexact, "gguf_asym4": self.gguf_asym4,
                "shard_size": describe_size(self.shard_size)}


@dataclass
class LayerTarget:
    """How one layer of the variant is stored in the export."""
    name: str                   # the studio's layer name
    stored_as: str              # e.g. "Q4_0", "int4 asym g64 (pack-quantized)", "F16"
    exact: bool                 # the file holds the variant's weights exactly
    error: float | None = None  # when not exact: metrics.relative_error of the weights
    note: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "stored_as": self.stored_as, "exact": self.exact,
                "error": self.error, "note": self.note}


@dataclass
class Preflight:
    targets: list[LayerTarget]
    problems: list[str] = field(default_factory=list)  # why the export cannot go ahead as asked
    notes: list[str] = field(default_factory=list)

    @property
    def inexact(self) -> list[LayerTarget]:
        return [t for t in self.targets if not t.exact]


@dataclass
class Written:
    file: Path                  # what a consumer opens: the .gguf file, or the model folder
    layer_bytes: dict[str, int]  # bytes on disk of each quantized layer's tensors
    notes: list[str] = field(default_factory=list)
    entries: list = field(default_factory=list)  # GGUF: the file's tensors (gguf_tensors.Entry)
    shared: dict[str, str] = field(default_factory=dict)  # tied layers: `Variant.shared`


@dataclass
class Reloaded:
    """An export opened by its consumer's library: a float32 model with the base model's
    module names, and what the tokenizer check found."""
    model: nn.Module | None        # None: only `logits` runs the file (a streamed GGUF check)
    tokenizer_equal: bool | None   # None: the source had no tokenizer to compare
    tokenizer_detail: str = ""
    # Quantized layers' weights [out, in] as the consumer library de-quantizes them, where the
    # model does not expose them as plain weights (None: read them from the model).
    weights: dict[str, torch.Tensor] | None = None
    # Logits [count, seqlen, vocab] for windows of token ids, where the model above does not
    # compute what the file does and the file's own runtime must (None: the model's forward).
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    logits_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The float tensors the file holds by the base model's keys, where they are not the
    # model's state_dict (a streamed re-open reads them one per lookup; None: the state_dict)
    floats: Mapping[str, torch.Tensor] | None = None


class ExportFormat:
    name: str = ""
    title: str = ""
    description: str = ""
    consumer: str = ""          # the library the verification reloads with
    # How an export over `ExportOptions.shard_size` is split ("": never; one setting for every
    # format, shown by the CLI and the Export dialog beside the shard size)
    splits_as: str = ""

    def preflight(self, variant, handle, options: ExportOptions) -> Preflight:
        raise NotImplementedError

    def write_job(self, variant, handle, options: ExportOptions, preflight: Preflight,
                  folder: Path) -> Job[Written]:
        raise NotImplementedError

    def reload_job(self, written: Written, handle) -> Job[Reloaded]:
        raise NotImplementedError

    def runtime_bytes(self, variant, handle, options: ExportOptions, preflight: Preflight) -> int:
        """Memory a process of the consumer's own holds while the export is verified (the
        memory guard counts it beside the studio's own): none unless a format runs one."""
        return 0

    def studio_bytes(self, variant, handle) -> dict[str, int]:
        """What the format's own readers and writers hold in the studio's process beside what
        every export counts (`memory.estimate_job`), by name: none unless a format says."""
        return {}

    def usage(self, file: str) -> str:
        """A line or two showing how to load the export (for its README)."""
        raise NotImplementedError
