"""Make an annotation store from the first N pairs of a dataset split (for the fine-tuning results).

python scripts/dataset_store.py runs/idrid-store --data idrid --split train --first 5
Labels come from the dataset reader (IDRiD: background 0, lesion and optic-disc classes 1..5);
images are copied into the store, which stays outside the repository.
"""
from __future__ import annotations

import argparse

from engine.store import Store
from training.data.registry import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--first", type=int, default=5)
    args = parser.parse_args()
    store, data = Store.open(args.store), load_dataset(args.data, args.split)
    for i in range(min(args.first, len(data))):
        store.add(data.image_paths[i], data.load_labels(i), origin="corrected", name=data.stem(i))
    store.set_class_names(data.classes)
    print(", ".join(f"{p.id} ({p.split})" for p in store.pairs()))


if __name__ == "__main__":
    main()
