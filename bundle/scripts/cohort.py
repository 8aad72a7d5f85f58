"""Read and validate a cohort CSV (one row per nodule) and patient-level cross-validation splits.

The CSV format is the one the authors' code reads (see ``SEMANTIC_SCHEMA.md``): ``pid``,
``nodule_id``, ``image_path``, ``coordX/Y/Z`` (world LPS mm), ``malignant`` (0/1), the size and
suspicion columns and the 17 semantic columns. Validation collects every problem of the file and
raises one :class:`~scripts.errors.UserInputError` that lists them with line and column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scripts.errors import UserInputError
from scripts.report_text import read_report_file
from scripts.vocabulary import COLUMN_ALIASES, FEATURES, SIZE_COLUMNS, SUSPICION_COLUMN

__all__ = ["LABEL_COLUMN", "REQUIRED_COLUMNS", "NoduleRecord", "read_cohort", "read_split", "select"]

COORD_COLUMNS = ("coordX", "coordY", "coordZ")
REQUIRED_COLUMNS = ("pid", "nodule_id", "image_path", *COORD_COLUMNS)
LABEL_COLUMN = "malignant"
_MAX_LISTED = 200


@dataclass(frozen=True)
class NoduleRecord:
    """One validated nodule of a cohort.

    Attributes:
        pid: Patient id (string; leading zeros kept).
        nodule_id: Nodule id within the patient.
        image_path: CT volume (NIfTI file or DICOM folder); relative paths resolved against the CSV.
        seed_lps: Nodule centroid, world LPS millimetres.
        label: One-year diagnosis 0/1, or ``None`` when not given.
        semantics: Feature column -> canonical value (``None`` when missing), for all 17 features.
        sizes: Size column -> millimetres (``None`` when missing), for all size columns.
        suspicion: Radiologist suspicion, or ``None``.
        line: Line number in the CSV (the header is line 1).
    """

    pid: str
    nodule_id: str
    image_path: Path
    seed_lps: tuple[float, float, float]
    label: int | None
    semantics: dict[str, str | None] = field(default_factory=dict)
    sizes: dict[str, float | None] = field(default_factory=dict)
    suspicion: str | None = None
    line: int = 0

    def as_item(self, report_dir: Path | None = None) -> dict[str, Any]:
        """A collate-friendly MONAI dataset item.

        Args:
            report_dir: Folder of ``{pid}_{nodule_id}.txt`` report files, or ``None``.

        Returns:
            ``image`` (str), ``seed`` (float32, shape (3,), LPS mm), ``label`` (int, -1 when
            unknown), ``pid``, ``nodule_id``, ``semantics`` (column -> value or ""), ``sizes``
            (column -> float, NaN when missing), ``suspicion`` (str or "") and ``report`` (str or "").
        """
        report = (
            read_report_file(Path(report_dir), self.pid, self.nodule_id) if report_dir is not None else None
        )
        return {
            "image": str(self.image_path),
            "seed": np.asarray(self.seed_lps, dtype=np.float32),
            "label": -1 if self.label is None else int(self.label),
            "pid": self.pid,
            "nodule_id": self.nodule_id,
            "semantics": {f.column: self.semantics.get(f.column) or "" for f in FEATURES},
            "sizes": {
                c: float("nan") if self.sizes.get(c) is None else float(self.sizes[c])  # type: ignore[arg-type]
                for c in SIZE_COLUMNS
            },
            "suspicion": self.suspicion or "",
            "report": report or "",
        }


def _cell(row: pd.Series, column: str) -> str | None:
    """Stripped cell text, ``None`` when the column is absent or the cell empty."""
    if column not in row.index:
        return None
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _read_table(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, skip_blank_lines=False)
    except pd.errors.EmptyDataError as error:
        raise UserInputError(f"{path}: the CSV file is empty (no header, no rows)") from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not a readable CSV file: {error}") from error
    table.columns = [str(c).strip() for c in table.columns]
    renames = {
        alias: canonical
        for alias, canonical in COLUMN_ALIASES.items()
        if alias in table.columns and canonical not in table.columns
    }
    return table.rename(columns=renames)


def read_cohort(
    csv_path: str | Path,
    *,
    require_label: bool = True,
    check_images: bool = False,
) -> list[NoduleRecord]:
    """Read and validate a cohort CSV.

    Semantic, size and suspicion columns may be absent (treated as missing); values are matched
    case-insensitively with aliases (see :mod:`scripts.vocabulary`).

    Args:
        csv_path: The cohort CSV.
        require_label: Require a 0/1 ``malignant`` value on every row (training, evaluation).
        check_images: Also check that every image path exists.

    Returns:
        One record per row, in file order.

    Raises:
        UserInputError: The file is missing, empty or has any invalid row; the message lists every
            problem with its line number and column.
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise UserInputError(f"cohort CSV '{path}' does not exist or is not a file")
    table = _read_table(path)
    name = path.name
    required = REQUIRED_COLUMNS + ((LABEL_COLUMN,) if require_label else ())
    missing = [c for c in required if c not in table.columns]
    problems: list[str] = []
    if missing:
        problems.append(
            f"{name}: line 1: missing required column(s): {', '.join(missing)}; the header has: "
            f"{', '.join(table.columns) or '(nothing)'}"
        )
    records: list[NoduleRecord] = []
    first_line: dict[tuple[str, str], int] = {}
    base = path.parent
    for index, row in table.iterrows():
        line = int(index) + 2  # type: ignore[call-overload]
        if all(_cell(row, c) is None for c in table.columns):
            continue  # blank line
        where = f"{name}: line {line}"
        row_problems: list[str] = []
        pid, nodule_id, image = (_cell(row, c) for c in ("pid", "nodule_id", "image_path"))
        for column, value in (("pid", pid), ("nodule_id", nodule_id), ("image_path", image)):
            if value is None and column not in missing:
                row_problems.append(f"{where}: column '{column}' is empty")
        coords: list[float] = []
        for column in COORD_COLUMNS:
            text = _cell(row, column)
            number = None if text is None else _number(text)
            if number is None and column not in missing:
                row_problems.append(
                    f"{where}: column '{column}' must be a finite number (world LPS mm), got '{text or ''}'"
                )
            else:
                coords.append(number)
        label: int | None = None
        label_text = _cell(row, LABEL_COLUMN)
        if label_text is None:
            if require_label:
                row_problems.append(f"{where}: column '{LABEL_COLUMN}' is empty; allowed: 0, 1")
        else:
            number = _number(label_text)
            if number not in (0.0, 1.0):
                row_problems.append(f"{where}: column '{LABEL_COLUMN}' has '{label_text}'; allowed: 0, 1")
            else:
                label = int(number)  # type: ignore[arg-type]
        semantics: dict[str, str | None] = {}
        for feature in FEATURES:
            try:
                semantics[feature.column] = feature.parse(_cell(row, feature.column), where=where)
            except UserInputError as error:
                row_problems.append(str(error))
        sizes: dict[str, float | None] = {}
        for column in SIZE_COLUMNS:
            text = _cell(row, column)
            number = None if text is None else _number(text)
            if text is not None and (number is None or number < 0):
                row_problems.append(
                    f"{where}: column '{column}' must be a non-negative size in mm (or empty), got '{text}'"
                )
            sizes[column] = number
        image_path: Path | None = None
        if image is not None:
            image_path = Path(image).expanduser()
            if not image_path.is_absolute():
                image_path = base / image_path
            if check_images and not image_path.exists():
                row_problems.append(
                    f"{where}: column 'image_path': '{image}' does not exist (looked at {image_path})"
                )
        if pid is not None and nodule_id is not None:
            key = (pid, nodule_id)
            if key in first_line:
                row_problems.append(
                    f"{where}: duplicate (pid, nodule_id) = ({pid}, {nodule_id}); "
                    f"first on line {first_line[key]}"
                )
            else:
                first_line[key] = line
        if row_problems or missing:
            problems.extend(row_problems)
            continue
        records.append(
            NoduleRecord(
                pid=pid,  # type: ignore[arg-type]
                nodule_id=nodule_id,  # type: ignore[arg-type]
                image_path=image_path,  # type: ignore[arg-type]
                seed_lps=(coords[0], coords[1], coords[2]),
                label=label,
                semantics=semantics,
                sizes=sizes,
                suspicion=_cell(row, SUSPICION_COLUMN),
                line=line,
            )
        )
    if problems:
        listed = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise UserInputError(
            f"{name}: {len(problems)} problem(s) in the cohort CSV:\n  " + "\n  ".join(listed) + more
        )
    if not records:  # no problems and no records: only blank lines after the header
        raise UserInputError(f"{name}: the cohort CSV has a header but no rows")
    return records


