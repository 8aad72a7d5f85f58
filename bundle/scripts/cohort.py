"""Read and validate a cohort CSV (one row per nodule), and check it with its split folder.

The CSV format is the one the authors' code reads (see ``docs/semantic_schema.md``): ``pid``,
``nodule_id``, ``image_path``, ``coordX/Y/Z`` (world LPS mm), ``malignant`` (0/1), the size and
suspicion columns and the 17 semantic columns. Validation collects every problem of the file and
raises one :class:`~scripts.errors.UserInputError` that lists them with line and column. The split
folder itself is read by :mod:`scripts.split_folder`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scripts.errors import UserInputError
from scripts.split_folder import split_problems
from scripts.vocabulary import COLUMN_ALIASES, FEATURES, SIZE_COLUMNS, SUSPICION_COLUMN

__all__ = [
    "LABEL_COLUMN",
    "REQUIRED_COLUMNS",
    "CohortSummary",
    "NoduleRecord",
    "read_cohort",
    "select",
    "validate_cohort",
]

logger = logging.getLogger(__name__)

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
        report = None
        if report_dir is not None:
            from scripts.report_text import read_report_file  # MONAI and torch: only when reports are read

            report = read_report_file(Path(report_dir), self.pid, self.nodule_id)
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
    parsed = _parse_cohort(csv_path, require_label=require_label, check_images=check_images)
    if parsed.problems:
        raise _problems_error(parsed.name, "the cohort CSV", [text for _, text in parsed.problems])
    if not parsed.records:  # no problems and no records: only blank lines after the header
        raise UserInputError(f"{parsed.name}: the cohort CSV has a header but no rows")
    return parsed.records


def _problems_error(name: str, what: str, problems: list[str]) -> UserInputError:
    """One error listing ``problems`` (the first :data:`_MAX_LISTED` of them)."""
    listed = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return UserInputError(f"{name}: {len(problems)} problem(s) in {what}:\n  " + "\n  ".join(listed) + more)


@dataclass(frozen=True)
class _RowRef:
    """What a row names, even when the row has problems (for the image, seed and split checks)."""

    line: int
    pid: str | None
    nodule_id: str | None
    image: str | None
    image_path: Path | None
    seed_lps: tuple[float, float, float] | None


@dataclass
class _ParsedCohort:
    """A parsed cohort CSV: valid records, every problem as (line, message), and every row's refs."""

    name: str
    records: list[NoduleRecord]
    problems: list[tuple[int, str]]
    rows: list[_RowRef]


def _parse_cohort(csv_path: str | Path, *, require_label: bool, check_images: bool) -> _ParsedCohort:
    """Parse every row of a cohort CSV, collecting problems instead of raising on them.

    Raises:
        UserInputError: The file is missing, empty or not a CSV (nothing to parse).
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise UserInputError(f"cohort CSV '{path}' does not exist or is not a file")
    table = _read_table(path)
    name = path.name
    required = REQUIRED_COLUMNS + ((LABEL_COLUMN,) if require_label else ())
    missing = [c for c in required if c not in table.columns]
    problems: list[tuple[int, str]] = []
    if missing:
        problems.append(
            (
                1,
                f"{name}: line 1: missing required column(s): {', '.join(missing)}; the header has: "
                f"{', '.join(table.columns) or '(nothing)'}",
            )
        )
    records: list[NoduleRecord] = []
    refs: list[_RowRef] = []
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
        seed = (coords[0], coords[1], coords[2]) if len(coords) == 3 and None not in coords else None
        refs.append(_RowRef(line, pid, nodule_id, image, image_path, seed))  # type: ignore[arg-type]
        if row_problems or missing:
            problems.extend((line, text) for text in row_problems)
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
    return _ParsedCohort(name=name, records=records, problems=problems, rows=refs)


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


# --------------------------------------------------------------------------------------------------
# full validation before training: rows, images, seeds and splits, every problem at once
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`validate_cohort` checked and found fine.

    Attributes:
        csv_path: The cohort CSV.
        rows: Nodule rows.
        patients: Distinct patients.
        labels: ``{"0": n, "1": n, "unlabelled": n}``.
        images: Distinct images the rows name.
        images_checked: Whether every image was loaded and every seed checked against it.
        folds: Per checked fold ``(k, train patients, val patients)``.
    """

    csv_path: Path
    rows: int
    patients: int
    labels: dict[str, int]
    images: int
    images_checked: bool
    folds: tuple[tuple[int, int, int], ...] = ()

    def __str__(self) -> str:
        labels = f"labels 0: {self.labels['0']}, 1: {self.labels['1']}"
        if self.labels.get("unlabelled"):
            labels += f", unlabelled: {self.labels['unlabelled']}"
        images = (
            f"{self.images} image(s) load and every seed lies inside its image"
            if self.images_checked
            else f"{self.images} image(s) not checked"
        )
        text = f"{self.csv_path.name}: OK: {self.rows} rows, {self.patients} patients, {labels}; {images}"
        if self.folds:
            text += "; " + ", ".join(f"fold_{k}: {t} train / {v} val patients" for k, t, v in self.folds)
        return text


