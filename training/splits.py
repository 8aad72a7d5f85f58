"""Patient-level stratified k-fold splits of a cohort CSV: ``python -m training.splits CSV``.

Writes ``OUT/fold_k/train_pid.csv`` and ``OUT/fold_k/val_pid.csv`` (column ``pid``), the layout the
bundle's ``train.json`` and the authors' code read (:mod:`scripts.split_folder`, which also reads
it), and optionally ``OUT/test_pid.csv`` for a held-out test set. A patient is stratified by its
label (malignant if any of its nodules is), so no patient lands in two folds. Deterministic for a
given ``--seed``; the folder appears only complete.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from scripts.cohort import read_cohort
from scripts.errors import UserInputError, exit_on_user_error
from scripts.split_folder import PID_COLUMN, TEST_FILE, TRAIN_FILE, VAL_FILE, fold_folder
from training.staging import new_output_folder

logger = logging.getLogger(__name__)


def patient_labels(csv_path: str | Path) -> dict[str, int]:
    """Per patient: 1 if any of its nodules is malignant, else 0 (validated cohort CSV)."""
    labels: dict[str, int] = {}
    for record in read_cohort(csv_path, require_label=True):
        labels[record.pid] = max(labels.get(record.pid, 0), int(record.label))
    return labels


def make_splits(
    labels: dict[str, int], n_folds: int = 5, test_fraction: float = 0.0, seed: int = 0
) -> tuple[list[tuple[list[str], list[str]]], list[str]]:
    """Stratified patient-level folds (and held-out test patients).

    Args:
        labels: patient id -> 0/1.
        n_folds: number of folds k (>= 2).
        test_fraction: share of patients held out before the folds are made (0 = none).
        seed: random seed.

    Returns:
        ``[(train_pids, val_pids)] * k`` and the sorted test pids.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split  # slow import: only when splitting

    if n_folds < 2:
        raise UserInputError(f"--folds must be at least 2, got {n_folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise UserInputError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    pids = np.array(sorted(labels))
    y = np.array([labels[p] for p in pids])
    test: list[str] = []
    if test_fraction > 0:
        pids, test_pids, y, _ = train_test_split(
            pids, y, test_size=test_fraction, stratify=y, random_state=seed
        )
        test = sorted(test_pids.tolist())
    counts = Counter(y.tolist())
    if len(counts) < 2 or min(counts.values()) < n_folds:
        raise UserInputError(
            f"{n_folds} stratified folds need at least {n_folds} patients of each class outside the test "
            f"set; there are {dict(sorted(counts.items()))} (patient label = any malignant nodule)"
        )
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = [(sorted(pids[tr].tolist()), sorted(pids[va].tolist())) for tr, va in folds.split(pids, y)]
    return splits, test


def write_splits(splits: list[tuple[list[str], list[str]]], test: list[str], out_dir: str | Path) -> Path:
    """Write the split folder atomically (a temporary sibling renamed into place)."""
    with new_output_folder(out_dir) as staging:
        for k, (train, val) in enumerate(splits):
            fold = fold_folder(staging, k)
            fold.mkdir()
            for name, pids in ((TRAIN_FILE, train), (VAL_FILE, val)):
                _write_pids(fold / name, pids)
        if test:
            _write_pids(staging / TEST_FILE, test)
    return Path(out_dir)


def _write_pids(path: Path, pids: list[str]) -> None:
    path.write_text(f"{PID_COLUMN}\n" + "".join(f"{p}\n" for p in pids))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="cohort CSV (docs/semantic_schema.md)")
    parser.add_argument(
        "--out", type=Path, default=None, help="split folder (default: splits/ beside the CSV)"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--test-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    labels = patient_labels(args.csv)
    splits, test = make_splits(labels, args.folds, args.test_fraction, args.seed)
    out = write_splits(splits, test, args.out or args.csv.parent / "splits")
    print(f"{len(labels)} patients ({Counter(labels.values())[1]} with a malignant nodule) -> {out}")
    for k, (train, val) in enumerate(splits):
        print(f"  fold_{k}: {len(train)} train, {len(val)} val patients")
    if test:
        print(f"  test: {len(test)} patients")


if __name__ == "__main__":
    main()
