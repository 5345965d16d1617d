"""The one exception type FineMask raises for problems a user can fix."""
from __future__ import annotations

from pathlib import Path


class FineMaskError(Exception):
    """A problem with user input (a file, a model, an argument), stated in plain words.

    ``path`` names the file concerned when there is one; the message always includes it.
    """

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class Cancelled(Exception):
    """A job stopped because its ``cancel()`` check returned True (every job raises this one type)."""
