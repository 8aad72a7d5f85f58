"""Where seeds come from: a TID 1500 SR, a DICOM SEG or a seeds file (see the package docstring)."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

from deploy_app.dicom_io import iter_dicom_headers
from deploy_app.findings import NoduleSeed
from deploy_app.seeds.ct_series import CTSeriesInfo
from scripts.errors import UserInputError

logger = logging.getLogger(__name__)

SR_STORAGE_CLASSES = frozenset({Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage})
"""SR SOP classes read for seeds."""
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION_STORAGE_CLASSES = frozenset({SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE})
"""SEG SOP classes read for seeds."""
SEED_FILE_NAMES = ("seeds.csv", "seeds.json")
"""Names of the seeds files (matched case-insensitively)."""

_CSV_REQUIRED = ("x", "y", "z")
_CSV_OPTIONAL = ("label", "series_instance_uid")
_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")


@runtime_checkable
class SeedSource(Protocol):
    """A place seeds can come from: a name for messages and a finder.

    ``find`` returns the seeds it found for the series (positions world LPS mm; set
    ``frame_of_reference_uid`` when the position is in a known frame), or ``None``/``[]`` when it
    has none. It does not check frames or the scan extent: :func:`find_seeds` does.
    """

    name: str

    def find(self, input_dir: Path, ct: CTSeriesInfo) -> list[NoduleSeed] | None:
        """Seeds for ``ct`` found under ``input_dir``."""
        ...


def _concept(item: pydicom.Dataset) -> tuple[str, str] | None:
    sequence = item.get("ConceptNameCodeSequence")
    if not sequence:
        return None
    return str(sequence[0].get("CodeValue", "")), str(sequence[0].get("CodingSchemeDesignator", ""))


def _child_value(item: pydicom.Dataset, concept: tuple[str, str], keyword: str) -> str | None:
    for child in item.get("ContentSequence", []):
        if _concept(child) == concept and keyword in child:
            return str(child.get(keyword))
    return None


def _reduce_points(graphic_type: str, points: np.ndarray) -> np.ndarray:
    """One representative point of a SCOORD/SCOORD3D point set (see the module docstring)."""
    if graphic_type == "CIRCLE":
        return points[0]
    if graphic_type in ("POLYGON", "POLYLINE") and len(points) > 2 and np.allclose(points[0], points[-1]):
        points = points[:-1]
    return points.mean(axis=0)


@dataclass
class _PointSet:
    position: np.ndarray
    frame_of_reference_uid: str


@dataclass
class _Group:
    label: str | None
    tracking_uid: str | None
    where: str
    point_sets: list[_PointSet] = field(default_factory=list)


def _scoord_point_set(item: pydicom.Dataset, ct: CTSeriesInfo, where: str) -> _PointSet | None:
    """A SCOORD (2D) item as a world point in the CT's frame, or None when not on this series."""
    image_uid = None
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "IMAGE" and child.get("ReferencedSOPSequence"):
            image_uid = str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            break
    if image_uid is None:
        logger.warning("%s: a SCOORD item references no image; ignored", where)
        return None
    plane = ct.planes.get(image_uid)
    if plane is None:
        logger.info(
            "%s: a SCOORD item is on image %s, not of CT series %s; ignored",
            where,
            image_uid,
            ct.series_instance_uid,
        )
        return None
    data = np.asarray(item.get("GraphicData", []), dtype=np.float64)
    if data.size < 2 or data.size % 2:
        logger.warning(
            "%s: SCOORD Graphic Data has %d values, not (column, row) pairs; ignored", where, data.size
        )
        return None
    centre = _reduce_points(str(item.get("GraphicType", "")), data.reshape(-1, 2))
    return _PointSet(plane.image_to_world(centre[None, :])[0], ct.frame_of_reference_uid)


def _scoord3d_point_set(item: pydicom.Dataset, where: str) -> _PointSet | None:
    data = np.asarray(item.get("GraphicData", []), dtype=np.float64)
    frame = str(item.get("ReferencedFrameOfReferenceUID", ""))
    if data.size < 3 or data.size % 3 or not frame:
        logger.warning("%s: a SCOORD3D item without (x, y, z) triplets or frame of reference; ignored", where)
        return None
    return _PointSet(_reduce_points(str(item.get("GraphicType", "")), data.reshape(-1, 3)), frame)


