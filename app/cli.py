"""The ``finemask`` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import FineMaskError

#: sub-command name -> module in app.commands providing ``add_parser(subparsers)`` and ``run(args)``.
COMMANDS = {
    "segment": "app.commands.segment",
    "refine": "app.commands.refine",
    "demo": "app.commands.demo",
    "train": "app.commands.train",
    "evaluate": "app.commands.evaluate",
    "store": "app.commands.store",
    "finetune": "app.commands.finetune",
    "batch": "app.commands.batch",
    "models": "app.commands.models",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finemask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from app.commands.options import check_options

        check_options(args)  # --device, --threads...: one clear line before any work
        return int(args.run(args) or 0)
    except (FineMaskError, ValueError) as exc:  # ValueError: an option out of range (e.g. --L 10)
        print(f"finemask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finemask {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
