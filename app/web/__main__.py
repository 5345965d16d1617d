"""``python -m app.web``: start the FineMask web app (see ``--help``)."""
from engine.memory import limit_malloc_arenas

limit_malloc_arenas()  # before the import below: gradio starts threads as it loads

from .server import main  # noqa: E402 - after the arena cap, on purpose

raise SystemExit(main())
