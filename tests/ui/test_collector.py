"""Cyclic garbage made on job threads is freed on the UI thread (Qt objects must die there)."""
import gc
import threading
import time

from studio.core import garbage


class Cycle:
    """Part of a reference cycle that records the thread its finalizer ran on."""
    freed_on: list[int] = []

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        Cycle.freed_on.append(threading.get_ident())


def test_a_workers_cycles_are_freed_on_the_ui_thread(qtbot, _garbage_on_the_ui_thread):
    assert not gc.isenabled()
    Cycle.freed_on.clear()

    kept = []

    def work() -> None:
        for _ in range(20):
            Cycle()
        # Far past the interpreter's threshold: with automatic collection on, a collection
        # would run here, on this thread.
        kept.extend([i] for i in range(5 * gc.get_threshold()[0]))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    qtbot.waitUntil(lambda: len(Cycle.freed_on) == 20, timeout=30000)
    assert set(Cycle.freed_on) == {threading.get_ident()}
    assert kept


def test_a_job_asking_for_a_collection_gets_it_on_the_ui_thread(qtbot, monkeypatch,
                                                                 _garbage_on_the_ui_thread):
    import studio.ui.collector as collector

    monkeypatch.setattr(collector, "WAIT_FOR_UI_S", 60)   # a loaded machine's UI thread is slow
    Cycle.freed_on.clear()
    returned = []

    def job() -> None:
        Cycle()
        garbage.collect()
        returned.append(list(Cycle.freed_on))

    worker = threading.Thread(target=job)
    worker.start()
    qtbot.waitUntil(lambda: bool(returned), timeout=60000)
    worker.join()
    assert returned == [[threading.get_ident()]]   # freed before the job went on


def test_a_busy_ui_thread_does_not_hold_the_job_forever(_garbage_on_the_ui_thread, monkeypatch):
    import studio.ui.collector as collector

    monkeypatch.setattr(collector, "WAIT_FOR_UI_S", 0.2)
    worker = threading.Thread(target=garbage.collect)
    start = time.perf_counter()
    worker.start()
    worker.join(5)           # the UI thread runs no events meanwhile
    assert not worker.is_alive() and time.perf_counter() - start < 2


def _drive(collector, rounds: int, kept: list) -> None:
    """Allocate past the young threshold and let the collector look, `rounds` times; each
    round's lists are kept alive in `kept` (the count of young objects falls back when they
    are freed), so they reach the oldest generation."""
    for _ in range(rounds):
        kept.append([[] for _ in range(collector.threshold[0] + 50)])
        collector.check()


def test_the_timer_collects_the_oldest_generation_only_once_it_grew_by_a_quarter(
        _garbage_on_the_ui_thread):
    """An explicit `gc.collect(2)` skips the interpreter's rule that a full collection waits
    until the long-lived objects grew by a quarter; with torch loaded it walked ~450 k objects
    (1-3 s under load) every ~100 young collections. The collector applies the rule itself."""
    collector = _garbage_on_the_ui_thread
    gc.freeze()                     # this test's full collections walk only what it makes
    try:
        collector.long_lived, collector.pending = 10**9, 0
        full, young = collector.full_collections, collector.collections
        Cycle.freed_on.clear()
        Cycle()
        kept: list = []
        _drive(collector, 300, kept)  # 300 young collections: the third generation crossed ~2x
        assert collector.full_collections == full
        assert collector.collections - young >= 300
        assert Cycle.freed_on == [threading.get_ident()]   # young cycles are still freed

        collector.long_lived = 4000
        _drive(collector, 300, kept)  # 225 k more survivors: far past a quarter of 4000
        assert collector.full_collections > full
        assert collector.long_lived >= 225_000          # counted again by the full one
    finally:
        gc.unfreeze()


def test_a_freeze_asked_from_a_worker_is_done_on_the_ui_thread(qtbot, _garbage_on_the_ui_thread):
    """The window freezes its imports' objects once a background import is done, from that
    thread: the freeze is carried out on the UI thread, and the objects alive then are left
    out of the collections after it."""
    collector = _garbage_on_the_ui_thread
    alive = [[] for _ in range(1000)]
    try:
        worker = threading.Thread(target=collector.freeze)
        worker.start()
        worker.join()
        qtbot.waitUntil(lambda: gc.get_freeze_count() >= len(alive), timeout=30000)
        assert collector.long_lived == 0 and collector.pending == 0
        collected = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        assert not any(id(x) in collected for x in alive)
    finally:
        gc.unfreeze()


def test_a_benchmark_in_the_window_leaves_the_windows_frozen_objects_frozen(
        _garbage_on_the_ui_thread):
    """Headless, a benchmark freezes what is alive and unfreezes it after
    (`garbage.long_lived_frozen`, tested in tests/core/test_bench.py); in the window the
    collector froze the imports for good, and the benchmark's unfreeze gave them back to every
    collection (a 1-3 s full collection again)."""
    gc.freeze()                                   # what the window froze
    frozen = gc.get_freeze_count()
    try:
        with garbage.long_lived_frozen():
            during = gc.get_freeze_count()
        assert gc.get_freeze_count() > 0.9 * frozen   # (a frozen object freed leaves it)
        assert during <= frozen                       # and nothing more was frozen for good
    finally:
        gc.unfreeze()
