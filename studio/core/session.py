"""What the user has open and has computed, so switching views never recomputes.

One Session per open model. Results computed by jobs are published here only when a job
finishes (never half-way), keyed by what they are: "weight_stats", "activations",
"sensitivity", ... Variants (quantized models) and runs (evaluation/benchmark rows) have their
own lists because several views share them.

`Sessions` remembers the sessions of models opened earlier in this run, keyed by where their
weights live and when those files last changed, so re-opening a model brings its results back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.plan import Plan


@dataclass
class Session:
    handle: Any = None                                  # ModelHandle | None
    plan: Plan = field(default_factory=Plan)
    results: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)  # name -> quantized variant
    runs: list[dict] = field(default_factory=list)      # one dict per evaluation / benchmark run


def model_key(handle: Any) -> str:
    """Identity of a model's weights on disk: folder plus each weight file's size and mtime."""
    folder = Path(handle.folder)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return f"{folder.resolve()}|{stamp}"


class Sessions:
    """The sessions of this run, one per distinct model."""

    def __init__(self) -> None:
        self._by_key: dict[str, Session] = {}

    def for_model(self, handle: Any) -> Session:
        """The session of `handle`'s model: the earlier one when it was opened before."""
        key = model_key(handle)
        session = self._by_key.get(key)
        if session is None:
            session = Session(plan=Plan(architecture=handle.architecture))
            self._by_key[key] = session
        # Results were computed on identical weights; the new handle's model takes over.
        session.handle = handle
        return session

    def adopt(self, session: Session) -> None:
        """Make `session` (restored from a file) the one of its model for the rest of the run."""
        self._by_key[model_key(session.handle)] = session
