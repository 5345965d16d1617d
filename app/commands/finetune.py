"""``finemask finetune STORE --base MODEL``: fine-tune a model on an annotation store's corrections.

The same arguments run on several GPUs with ``torchrun --nproc-per-node N -m training finetune``.
"""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from training.launch import add_finetune_arguments, run_finetune

    p = sub.add_parser("finetune", help="fine-tune a model on the corrected labels of an annotation store")
    add_finetune_arguments(p)
    p.set_defaults(run=run_finetune)