def _read_pids(path: Path) -> set[str]:
    if not path.is_file():
        raise UserInputError(f"split file '{path}' does not exist")
    try:
        table = pd.read_csv(path, dtype=str)
    except pd.errors.EmptyDataError as error:
        raise UserInputError(f"split file '{path}' is empty; expected a 'pid' column") from error
    table.columns = [str(c).strip() for c in table.columns]
    if "pid" not in table.columns:
        raise UserInputError(f"split file '{path}' has no 'pid' column (columns: {', '.join(table.columns)})")
    pids = {str(p).strip() for p in table["pid"].dropna() if str(p).strip()}
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
    folder = Path(split_dir).expanduser() / f"fold_{fold}"
    if not folder.is_dir():
        raise UserInputError(
            f"split folder '{folder}' does not exist (expected train_pid.csv and val_pid.csv)"
        )
    train = _read_pids(folder / "train_pid.csv")
    val = _read_pids(folder / "val_pid.csv")
    both = sorted(train & val)
    if both:
        shown = ", ".join(both[:10]) + (" ..." if len(both) > 10 else "")
        raise UserInputError(f"split '{folder}': {len(both)} patient(s) in both train and val: {shown}")
    return train, val


def select(records: Iterable[NoduleRecord], pids: Iterable[str]) -> list[NoduleRecord]:
    """The records of the given patients, in their original order.

    Args:
        records: Cohort records.
        pids: Patient ids to keep.

    Returns:
        The matching records.
    """
    wanted = set(pids)
    return [record for record in records if record.pid in wanted]
