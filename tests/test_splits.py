"""Patient-level stratified splits (``python -m training.splits``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO_ROOT
from scripts.errors import UserInputError
from scripts.split_folder import read_split
from training.splits import make_splits, write_splits

LABELS = {f"P{i:03d}": int(i % 3 == 0) for i in range(30)}  # 10 malignant, 20 benign patients


@pytest.mark.parametrize(("n_folds", "test_fraction"), [(5, 0.0), (3, 0.2)])
def test_folds_are_disjoint_by_patient_cover_everyone_and_are_stratified(
    n_folds: int, test_fraction: float
) -> None:
    splits, test = make_splits(LABELS, n_folds, test_fraction, seed=1)
    assert len(splits) == n_folds
    vals = [set(val) for _, val in splits]
    for (train, val), val_set in zip(splits, vals, strict=True):
        assert not set(train) & val_set
        assert not set(test) & (set(train) | val_set)
        assert set(train) | val_set | set(test) == set(LABELS)
        share = sum(LABELS[p] for p in val) / len(val)
        assert abs(share - 1 / 3) <= 0.15  # each fold keeps about the cohort's 1/3 malignant
    for i, a in enumerate(vals):
        for b in vals[i + 1 :]:
            assert not a & b, "a patient is validated in two folds"
    assert set().union(*vals) == set(LABELS) - set(test)


def test_splits_are_deterministic_per_seed() -> None:
    assert make_splits(LABELS, 5, 0.1, seed=3) == make_splits(LABELS, 5, 0.1, seed=3)
    assert make_splits(LABELS, 5, 0.1, seed=3) != make_splits(LABELS, 5, 0.1, seed=4)


def test_written_layout_reads_back_with_the_bundle_reader(tmp_path: Path) -> None:
    splits, test = make_splits(LABELS, 5, 0.2, seed=0)
    out = write_splits(splits, test, tmp_path / "splits")
    for k, (train, val) in enumerate(splits):
        assert read_split(out, k) == (set(train), set(val))
    assert pd.read_csv(out / "test_pid.csv", dtype=str)["pid"].tolist() == test


@pytest.mark.parametrize(
    ("labels", "n_folds", "message"),
    [
        ({"A": 0, "B": 0, "C": 0}, 2, "at least 2 patients of each class"),
        ({"A": 1, "B": 0, "C": 0, "D": 0}, 2, "at least 2 patients of each class"),
        (LABELS, 1, "at least 2"),
    ],
)
def test_impossible_splits_are_user_errors(labels: dict, n_folds: int, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        make_splits(labels, n_folds)


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "splits").mkdir()
    with pytest.raises(UserInputError, match="already exists"):
        write_splits(*make_splits(LABELS, 2), tmp_path / "splits")


def test_command_line_on_a_cohort_csv(tmp_path: Path) -> None:
    rows = [
        {"pid": pid, "nodule_id": n, "image_path": "x.nii.gz", "coordX": 0, "coordY": 0, "coordZ": 0,
         "malignant": label if n == 0 else 0}
        for pid, label in LABELS.items() for n in range(2)
    ]  # fmt: skip
    csv_path = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    command = [
        sys.executable,
        "-m",
        "training.splits",
        str(csv_path),
        "--folds",
        "3",
        "--test-fraction",
        "0.2",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "30 patients (10 with a malignant nodule)" in result.stdout
    assert (tmp_path / "splits" / "fold_2" / "val_pid.csv").is_file()
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert again.returncode == 2
    assert any(line.startswith("error: ") and "already exists" in line for line in again.stderr.splitlines())
    assert "Traceback" not in again.stderr
