"""``python -m app.web``: start the FineMask web app (see ``--help``)."""
from .server import main

raise SystemExit(main())