def _lines_text(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:10])) + (f" (+{len(lines) - 10} more)" if len(lines) > 10 else "")
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}"


def _image_problems(name: str, rows: list[_RowRef]) -> list[tuple[int, str]]:
    """Load every distinct image once and check each row's seed against it.

    The seed check is the bundle crop's own (:class:`~scripts.transforms.SeedROICrop` decides
    "outside the scan"); a 2-sample crop keeps it cheap.
    """
    from tqdm import tqdm

    from scripts.transforms import LoadCT, SeedROICrop  # torch and MONAI: only when images are checked

    by_image: dict[Path, list[_RowRef]] = {}
    for ref in rows:
        if ref.image_path is not None:
            by_image.setdefault(ref.image_path, []).append(ref)
    loader, seed_check = LoadCT(), SeedROICrop(roi_size=2)
    problems: list[tuple[int, str]] = []
    for image_path, refs in tqdm(by_image.items(), desc="checking images", unit="image"):
        lines = [ref.line for ref in refs]
        try:
            image = loader(image_path)
        except UserInputError as error:
            where = f"{name}: {_lines_text(lines)}: column 'image_path' ('{refs[0].image}')"
            # first line only: some readers fold a whole traceback into their message
            first_line = str(error).strip().splitlines()[0]
            problems.append((lines[0], f"{where}: {first_line}"))
            continue
        for ref in refs:
            if ref.seed_lps is None:
                continue  # already reported as a row problem
            try:
                seed_check(image, np.asarray(ref.seed_lps), pid=ref.pid, nodule_id=ref.nodule_id)
            except UserInputError as error:
                problems.append((ref.line, f"{name}: line {ref.line}: {error}"))
        del image  # one volume in memory at a time
    return problems


def validate_cohort(
    csv_path: str | Path,
    *,
    split_dir: str | Path | None = None,
    fold: int | None = None,
    check_images: bool = True,
    require_label: bool = True,
) -> CohortSummary:
    """Check a cohort before any training, reporting every problem at once.

    Checks: required columns; every row's values (allowed semantic values, numeric coordinates,
    0/1 labels, sizes, duplicates: as :func:`read_cohort`); with ``check_images`` that every image
    exists and loads (each distinct image once, NIfTI file or DICOM series folder) and every seed
    lies inside its image (the crop's own test); with ``split_dir`` that the split files are
    readable, their patients are in the CSV and no patient is in both train and val.

    Args:
        csv_path: The cohort CSV.
        split_dir: Folder with ``fold_k/{train,val}_pid.csv``, or ``None``.
        fold: The fold to check; ``None`` checks every ``fold_*`` of ``split_dir``.
        check_images: Load the images and check the seeds (slow for large cohorts).
        require_label: Require a 0/1 ``malignant`` on every row.

    Returns:
        The summary (also logged at INFO).

    Raises:
        UserInputError: Listing every problem with its file and line.
    """
    parsed = _parse_cohort(csv_path, require_label=require_label, check_images=False)
    name = parsed.name
    if not parsed.rows and not parsed.problems:  # the split would only add "pid not in the CSV" noise
        raise UserInputError(f"{name}: the cohort CSV has a header but no rows")
    problems = list(parsed.problems)
    if check_images:
        problems.extend(_image_problems(name, parsed.rows))
    problems.sort(key=lambda item: item[0])  # stable: row order, then check order
    texts = [text for _, text in problems]
    folds: list[tuple[int, int, int]] = []
    if split_dir is not None:
        csv_pids = {ref.pid for ref in parsed.rows if ref.pid is not None}
        split_texts, folds = split_problems(Path(split_dir), fold, csv_pids, name)
        texts.extend(split_texts)
    if texts:
        raise _problems_error(name, "the cohort", texts)
    if not parsed.records:
        raise UserInputError(f"{name}: the cohort CSV has a header but no rows")
    records = parsed.records
    labels = {
        "0": sum(r.label == 0 for r in records),
        "1": sum(r.label == 1 for r in records),
        "unlabelled": sum(r.label is None for r in records),
    }
    summary = CohortSummary(
        csv_path=Path(csv_path).expanduser(),
        rows=len(records),
        patients=len({r.pid for r in records}),
        labels=labels,
        images=len({r.image_path for r in records}),
        images_checked=check_images,
        folds=tuple(folds),
    )
    logger.info("%s", summary)
    return summary
