"""What the user has open and has computed, so switching views never recomputes.

One Session per open model. Results computed by jobs are published here only when a job
finishes (never half-way), keyed by what they are: "weight_stats", "activations",
"sensitivity", ... Variants (quantized models) and runs (evaluation/benchmark rows) have their
own lists because several views share them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.core.plan import Plan


@dataclass
class Session:
    handle: Any = None                                  # ModelHandle | None
    plan: Plan = field(default_factory=Plan)
    results: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)  # name -> quantized variant
    runs: list[dict] = field(default_factory=list)      # one dict per evaluation / benchmark run

    def clear_for(self, handle: Any) -> None:
        """A new model: results of the old one no longer apply."""
        self.handle = handle
        self.plan = Plan(architecture=getattr(handle, "architecture", None))
        self.results.clear()
        self.variants.clear()
        self.runs.clear()
