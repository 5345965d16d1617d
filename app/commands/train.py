"""``finemask train dsrl ...``: train models (see :mod:`training.launch`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from training.launch import add_arguments, add_refine_arguments, run_dsrl, run_refine

    p = sub.add_parser("train", help="train a model (dsrl, refine) or export a run")
    jobs = p.add_subparsers(dest="job", required=True)
    dsrl = jobs.add_parser("dsrl", help="train a DSRL segmenter; torchrun -m training dsrl for several GPUs")
    add_arguments(dsrl)
    dsrl.set_defaults(run=run_dsrl)
    refine = jobs.add_parser("refine", help="train the refinement module; torchrun -m training refine for GPUs")
    add_refine_arguments(refine)
    refine.set_defaults(run=run_refine)
    export = jobs.add_parser("export", help="write a run (DSRL: evaluated on val) as a model folder")
    export.add_argument("run_dir", type=Path, help="the run folder")
    export.add_argument("--to", type=Path, required=True, help="model folder to create")
    export.add_argument("--name", required=True)
    export.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="the working size a DSRL model expects (required for DSRL runs)")
    export.add_argument("--no-eval", action="store_true", help="skip the validation mIoU")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from training.export import export_dsrl_run, export_refine_run, run_kind

    command = "finemask " + " ".join(sys.argv[1:])
    if run_kind(args.run_dir) == "refine":
        folder = export_refine_run(args.run_dir, args.to, name=args.name, command=command, overwrite=args.overwrite)
        print(f"wrote {folder}")
        return 0
    if args.input_size is None:
        raise ValueError("--input-size W H is required to export a DSRL run")
    bar = tqdm(desc="evaluate", unit="image", disable=args.no_eval)
    folder = export_dsrl_run(
        args.run_dir, args.to, name=args.name, input_size=tuple(args.input_size), evaluate=not args.no_eval,
        overwrite=args.overwrite, command=command,
        on_progress=lambda d, t, m: (setattr(bar, "total", t), bar.update(1)),
    )
    bar.close()
    print(f"wrote {folder}")
    return 0
