"""``python -m training dsrl ...`` (also under ``torchrun --nproc-per-node N -m training dsrl ...``)."""
from __future__ import annotations

import argparse
import sys

from .launch import add_arguments, run_dsrl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="job", required=True)
    add_arguments(sub.add_parser("dsrl", help="train a DSRL segmenter"))
    args = parser.parse_args(argv)
    return {"dsrl": run_dsrl}[args.job](args)


if __name__ == "__main__":
    sys.exit(main())
