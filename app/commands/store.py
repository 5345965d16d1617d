"""``finemask store ...``: make and inspect annotation stores from the command line."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="add to, inspect or undo in an annotation store")
    jobs = p.add_subparsers(dest="job", required=True)
    add = jobs.add_parser("add", help="add image/labels pairs (labels matched to images by file stem)")
    add.add_argument("store", type=Path)
    add.add_argument("images", type=Path, nargs="+", help="image files")
    add.add_argument("--labels", type=Path, required=True, help="folder of label files named like the images")
    add.add_argument("--origin", default="corrected", choices=["predicted", "refined", "corrected"])
    add.set_defaults(run=run_add)
    info = jobs.add_parser("info", help="list the pairs, splits, classes and problems")
    info.add_argument("store", type=Path)
    info.set_defaults(run=run_info)
    names = jobs.add_parser("classes", help="name the store's class ids (index = id)")
    names.add_argument("store", type=Path)
    names.add_argument("names", nargs="+")
    names.set_defaults(run=run_classes)
    undo = jobs.add_parser("undo", help="restore a pair's previous labels version")
    undo.add_argument("store", type=Path)
    undo.add_argument("pair")
    undo.set_defaults(run=run_undo)


def run_add(args: argparse.Namespace) -> int:
    """Add each image with its label file (matched by file stem).

    One image: a problem is the command's error (exit 2). Several: each problem is reported and
    the other pairs are added (exit 1 if any failed). A store folder that does not exist yet is
    made only once a pair has been read without problems, and removed again if no pair could be
    added to it (say, the disk is full).
    """
    from engine.errors import FineMaskError
    from engine.io import LABEL_SUFFIXES, read_image, read_labels
    from engine.store import MANIFEST, Store, discard_new_store

    store = Store.open(args.store) if (args.store / MANIFEST).is_file() else None
    made_here = store is None
    failed = added = 0
    try:
        for image in args.images:
            candidates = [args.labels / f"{image.stem}{s}" for s in LABEL_SUFFIXES]
            labels = next((c for c in candidates if c.is_file()), None)
            try:
                if labels is None:
                    raise FineMaskError(f"no label file named {image.stem}.* in {args.labels}", image)
                if store is None:  # read the pair before making a new store folder for it
                    read_labels(labels, shape=read_image(image).shape[:2])
                    store = Store.open(args.store)
                pair = store.add(image, labels, origin=args.origin, name=image.stem)
                added += 1
                print(f"added {pair} ({store.get(pair).split})")
            except FineMaskError as exc:
                if len(args.images) == 1:
                    raise
                failed += 1
                print(f"skipped: {exc}")
    finally:
        if made_here and store is not None and not added:
            discard_new_store(args.store)
    return 1 if failed else 0


def run_info(args: argparse.Namespace) -> int:
    from engine.store import Store

    store = Store.open(args.store, create=False)
    for rec in store.pairs():
        print(f"{rec.id}\t{rec.split}\t{rec.shape[1]}x{rec.shape[0]}\t{rec.origin}\tclasses {list(rec.classes)}"
              f"\tversions {rec.history_length + 1}")
    print(f"{len(store.pairs('train'))} train, {len(store.pairs('validation'))} validation pairs; "
          f"class names {store.class_names}; content hash {store.content_hash()[:12]}")
    for problem in store.problems:
        print(f"problem: {problem}")
    return 0


def run_classes(args: argparse.Namespace) -> int:
    from engine.store import Store

    Store.open(args.store).set_class_names(args.names)
    return 0


def run_undo(args: argparse.Namespace) -> int:
    from engine.store import Store

    rec = Store.open(args.store, create=False).undo(args.pair)
    print(f"{rec.id}: labels back to the version of {rec.updated}")
    return 0
