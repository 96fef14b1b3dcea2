"""Where a job asks for Python's cyclic garbage to be collected (`collect`).

A collection runs the finalizers of everything it frees on the thread that asked for it. In the
window, that must be the UI thread: a Qt object freed from a worker thread crashes the process.
So the window routes these requests to its UI thread (`set_collector`, `studio.ui.collector`);
headless, a request is plain `gc.collect()`.
"""
from __future__ import annotations

import gc
from typing import Callable

_collect: Callable[[], object] | None = None   # None: gc.collect


def collect() -> None:
    """Collect every generation, on whatever thread the current collector uses."""
    (_collect or gc.collect)()


def set_collector(collector: Callable[[], object] | None) -> None:
    """Route `collect` to `collector` (None: back to `gc.collect`)."""
    global _collect
    _collect = collector
