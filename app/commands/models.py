"""``finemask models get|add|list|remove``: the official weights and the user's installed models.

``get NAME`` downloads a model of the registry (``engine.installed.REGISTRY``), checks its
checksum and installs it; ``add FILE`` installs a file downloaded by hand (or a model folder);
``list`` shows shipped, installed and downloadable models (and a store's fine-tuned versions
with ``--store``); ``remove NAME`` deletes an installed model.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="download, add, list and remove models (official CascadePSP weights, ...)")
    jobs = p.add_subparsers(dest="job", required=True)
    get = jobs.add_parser("get", help="download a model, check its checksum and install it")
    get.add_argument("name", help="a name from `finemask models list` (e.g. cascadepsp)")
    get.set_defaults(run=run_get)
    add = jobs.add_parser("add", help="install a file downloaded by hand (official CascadePSP 'model' file, "
                                      "torchvision ResNet .pth) or a FineMask model folder")
    add.add_argument("file", type=Path, help="weights file or model folder")
    add.add_argument("--name", default=None,
                     help="name to install it under (default: cascadepsp / resnetNN-imagenet / the card's name)")
    add.set_defaults(run=run_add)
    ls = jobs.add_parser("list", help="shipped, installed and downloadable models, with their card metrics")
    ls.add_argument("--store", type=Path, default=None, help="also list this annotation store's fine-tuned versions")
    ls.set_defaults(run=run_list)
    rm = jobs.add_parser("remove", help="delete an installed model (shipped models stay)")
    rm.add_argument("name")
    rm.set_defaults(run=run_remove)


def run_get(args: argparse.Namespace) -> int:
    from engine import installed

    if args.name in {m.name for m in installed.list_installed()}:
        print(f"{args.name} is already installed in {installed.models_dir() / args.name}")
        return 0
    with tqdm(total=0, desc=args.name, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        def on_progress(done: int, total: int, message: str) -> None:
            if not message.startswith("downloading"):
                bar.set_description_str(message)
                return
            if bar.total != total:
                bar.reset(total=total or None)
            bar.update(done - bar.n)  # tqdm redraws at most 10 times a second

        folder = installed.get(args.name, on_progress=on_progress)
    print(f"installed {args.name} in {folder}")
    _say_default(args.name)
    return 0


def run_add(args: argparse.Namespace) -> int:
    from engine import installed

    folder = installed.add(args.file, args.name)
    print(f"installed {folder.name} in {folder}")
    _say_default(folder.name)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from engine import installed

    installed.remove(args.name)
    print(f"removed {args.name}; the default refiner is now {installed.default_refiner()}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from engine import installed
    from engine.checkpoints import read_card, shipped_models

    default = installed.default_refiner()
    mark = {default: " (default refiner)"}
    print("shipped:")
    for name in shipped_models():
        card = read_card(name)
        _row(name + mark.get(name, ""), card.task, metrics_summary(card.metrics))
    models = installed.list_installed()
    print(f"installed ({installed.models_dir()}):")
    if not models:
        print("  none")
    for m in models:
        _row(m.name + mark.get(m.name, ""), m.kind, metrics_summary(m.metrics))
    print("downloadable (`finemask models get NAME`):")
    have = {m.name for m in models}
    for entry in installed.REGISTRY.values():
        _row(entry.name + (" (installed)" if entry.name in have else ""), entry.kind, entry.description)
    if args.store is not None:
        from engine.errors import FineMaskError
        from engine.versions import list_versions

        if not args.store.is_dir():
            raise FineMaskError("no such annotation store folder", args.store)
        versions = list_versions(args.store)
        print(f"fine-tuned in {args.store}:")
        if not versions:
            print("  none")
        for name, _folder, card in versions:
            _row(name, card.task, metrics_summary(card.metrics))
    return 0


def _row(name: str, kind: str, detail: str) -> None:
    print(f"  {name:<34} {kind:<13} {detail}".rstrip())


def _say_default(name: str) -> None:
    from engine.installed import default_refiner

    if default_refiner() == name:
        print(f"{name} is now the default refiner (finemask refine/segment/batch, napari, web)")


#: Scores shown for a card, in this order, with the name they are shown under.
_SHOWN = (("miou", "mIoU"), ("iou_after", "IoU"), ("mba_after", "mBA"), ("psnr", "PSNR"), ("ssim", "SSIM"))


def metrics_summary(metrics: dict[str, Any]) -> str:
    """One short line of a card's metrics: "camvid_val mIoU 57.8", "before→after mIoU 23.3→31.0".

    Fractions are shown as percentages; lists of per-class rows (refinement summaries) as the
    mean of their rows.
    """
    if not metrics:
        return ""
    before, after = metrics.get("before"), metrics.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        b, a = _score(before), _score(after)
        if b and a and b[0] == a[0]:
            return f"{a[0]} {b[1]}→{a[1]}"
    parts = []
    for key, value in metrics.items():
        score = _score(value.get("summary", value) if isinstance(value, dict) else value)
        if score:
            parts.append(f"{key} {score[0]} {score[1]}")
    return "; ".join(parts[:3])


def _score(value: Any) -> tuple[str, str] | None:
    """(label, value text) of the first known score in a dict, or the mean over a list of row dicts."""
    rows = value if isinstance(value, list) else [value]
    rows = [r for r in rows if isinstance(r, dict)]
    for key, label in _SHOWN:
        nums = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if nums:
            mean = sum(nums) / len(nums)
            text = f"{mean:.2f}" if key in ("psnr", "ssim") else f"{100 * mean if mean <= 1 else mean:.1f}"
            return label, text
    return None
