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