def _collect_point_sets(
    items: Iterable[pydicom.Dataset], ct: CTSeriesInfo, where: str, group: _Group | None, out: list[_Group]
) -> None:
    """Walk an SR content tree; every measurement group, and every loose point set, is one _Group."""
    for item in items:
        value_type = item.get("ValueType")
        if value_type == "CONTAINER" and _concept(item) == _MEASUREMENT_GROUP:
            label = _child_value(item, _TRACKING_IDENTIFIER, "TextValue")
            inner = _Group(
                label=label,
                tracking_uid=_child_value(item, _TRACKING_UID, "UID"),
                where=f"{where}: measurement group {len(out) + 1}" + (f" ('{label}')" if label else ""),
            )
            out.append(inner)
            _collect_point_sets(item.get("ContentSequence", []), ct, where, inner, out)
            continue
        point_set = None
        if value_type == "SCOORD3D":
            point_set = _scoord3d_point_set(item, where)
        elif value_type == "SCOORD":
            point_set = _scoord_point_set(item, ct, where)
        if point_set is not None:
            if group is None:
                out.append(
                    _Group(None, None, f"{where}: spatial coordinate item {len(out) + 1}", [point_set])
                )
            else:
                group.point_sets.append(point_set)
        if value_type != "SCOORD" and "ContentSequence" in item:
            _collect_point_sets(item.ContentSequence, ct, where, group, out)


def _group_seed(group: _Group, ct: CTSeriesInfo, index: int) -> NoduleSeed:
    in_frame = [p for p in group.point_sets if p.frame_of_reference_uid == ct.frame_of_reference_uid]
    chosen = in_frame or group.point_sets
    position = np.mean([p.position for p in chosen], axis=0)
    return NoduleSeed(
        position_lps=(float(position[0]), float(position[1]), float(position[2])),
        label=group.label or f"Nodule {index}",
        source=group.where,
        frame_of_reference_uid=chosen[0].frame_of_reference_uid,
        tracking_uid=group.tracking_uid,
    )


def _evidence_studies(ds: pydicom.Dataset) -> set[str]:
    studies = {str(ds.get("StudyInstanceUID", ""))}
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        studies.update(str(item.get("StudyInstanceUID", "")) for item in ds.get(keyword, []))
    return studies


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class StructuredReportSeeds:
    """Seeds from SCOORD3D/SCOORD content items of SRs of the study (see the module docstring)."""

    name = "structured report (SCOORD3D/SCOORD points of a TID 1500 SR)"

    def find(self, input_dir: Path, ct: CTSeriesInfo) -> list[NoduleSeed] | None:
        """Seeds of every SR of ``ct``'s study under ``input_dir``, in file and document order."""
        seeds: list[NoduleSeed] = []
        tags = ["SOPClassUID", "StudyInstanceUID"]
        for path, _ in iter_dicom_headers(input_dir, specific_tags=tags, sop_classes=SR_STORAGE_CLASSES):
            where = _relative(path, input_dir)
            try:
                ds = pydicom.dcmread(path)
                if ct.study_instance_uid not in _evidence_studies(ds):
                    continue
                groups: list[_Group] = []
                _collect_point_sets(ds.get("ContentSequence", []), ct, where, None, groups)
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError) as error:
                raise UserInputError(
                    f"{where}: cannot read the points of this structured report ({type(error).__name__}: "
                    f"{error}); fix or remove the file"
                ) from error
            located = [g for g in groups if g.point_sets]
            seeds.extend(_group_seed(group, ct, index) for index, group in enumerate(located, start=1))
        return seeds or None


