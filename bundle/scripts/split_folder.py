"""The split folder of a cohort: its layout, reading one fold, and the cross-checked plan of all folds.

Layout (written by ``python -m training.splits``, read by the bundle's ``train.json`` and by the
authors' code)::

    SPLIT_DIR/fold_<k>/train_pid.csv    training patients of fold k (column ``pid``)
    SPLIT_DIR/fold_<k>/val_pid.csv      validation patients of fold k
    SPLIT_DIR/test_pid.csv              held-out test patients (optional)

A patient is in the validation set of at most one fold and never both in the test set and a fold.
Needs pandas only (no torch, no MONAI): importing it is fast.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from scripts.errors import UserInputError

__all__ = [
    "PID_COLUMN",
    "TEST_FILE",
    "TRAIN_FILE",
    "VAL_FILE",
    "SplitPlan",
    "fold_folder",
    "fold_numbers",
    "read_pids",
    "read_split",
    "read_split_plan",
    "split_problems",
]

TRAIN_FILE = "train_pid.csv"
VAL_FILE = "val_pid.csv"
TEST_FILE = "test_pid.csv"
PID_COLUMN = "pid"

_FOLD_DIR = re.compile(r"^fold_(\d+)$")
_LISTED = 10


def _listing(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in list(items)[:_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _LISTED else "")


def fold_folder(split_dir: str | Path, fold: int) -> Path:
    """``SPLIT_DIR/fold_<fold>``."""
    return Path(split_dir).expanduser() / f"fold_{fold}"


def fold_numbers(split_dir: str | Path) -> list[int]:
    """The ``k`` of every ``fold_<k>`` folder of ``split_dir``, sorted (none when it is no folder)."""
    folder = Path(split_dir).expanduser()
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _FOLD_DIR.match(p.name)))


def read_pids(path: Path) -> set[str]:
    """The patient ids of one split file (column ``pid``; blank cells skipped, ids stripped).

    Raises:
        UserInputError: the file is missing, empty, has no ``pid`` column or lists no patient.
    """
    if not path.is_file():
        raise UserInputError(f"split file '{path}' does not exist")
    try:
        table = pd.read_csv(path, dtype=str)
    except pd.errors.EmptyDataError as error:
        raise UserInputError(f"split file '{path}' is empty; expected a '{PID_COLUMN}' column") from error
    table.columns = [str(c).strip() for c in table.columns]
    if PID_COLUMN not in table.columns:
        raise UserInputError(
            f"split file '{path}' has no '{PID_COLUMN}' column (columns: {', '.join(table.columns)})"
        )
    pids = {str(p).strip() for p in table[PID_COLUMN].dropna() if str(p).strip()}
    if not pids:
        raise UserInputError(f"split file '{path}' lists no patient ids")
    return pids


def read_split(split_dir: Path, fold: int) -> tuple[set[str], set[str]]:
    """Read the patient ids of one cross-validation fold.

    Args:
        split_dir: Folder with ``fold_{k}/train_pid.csv`` and ``fold_{k}/val_pid.csv`` (column ``pid``).
        fold: Fold number.

    Returns:
        ``(train_pids, val_pids)``.

    Raises:
        UserInputError: A file is missing or malformed, or a patient is in both sets.
    """
    folder = fold_folder(split_dir, fold)
    if not folder.is_dir():
        raise UserInputError(f"split folder '{folder}' does not exist (expected {TRAIN_FILE} and {VAL_FILE})")
    train = read_pids(folder / TRAIN_FILE)
    val = read_pids(folder / VAL_FILE)
    both = sorted(train & val)
    if both:
        shown = ", ".join(both[:10]) + (" ..." if len(both) > 10 else "")
        raise UserInputError(f"split '{folder}': {len(both)} patient(s) in both train and val: {shown}")
    return train, val


@dataclass(frozen=True)
class SplitPlan:
    """Patient ids of the chosen folds' train and validation sets, and of the test set."""

    folds: tuple[int, ...]
    train: dict[int, frozenset[str]]
    val: dict[int, frozenset[str]]
    test: frozenset[str]

    def heldout_fold(self, pid: str) -> int:
        """The chosen fold whose validation set holds ``pid``; -1 when none does."""
        for fold in self.folds:
            if pid in self.val[fold]:
                return fold
        return -1


