"""Where a job asks for Python's cyclic garbage to be collected (`collect`).

A collection runs the finalizers of everything it frees on the thread that asked for it. In the
window, that must be the UI thread: a Qt object freed from a worker thread crashes the process.
So the window routes these requests to its UI thread (`set_collector`, `studio.ui.collector`);
headless, a request is plain `gc.collect()`.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator

_collect: Callable[[], object] | None = None   # None: gc.collect


def collect() -> None:
    """Collect every generation, on whatever thread the current collector uses."""
    (_collect or gc.collect)()


def set_collector(collector: Callable[[], object] | None) -> None:
    """Route `collect` to `collector` (None: back to `gc.collect`)."""
    global _collect
    _collect = collector


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Inside the block, collections leave out every object alive at its start (`gc.freeze`):
    a full collection walks every tracked object with the interpreter's lock held, 0.8 s in a
    process holding the demo. Headless, the block freezes and unfreezes. In the window the
    collector froze the process's long-lived objects once its imports were done
    (`ui/collector.py`), and an unfreeze here would give them back to every collection after
    the block: nothing is done."""
    if _collect is not None:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
