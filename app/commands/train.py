"""``finemask train dsrl ...``: train models (see :mod:`training.launch`)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from training.launch import add_arguments, run_dsrl

    p = sub.add_parser("train", help="train a model (dsrl)")
    jobs = p.add_subparsers(dest="job", required=True)
    dsrl = jobs.add_parser("dsrl", help="train a DSRL segmenter; torchrun -m training dsrl for several GPUs")
    add_arguments(dsrl)
    dsrl.set_defaults(run=run_dsrl)