def read_split_plan(split_dir: Path, folds: Sequence[int], cohort_pids: set[str]) -> SplitPlan:
    """Read every fold of the split folder and cross-check it against the chosen folds and the cohort.

    Args:
        split_dir: the split folder.
        folds: the folds that will be used (e.g. those of a bundle's models).
        cohort_pids: every patient of the cohort CSV.

    Returns:
        the chosen folds' patients and the test patients.

    Raises:
        UserInputError: a fold folder is missing, a patient is in two validation sets or in the test
            set and a fold, the split lists patients the cohort lacks, or a cohort patient is in no
            split file.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserInputError(f"split folder '{split_dir}' does not exist")
    present = fold_numbers(split_dir)
    missing = [fold for fold in folds if fold not in present]
    if missing:
        raise UserInputError(
            f"split folder '{split_dir}' has no fold_{missing[0]}/ (the models are of fold(s) "
            f"{_listing(list(folds))}; the split has {_listing(present) or 'no fold folder'})"
        )
    train: dict[int, frozenset[str]] = {}
    val: dict[int, frozenset[str]] = {}
    for fold in present:
        fold_train, fold_val = read_split(split_dir, fold)
        train[fold], val[fold] = frozenset(fold_train), frozenset(fold_val)
    test_file = split_dir / TEST_FILE
    test = frozenset(read_pids(test_file)) if test_file.is_file() else frozenset()
    seen: dict[str, int] = {}
    for fold in present:
        for pid in sorted(val[fold]):
            if pid in seen:
                raise UserInputError(
                    f"split '{split_dir}': patient {pid} is in the validation sets of fold_{seen[pid]} and "
                    f"fold_{fold}; a patient must be held out by one fold only (rebuild the split)"
                )
            seen[pid] = fold
    in_folds = set().union(*train.values(), *val.values())
    leaked = sorted(test & in_folds)
    if leaked:
        raise UserInputError(
            f"split '{split_dir}': {len(leaked)} test patient(s) also in a fold's train/val set: "
            f"{_listing(leaked)}"
        )
    listed = in_folds | test
    unknown = sorted(listed - cohort_pids)
    if unknown:
        raise UserInputError(
            f"split '{split_dir}' lists {len(unknown)} patient(s) absent from the cohort CSV: "
            f"{_listing(unknown)}; is it the split of this cohort?"
        )
    unsplit = sorted(cohort_pids - listed)
    if unsplit:
        raise UserInputError(
            f"{len(unsplit)} patient(s) of the cohort CSV are in no file of the split '{split_dir}': "
            f"{_listing(unsplit)}; is it the split of this cohort?"
        )
    return SplitPlan(
        folds=tuple(folds),
        train={fold: train[fold] for fold in folds},
        val={fold: val[fold] for fold in folds},
        test=test,
    )


def _pid_lines(path: Path) -> dict[str, int]:
    """Patient id -> first line in a split file (validated as :func:`read_pids` does)."""
    read_pids(path)
    table = pd.read_csv(path, dtype=str, skip_blank_lines=False)
    table.columns = [str(c).strip() for c in table.columns]
    lines: dict[str, int] = {}
    for index, value in table[PID_COLUMN].items():
        if isinstance(value, str) and value.strip():
            lines.setdefault(value.strip(), int(index) + 2)  # type: ignore[call-overload]
    return lines


def split_problems(
    split_dir: Path, fold: int | None, csv_pids: set[str], csv_name: str
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Every problem of one fold (or of every ``fold_<k>`` when ``fold`` is None) against a cohort.

    Args:
        split_dir: the split folder.
        fold: the fold to check, or None for all.
        csv_pids: the patients of the cohort CSV.
        csv_name: the cohort CSV's name, for the messages.

    Returns:
        the problems (each naming its file and line) and, per fold without problems,
        ``(k, train patients, val patients)``.
    """
    folder = Path(split_dir).expanduser()
    if not folder.is_dir():
        return [f"split folder '{folder}' does not exist (expected fold_k/{TRAIN_FILE}, {VAL_FILE})"], []
    if fold is None:
        folds = fold_numbers(folder)
        if not folds:
            return [f"split folder '{folder}' has no fold_k folders"], []
    else:
        folds = [int(fold)]
    problems: list[str] = []
    counts: list[tuple[int, int, int]] = []
    for k in folds:
        fold_dir = fold_folder(folder, k)
        if not fold_dir.is_dir():
            problems.append(f"split folder '{fold_dir}' does not exist (expected {TRAIN_FILE}, {VAL_FILE})")
            continue
        sides: dict[str, dict[str, int]] = {}
        for side, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
            file = fold_dir / name
            try:
                sides[side] = _pid_lines(file)
            except UserInputError as error:
                problems.append(str(error))
                continue
            unknown = [(pid, line) for pid, line in sides[side].items() if pid not in csv_pids]
            if unknown:
                shown = ", ".join(f"line {line} '{pid}'" for pid, line in unknown[:10])
                more = " ..." if len(unknown) > 10 else ""
                problems.append(f"{file}: {len(unknown)} patient id(s) not in {csv_name}: {shown}{more}")
        if len(sides) < 2:
            continue
        both = sorted(set(sides["train"]) & set(sides["val"]))
        if both:
            shown = ", ".join(
                f"'{pid}' ({TRAIN_FILE} line {sides['train'][pid]}, {VAL_FILE} line {sides['val'][pid]})"
                for pid in both[:10]
            )
            problems.append(
                f"split '{fold_dir}': {len(both)} patient(s) in both train and val: {shown}"
                + (" ..." if len(both) > 10 else "")
            )
        else:
            counts.append((k, len(sides["train"]), len(sides["val"])))
    return problems, counts
