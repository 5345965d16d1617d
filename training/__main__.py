"""``python -m training dsrl|refine|finetune ...`` (also ``torchrun --nproc-per-node N -m training ...``)."""
from __future__ import annotations

import argparse
import sys

from .launch import (
    add_arguments,
    add_finetune_arguments,
    add_refine_arguments,
    run_dsrl,
    run_finetune,
    run_refine,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="job", required=True)
    add_arguments(sub.add_parser("dsrl", help="train a DSRL segmenter"))
    add_refine_arguments(sub.add_parser("refine", help="train the CascadePSP refinement module"))
    add_finetune_arguments(sub.add_parser("finetune", help="fine-tune a model on an annotation store"))
    args = parser.parse_args(argv)
    return {"dsrl": run_dsrl, "refine": run_refine, "finetune": run_finetune}[args.job](args)


if __name__ == "__main__":
    sys.exit(main())
