"""Long work is written one way: a generator that yields Progress and returns its result.

    def thing_job(...) -> Job[Result]:
        for i, layer in enumerate(layers):
            yield Progress(i, len(layers), f"layer {layer}")
            ...
        return result

`run()` drives a job to its end (CLI, tests); `ui/workers.py` drives the same generator on a
worker thread. Cancelling closes the generator at its current `yield`, so a job must only
change state the user owns after its last yield (build results on the side, publish at the end).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, TypeVar

from studio.core.errors import Cancelled

T = TypeVar("T")
Job = Generator["Progress", None, T]


@dataclass(frozen=True)
class Progress:
    done: float
    total: float
    message: str = ""
    detail: Any = None  # optional payload for live plots (e.g. a layer's error as it is quantized)

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, max(0.0, self.done / self.total))


class CancelToken:
    """Set from any thread; checked by the runner between a job's steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def run(job: Job[T], on_progress: Callable[[Progress], None] | None = None,
        token: CancelToken | None = None) -> T:
    """Drive `job` to completion and return its result; raise Cancelled if `token` fires."""
    try:
        while True:
            if token is not None and token.cancelled:
                job.close()
                raise Cancelled("cancelled")
            progress = next(job)
            if on_progress is not None:
                on_progress(progress)
    except StopIteration as stop:
        return stop.value


def steps(total: int, message: str) -> Callable[[int, str], Progress]:
    """A small helper for jobs counting steps: `p = steps(n, 'Quantizing'); yield p(i, name)`."""
    return lambda done, what="": Progress(done, total, f"{message} {what}".strip())