def _frame_positions(
    seg: pydicom.Dataset, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame IPP (F, 3), row and column direction (F, 3) scaled by spacing, segment numbers (F,)."""
    shared = seg.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    per_frame = seg.get("PerFrameFunctionalGroupsSequence")
    frames = int(seg.get("NumberOfFrames", 1))
    if per_frame is None or len(per_frame) != frames:
        raise UserInputError(f"{where}: no per-frame functional groups for its {frames} frame(s)")

    def attribute(frame: pydicom.Dataset, sequence: str, keyword: str) -> Any:
        for group in (frame, shared):
            if sequence in group and keyword in group[sequence][0]:
                return group[sequence][0][keyword].value
        raise UserInputError(f"{where}: no {keyword} in {sequence} of a frame")

    positions, steps_col, steps_row, numbers = [], [], [], []
    for frame in per_frame:
        position = np.asarray(attribute(frame, "PlanePositionSequence", "ImagePositionPatient"), dtype=float)
        orientation = np.asarray(
            attribute(frame, "PlaneOrientationSequence", "ImageOrientationPatient"), float
        )
        spacing = np.asarray(attribute(frame, "PixelMeasuresSequence", "PixelSpacing"), dtype=float)
        positions.append(position)
        steps_col.append(orientation[:3] * spacing[1])  # one column to the right
        steps_row.append(orientation[3:] * spacing[0])  # one row down
        identification = frame.get("SegmentIdentificationSequence")
        numbers.append(int(identification[0].ReferencedSegmentNumber) if identification else 0)
    return np.array(positions), np.array(steps_col), np.array(steps_row), np.array(numbers)


def segment_centroids(seg: pydicom.Dataset, where: str) -> dict[int, np.ndarray | None]:
    """World LPS centroid of every segment of a SEG (None for an empty segment).

    Args:
        seg: the SEG dataset with pixel data (BINARY, FRACTIONAL or LABELMAP).
        where: file name for messages.

    Returns:
        Segment number -> centroid (3,) in mm, or None when the segment has no voxel.
    """
    positions, steps_col, steps_row, frame_segments = _frame_positions(seg, where)
    pixels = np.asarray(seg.pixel_array)
    pixels = pixels.reshape(len(positions), int(seg.Rows), int(seg.Columns))
    segmentation_type = str(seg.get("SegmentationType", "BINARY"))
    scale = float(seg.get("MaximumFractionalValue", 1)) if segmentation_type == "FRACTIONAL" else 1.0
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    sums = {number: np.zeros(3) for number in numbers}
    weights = dict.fromkeys(numbers, 0.0)
    for index in range(len(positions)):
        frame = pixels[index]
        if segmentation_type == "LABELMAP":
            masks = {n: (frame == n).astype(np.float64) for n in numbers if np.any(frame == n)}
        elif frame_segments[index] in sums:
            masks = {int(frame_segments[index]): frame.astype(np.float64) / scale}
        else:
            masks = {}
        for number, weight in masks.items():
            rows, columns = np.nonzero(weight)
            w = weight[rows, columns]
            world = positions[index] + columns[:, None] * steps_col[index] + rows[:, None] * steps_row[index]
            sums[number] += (w[:, None] * world).sum(axis=0)
            weights[number] += float(w.sum())
    return {n: (sums[n] / weights[n] if weights[n] > 0 else None) for n in numbers}


class SegmentationSeeds:
    """Seeds at the centroids of the segments of DICOM SEGs of the study."""

    name = "segmentation (centroid of each DICOM SEG segment)"

    def find(self, input_dir: Path, ct: CTSeriesInfo) -> list[NoduleSeed] | None:
        """One seed per non-empty segment of every SEG of ``ct``'s study under ``input_dir``."""
        seeds: list[NoduleSeed] = []
        tags = ["SOPClassUID", "StudyInstanceUID"]
        segmentations = iter_dicom_headers(
            input_dir, specific_tags=tags, sop_classes=SEGMENTATION_STORAGE_CLASSES
        )
        for path, header in segmentations:
            if str(header.get("StudyInstanceUID", "")) != ct.study_instance_uid:
                continue
            where = _relative(path, input_dir)
            try:
                seg = hd.seg.segread(path)
                centroids = segment_centroids(seg, where)
            except UserInputError:
                raise
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, OSError) as error:
                raise UserInputError(
                    f"{where}: cannot read this segmentation ({type(error).__name__}: {error}); "
                    "fix or remove the file"
                ) from error
            frame = str(seg.get("FrameOfReferenceUID", ""))
            for item in seg.SegmentSequence:
                number = int(item.SegmentNumber)
                label = str(item.get("SegmentLabel", "")) or f"Segment {number}"
                centre = centroids[number]
                if centre is None:
                    logger.warning("%s: segment %d ('%s') has no voxel; no seed", where, number, label)
                    continue
                seeds.append(
                    NoduleSeed(
                        position_lps=(float(centre[0]), float(centre[1]), float(centre[2])),
                        label=label,
                        source=f"{where}: segment {number} ('{label}')",
                        frame_of_reference_uid=frame or None,
                        tracking_uid=str(item.get("TrackingUID", "")) or None,
                    )
                )
        return seeds or None


def _parse_position(values: Sequence[Any], where: str) -> tuple[float, float, float]:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if (
        len(numbers) != 3
        or not all(math.isfinite(n) for n in numbers)
        or any(isinstance(v, bool) for v in values)
    ):
        raise UserInputError(
            f"{where}: the seed position must be 3 finite numbers x, y, z (world LPS mm), "
            f"got {list(values)!r}"
        )
    return numbers[0], numbers[1], numbers[2]


