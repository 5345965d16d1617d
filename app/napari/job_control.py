"""The dock's side of running jobs: progress across threads, and stopping jobs when napari closes.

A job runs in a napari worker thread. :class:`ProgressRelay` carries its progress reports to the UI
thread; :class:`JobControl` holds its cancel flag and the event its thread sets on leaving it, so
that closing the viewer can cancel the job *and wait* for the thread (no thread still in torch while
Python shuts down: the "none_dealloc" crash on exit), then drop the loaded models;
:class:`CloseWatcher` calls it when napari's main window closes.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QEvent, QObject, Signal, Slot
from qtpy.QtWidgets import QWidget

log = logging.getLogger(__name__)
#: How long closing the viewer waits for a running job to stop at its next check.
SHUTDOWN_WAIT_S = 60.0


class ProgressRelay(QObject):
    """Carries progress reports from a worker thread to the UI thread (a queued signal)."""

    progressed = Signal(int, int, str)

    def __init__(self, callback: Callable[[int, int, str], None]):
        super().__init__()
        self._callback = callback
        self.progressed.connect(self._deliver)

    def report(self, done: int, total: int, message: str) -> None:
        """Called in the worker thread; the callback runs later in the UI thread."""
        self.progressed.emit(int(done), int(total), str(message))

    @Slot(int, int, str)
    def _deliver(self, done: int, total: int, message: str) -> None:
        self._callback(done, total, message)


class JobControl:
    """The running job's cancel flag and "thread has left it" event, and the models it loads
    (a ``ModelCache``): what stopping the jobs needs, apart from the widget (whose handlers may
    outlive it)."""

    def __init__(self, models: Any):
        self.models = models
        self.cancel = threading.Event()
        self.done: threading.Event | None = None  # set by the worker thread when its job returns
        self.closed = False  # after shutdown: the job's late signals no longer reach the widgets

    def shutdown(self, wait_s: float = SHUTDOWN_WAIT_S) -> bool:
        """Cancel the running job, wait for its thread to leave it, release the loaded models.
        True when no job runs any more."""
        self.closed = True
        self.cancel.set()
        done = self.done
        stopped = done is None or done.wait(wait_s)
        if not stopped:
            log.warning("FineMask: the running job did not stop within %.0f s of the viewer closing", wait_s)
        self.models.clear()
        return stopped


class CloseWatcher(QObject):
    """Stops the jobs when napari's main window closes (its hide after an accepted close, not a
    minimise): the worker thread and the loaded models must not outlive the viewer (a thread
    still in torch while Python shuts down can crash the interpreter on exit)."""

    def __init__(self, window: QWidget, jobs: JobControl):
        super().__init__(window)
        self._jobs = jobs
        window.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Hide and not event.spontaneous() and not obj.isMinimized():
            self._jobs.shutdown()
        return False
