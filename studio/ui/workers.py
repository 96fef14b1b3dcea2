"""The only place that starts threads: runs a core Job on a worker, relays its progress.

Jobs queue on one worker thread (torch already uses every core; two jobs at once would only
fight); a layer's details, short and wanted now, have a second one (`LatestOnly`). Worker threads never touch widgets: everything comes back through Qt signals, which
Qt delivers on the UI thread.
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from studio.core.errors import Cancelled, StudioError
from studio.core.jobs import CancelToken, Job, Progress, run


class JobHandle(QObject):
    """One submitted job: its signals, and cancel()."""
    started = Signal()
    progress = Signal(object)          # Progress
    finished = Signal(object)          # the job's result
    failed = Signal(str, str)          # message, details (traceback; empty for a StudioError)
    cancelled = Signal()
    done = Signal()                    # after any of finished / failed / cancelled

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title
        self.token = CancelToken()
        self.running = False
        self.is_done = False  # set on the worker before `done` is emitted: safe to poll

    def cancel(self) -> None:
        self.token.cancel()


class _Runnable(QRunnable):
    def __init__(self, handle: JobHandle, factory: Callable[[], Job]) -> None:
        super().__init__()
        self.setAutoDelete(True)
        self.handle, self.factory = handle, factory

    def run(self) -> None:
        handle = self.handle
        handle.running = True
        tell(handle.started)
        try:
            if handle.token.cancelled:
                raise Cancelled("cancelled before it started")
            result = run(self.factory(), _coalesced(handle.progress.emit), handle.token)
        except Cancelled:
            tell(handle.cancelled)
        except StudioError as exc:
            tell(handle.failed, str(exc), "")
        except Exception as exc:  # a bug: show it with its traceback, keep the app alive
            tell(handle.failed, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            if handle.token.cancelled:
                tell(handle.cancelled)
            else:
                tell(handle.finished, result)
        finally:
            handle.running = False
            handle.is_done = True
            tell(handle.done)


def tell(signal, *args) -> None:
    """Emit from a worker thread. When the window closed while the work ran, the object the
    signal belongs to is gone and Qt raises; nobody is left to tell, so that report is
    dropped instead of ending the thread with a traceback."""
    try:
        signal.emit(*args)
    except RuntimeError as exc:
        if "deleted" not in str(exc):
            raise


PROGRESS_EVERY = 0.04   # s: plain progress reports closer together than this are dropped


def _coalesced(emit: Callable[[Progress], None]) -> Callable[[Progress], None]:
    """`emit`, except that a report without `detail` (a message and a fraction) that follows
    the last one sent within PROGRESS_EVERY is dropped: a job stepping through thousands of
    small steps would otherwise queue thousands of label and bar updates on the UI thread.
    Reports with a detail (a layer's error for a live plot), and the last step, always go
    through."""
    last = [float("-inf")]

    def send(progress: Progress) -> None:
        now = time.monotonic()
        final = progress.total > 0 and progress.done >= progress.total
        if progress.detail is None and not final and now - last[0] < PROGRESS_EVERY:
            return
        last[0] = now
        emit(progress)

    return send


class JobRunner(QObject):
    """Queues jobs on one worker thread and tells the window which one is current."""
    jobStarted = Signal(object)        # JobHandle
    jobDone = Signal(object)           # JobHandle

    def __init__(self) -> None:
        super().__init__()
        self.pool = QThreadPool()
        self.pool.setMaxThreadCount(1)
        self.active: list[JobHandle] = []

    def submit(self, title: str, factory: Callable[[], Job],
               on_result: Callable[[Any], None] | None = None,
               on_progress: Callable[[Progress], None] | None = None,
               on_failed: Callable[[str, str], None] | None = None) -> JobHandle:
        """Run `factory()` (a Job) on the worker; the callbacks run on the UI thread.

        Everything is connected before the job starts: a signal emitted by the worker before a
        connection exists would be lost. The job starts on the event loop's next turn, so
        the caller's own connections to the returned handle, made right after this returns,
        are in place too (a job failing at once, on an empty file, used to beat them).
        """
        handle = JobHandle(title)
        if on_result is not None:
            handle.finished.connect(on_result)
        if on_progress is not None:
            handle.progress.connect(on_progress)
        if on_failed is not None:
            handle.failed.connect(on_failed)
        handle.started.connect(lambda: self.jobStarted.emit(handle))
        handle.done.connect(lambda: self._done(handle))
        self.active.append(handle)
        QTimer.singleShot(0, self, lambda: self.pool.start(_Runnable(handle, factory)))
        return handle

    def _done(self, handle: JobHandle) -> None:
        if handle in self.active:
            self.active.remove(handle)
        self.jobDone.emit(handle)

    def cancel_all(self) -> None:
        for handle in list(self.active):
            handle.cancel()

    def wait(self, msecs: int = -1) -> bool:
        return self.pool.waitForDone(msecs)


class LatestOnly:
    """Short per-layer jobs (a layer's details for a view) where only the newest matters.

    A request cancels the one before it (it stops at its first step when it has not run yet)
    and a result that arrives for anything but the newest request is dropped: the user moved
    on. They run on their own worker (`AppState.details`), so that a selection made during a
    long job is answered at once instead of after it."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self.key: object = None
        self.handle: JobHandle | None = None

    def request(self, key: object, title: str, factory: Callable[[], Job],
                on_result: Callable[[Any], None],
                on_failed: Callable[[str, str], None] | None = None) -> JobHandle:
        if self.handle is not None and not self.handle.is_done:
            self.handle.cancel()
        self.key = key

        def deliver(result, asked=key) -> None:
            if asked == self.key:
                on_result(result)

        def failed(message, details, asked=key) -> None:
            if asked == self.key and on_failed is not None:
                on_failed(message, details)

        self.handle = self.runner.submit(title, factory, deliver, on_failed=failed)
        return self.handle

    def forget(self) -> None:
        """Nothing asked any more: a pending result is dropped."""
        self.key = None
