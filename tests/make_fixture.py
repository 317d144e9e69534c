"""Regenerate tests/data, the small real-MNIST fixture the tests train and evaluate on.

    python -m tests.make_fixture --source ../shared/datasets/mnist

Takes the first 3,000 training and the first 1,000 test images of the real MNIST (their class
balance is close to the full set's) and writes them as gzip'd IDX files with the standard
names, so the same loader reads the fixture and the full set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model import idx

FIXTURE_DIR = Path(__file__).parent / "data"
TRAIN_COUNT = 3000
TEST_COUNT = 1000


def make_fixture(source: Path, out: Path = FIXTURE_DIR) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", TRAIN_COUNT), ("test", TEST_COUNT)):
        data = idx.load_split(source, split)
        images_name, labels_name = idx.FILES[split]
        idx.write_idx(out / f"{images_name}.gz", data.images[:count])
        idx.write_idx(out / f"{labels_name}.gz", data.labels[:count])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with the full MNIST")
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR)
    args = parser.parse_args(argv)
    make_fixture(args.source, args.out)


if __name__ == "__main__":
    main()