@dataclass(frozen=True)
class _SeedRow:
    position: tuple[float, float, float]
    label: str
    series_instance_uid: str
    where: str


def read_seeds_csv(path: Path, display: str | None = None) -> list[_SeedRow]:
    """Rows of a ``seeds.csv``: header ``x,y,z[,label][,series_instance_uid]``.

    Raises:
        UserInputError: a missing or unknown column, or a row without 3 numbers (names file and line).
    """
    display = display or str(path)
    try:
        return _read_seeds_csv(path, display)
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{display}: not UTF-8 text (byte {error.start}); save the file as UTF-8 and resend it"
        ) from error
    except csv.Error as error:
        raise UserInputError(f"{display}: not a readable CSV file ({error})") from error


def _read_seeds_csv(path: Path, display: str) -> list[_SeedRow]:
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            raise UserInputError(f"{display}: the file is empty; expected a header line 'x,y,z[,label]'")
        columns = [name.strip().lower() for name in header]
        missing = [name for name in _CSV_REQUIRED if name not in columns]
        unknown = [name for name in columns if name not in _CSV_REQUIRED + _CSV_OPTIONAL]
        if missing or unknown:
            problem = f"missing column(s) {', '.join(missing)}" if missing else f"unknown column(s) {unknown}"
            raise UserInputError(
                f"{display} line 1: {problem}; the header must be x,y,z with optional label and "
                "series_instance_uid (world LPS mm)"
            )
        rows = []
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise UserInputError(f"{display} line {line}: {len(cells)} values for {len(columns)} columns")
            record = dict(zip(columns, (cell.strip() for cell in cells), strict=True))
            where = f"{display} line {line}"
            rows.append(
                _SeedRow(
                    position=_parse_position([record[name] for name in _CSV_REQUIRED], where),
                    label=record.get("label", ""),
                    series_instance_uid=record.get("series_instance_uid", ""),
                    where=where,
                )
            )
    return rows


def read_seeds_json(path: Path, display: str | None = None) -> list[_SeedRow]:
    """Entries of a ``seeds.json``: ``{"seeds": [{"position_lps": [x, y, z], ...}]}``.

    Raises:
        UserInputError: invalid JSON or an entry without a valid position (names file and entry).
    """
    display = display or str(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{display}: not valid JSON ({error})") from error
    except RecursionError as error:  # e.g. [[[[...]]]] nested deeper than the parser's stack
        raise UserInputError(f"{display}: JSON nested too deeply to be a seeds file") from error
    entries = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise UserInputError(
            f'{display}: expected an object {{"seeds": [{{"position_lps": [x, y, z]}}, ...]}}'
        )
    rows = []
    for index, entry in enumerate(entries):
        where = f"{display} seeds[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("position_lps"), list):
            raise UserInputError(f"{where}: expected an object with position_lps: [x, y, z] (world LPS mm)")
        rows.append(
            _SeedRow(
                position=_parse_position(entry["position_lps"], where),
                label=str(entry.get("label") or ""),
                series_instance_uid=str(entry.get("series_instance_uid") or ""),
                where=where,
            )
        )
    return rows


class SeedFileSeeds:
    """Seeds from ``seeds.csv`` / ``seeds.json`` files (world LPS mm in the CT's frame)."""

    name = "seeds file (seeds.csv or seeds.json, world LPS mm)"

    def find(self, input_dir: Path, ct: CTSeriesInfo) -> list[NoduleSeed] | None:
        """Rows of every seeds file under ``input_dir`` that apply to ``ct``, in path and row order."""
        files = sorted(
            p for p in Path(input_dir).rglob("*") if p.is_file() and p.name.lower() in SEED_FILE_NAMES
        )
        seeds: list[NoduleSeed] = []
        for path in files:
            display = _relative(path, input_dir)
            reader = read_seeds_csv if path.name.lower().endswith(".csv") else read_seeds_json
            rows = reader(path, display)
            for row in rows:
                if row.series_instance_uid:
                    if row.series_instance_uid != ct.series_instance_uid:
                        continue
                elif not ct.applies_to_folder(path.parent):
                    continue
                seeds.append(
                    NoduleSeed(
                        position_lps=row.position,
                        label=row.label or f"Nodule {len(seeds) + 1}",
                        source=row.where,
                    )
                )
        return seeds or None


DEFAULT_SOURCES: tuple[SeedSource, ...] = (StructuredReportSeeds(), SegmentationSeeds(), SeedFileSeeds())
"""The seed sources in order of precedence."""
