"""Driving the FineMask dock in a real napari viewer: open it, run a job, answer its questions."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

JOB_TIMEOUT_MS = 60_000


def open_widget(viewer):
    """Open the dock widget the way a user does: from the plugin's manifest."""
    from app.napari.widget import FineMaskWidget

    _, widget = viewer.window.add_plugin_dock_widget("finemask", "FineMask")
    assert isinstance(widget, FineMaskWidget)
    return widget


def run_job(qtbot, widget, start: Callable[[], None]) -> None:
    """Start a job and wait for the UI to be idle again; fail on an error notification."""
    start()
    qtbot.waitUntil(lambda: not widget.busy, timeout=JOB_TIMEOUT_MS)
    qtbot.wait(10)  # let queued progress signals land
    assert widget.last_error is None, repr(widget.last_error)


def answer_questions(answers: list[str], asked: list[str]):
    """Answer the dock's message boxes as they open, in order ("Yes"/"No"); each question's text
    goes to ``asked``. Returns the timer (stop it when done)."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    def look() -> None:
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox) and answers:
            asked.append(box.text())
            button = getattr(QMessageBox.StandardButton, answers.pop(0))
            box.button(button).click()

    timer = QTimer()
    timer.timeout.connect(look)
    timer.start(20)
    return timer


def not_blank(rgba: np.ndarray) -> bool:
    """A screenshot with content: many colours, not one flat fill."""
    rgb = rgba[..., :3].reshape(-1, 3)
    return rgb.std() > 10 and len(np.unique(rgb[:: max(1, len(rgb) // 20000)], axis=0)) > 50
