"""CLI sub-commands, one module each, registered in :mod:`app.cli`."""
