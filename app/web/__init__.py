"""FineMask in the browser (Gradio): ``python -m app.web`` serves the page on 127.0.0.1:7860.

``build_app`` builds the page and API, ``launch`` serves it, ``main`` is the command line; the
work itself is in :mod:`app.web.session` (no UI imports), shared with the API endpoints.
"""
from __future__ import annotations

__all__ = ["build_app", "launch", "main"]


def __getattr__(name: str):
    # Gradio is imported only when the server is used, so `import app.web.session` stays light.
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
