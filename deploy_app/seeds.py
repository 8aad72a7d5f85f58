"""Nodule seeds of a CT series, read from what came with the study in the input folder.

Sources, in order of precedence (the first that yields at least one usable seed for the CT series
wins; the log names it; :data:`DEFAULT_SOURCES`):

1. **Structured report** (:class:`StructuredReportSeeds`): a Comprehensive 3D SR, Comprehensive SR
   or Enhanced SR of the same study (its StudyInstanceUID, or a study listed in its evidence
   sequences). Every SCOORD3D and SCOORD content item is a point set:

   - SCOORD3D: world coordinates in its Referenced Frame of Reference UID.
   - SCOORD: (column, row) pixel coordinates on the image its SELECTED FROM IMAGE child references,
     which must be an instance of this CT series; they are converted to world LPS with that image's
     ImagePositionPatient, ImageOrientationPatient and PixelSpacing. DICOM image coordinates put
     (0, 0) at the outer top-left corner of the top-left pixel, so that pixel's centre is
     (0.5, 0.5) (PS3.3 C.10.5.1.2 / C.18.6.1.2; highdicom's ``ImageToReferenceTransformer``).
     Points on images of another series are not for this series and are ignored.
   - A point set reduces to one point: POINT itself; CIRCLE its centre (the first point);
     ELLIPSE/ELLIPSOID the mean of their axis end points (exactly the centre);
     MULTIPOINT/POLYLINE/POLYGON the mean of the vertices (a closing vertex that repeats the first
     is dropped).

   All point sets inside one TID 1501 measurement group (container (125007, DCM)) make one seed, at
   the mean of their points (preferring point sets in the CT's frame of reference); the group's
   Tracking Identifier and Tracking Unique Identifier become the seed's label and tracking UID. A
   point set outside any measurement group is a seed of its own. The SRs this app writes
   (:mod:`deploy_app.sr`) and :func:`deploy_app.sr.build_seed_sr` are read the same way.
2. **Segmentation** (:class:`SegmentationSeeds`): a DICOM SEG of the same study; one seed per
   segment at the centroid of its voxels in world LPS (frame positions from the SEG's per-frame
   Plane Position, orientation and spacing from its functional groups; FRACTIONAL segments are
   weighted by their values). Label: the Segment Label; tracking UID: the segment's Tracking UID.
3. **Seeds file** (:class:`SeedFileSeeds`): ``seeds.csv`` with header ``x,y,z[,label]
   [,series_instance_uid]`` or ``seeds.json`` ``{"seeds": [{"position_lps": [x, y, z], "label":
   "...", "series_instance_uid": "..."}]}``, world LPS millimetres in the CT's frame of reference.
   A row with a series_instance_uid is used only for that series; a row without one for every CT
   series whose files lie in the seeds file's folder or below it.

Seeds whose frame of reference is not the CT series' or that lie outside the scan (the same test as
the bundle's ``SeedROICrop``: the continuous voxel index of the seed within half a voxel of the
voxel-centre grid) become :class:`~deploy_app.findings.SkippedSeed` items: the seed's ``source``
names the file and item, the ``reason`` what is wrong. Seeds repeated by several files (same
tracking UID, or the same position within 0.001 mm) are kept once.

Non-DICOM files in the input folder are ignored. :class:`SeedSource` is the protocol of a source, so
that an automatic nodule detector can be added in front of (or after) these.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import highdicom as hd
import numpy as np
import pydicom
from highdicom.spatial import ImageToReferenceTransformer
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

from deploy_app.dicom_io import iter_dicom_headers
from deploy_app.findings import NoduleSeed, SkippedSeed
from deploy_app.sr import (
    series_identity,
)
from deploy_app.uids import shown_value
from deploy_app.volume import SeriesGeometry, describe_series
from scripts.errors import UserInputError
from scripts.geometry import format_extent_lps, seed_inside_scan, volume_extent_lps

logger = logging.getLogger(__name__)

SR_STORAGE_CLASSES = frozenset({Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage})
"""SR SOP classes read for seeds."""
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION_STORAGE_CLASSES = frozenset({SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE})
"""SEG SOP classes read for seeds."""
SEED_FILE_NAMES = ("seeds.csv", "seeds.json")
"""Names of the seeds files (matched case-insensitively)."""

_DUPLICATE_DISTANCE_MM = 1e-3
#: Most seeds analysed per series unless the caller raises it: each costs a model batch row and a
#: report section, so a runaway detector or a hostile seeds file cannot exhaust the machine.
MAX_SEEDS_PER_SERIES = 200
#: Longest seed label kept (the DICOM LO length): it is the SR's Tracking Identifier and a report heading.
MAX_LABEL_CHARACTERS = 64
_CSV_REQUIRED = ("x", "y", "z")
_CSV_OPTIONAL = ("label", "series_instance_uid")
_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")


# --------------------------------------------------------------------------------------------------
# the CT series
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlane:
    """Geometry of one CT image.

    Attributes:
        position_lps: ImagePositionPatient (centre of the top-left pixel), mm.
        orientation: ImageOrientationPatient (row direction cosines, then column direction cosines).
        pixel_spacing: PixelSpacing (spacing between rows, spacing between columns), mm.
        rows: Rows.
        columns: Columns.
    """

    position_lps: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    def image_to_world(self, column_row: np.ndarray) -> np.ndarray:
        """World LPS mm of DICOM image coordinates ``(n, 2)`` = (column, row), (0.5, 0.5) = pixel centre."""
        transformer = ImageToReferenceTransformer(
            image_position=self.position_lps,
            image_orientation=self.orientation,
            pixel_spacing=self.pixel_spacing,
        )
        return transformer(np.asarray(column_row, dtype=np.float64).reshape(-1, 2))


def _floats(ds: pydicom.Dataset, keyword: str, count: int, where: str) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise UserInputError(f"{where}: {keyword} must be {count} numbers, got {value!r}")
    return numbers


def _file_name(ds: pydicom.Dataset) -> str | None:
    """The file a dataset was read from, if it was read from a named file."""
    name = getattr(ds, "filename", None)
    return str(name) if isinstance(name, (str, Path)) and str(name) else None


def _folders_of(datasets: Iterable[pydicom.Dataset]) -> tuple[Path, ...]:
    parents = {Path(name).parent for name in map(_file_name, datasets) if name}  # resolved once each
    return tuple(sorted({parent.resolve() for parent in parents}))


def _plane_of(ds: pydicom.Dataset) -> ImagePlane:
    name = _file_name(ds)
    where = f"CT image {ds.get('SOPInstanceUID', '?')}" + (f" ({name})" if name else "")
    position = _floats(ds, "ImagePositionPatient", 3, where)
    orientation = _floats(ds, "ImageOrientationPatient", 6, where)
    spacing = _floats(ds, "PixelSpacing", 2, where)
    if min(spacing) <= 0:
        raise UserInputError(f"{where}: PixelSpacing must be positive, got {spacing}")
    return ImagePlane(
        position_lps=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _identity_error(datasets: Sequence[pydicom.Dataset]) -> UserInputError:
    """The first slice whose study, series or frame of reference UID is empty or not the first slice's."""
    first = datasets[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        expected = str(first.get(keyword, ""))
        for ds in datasets:
            value = str(ds.get(keyword, ""))
            if not value or value != expected:
                return UserInputError(
                    f"{describe_series(first)}: instance {ds.get('InstanceNumber', '?')} has {keyword} "
                    f"{shown_value(ds.get(keyword))}, not one shared by every slice of the series; the "
                    "seeds and results could not be placed in one frame of reference"
                )
    return UserInputError(f"{describe_series(first)}: the slices do not share one study, series and frame")


class _ImagePlanes(Mapping[str, ImagePlane]):
    """SOPInstanceUID -> :class:`ImagePlane`, each read from its header when first asked for.

    Only 2D SCOORD seeds need an image's plane, and they name a few images of hundreds.
    """

    def __init__(self, datasets: Sequence[pydicom.Dataset]) -> None:
        self._datasets = {str(ds.SOPInstanceUID): ds for ds in datasets}
        self._planes: dict[str, ImagePlane] = {}

    def __getitem__(self, uid: str) -> ImagePlane:
        if uid not in self._planes:
            self._planes[uid] = _plane_of(self._datasets[uid])
        return self._planes[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._datasets)

    def __len__(self) -> int:
        return len(self._datasets)


@dataclass(frozen=True, eq=False)
class CTSeriesInfo:
    """What the seed sources need to know about the CT series (see :meth:`from_geometry`).

    Attributes:
        study_instance_uid: StudyInstanceUID.
        series_instance_uid: SeriesInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID.
        planes: SOPInstanceUID -> geometry of that image.
        affine_ras: 4x4 map from voxel indices (column, row, slice) to world RAS mm, slices sorted
            along the slice normal: the geometry a DICOM reader (ITK) gives the volume.
        shape: (columns, rows, slices).
        folders: folders holding the series' files (empty when the datasets were not read from files).
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    planes: Mapping[str, ImagePlane]
    affine_ras: np.ndarray = field(repr=False)
    shape: tuple[int, int, int]
    folders: tuple[Path, ...] = ()

    @classmethod
    def from_geometry(cls, geometry: SeriesGeometry) -> CTSeriesInfo:
        """The info of a series checked by :func:`deploy_app.volume.check_series_geometry`.

        The voxel grid is the check's own (the one derivation of a series' geometry); image planes
        are read from their headers only when a 2D SCOORD seed asks for one.

        Raises:
            UserInputError: a slice lacks the series' StudyInstanceUID, SeriesInstanceUID or
                FrameOfReferenceUID, or has another one (names the tag and the instance).
        """
        try:
            identity = series_identity(geometry.datasets)
        except ValueError as error:
            raise _identity_error(geometry.datasets) from error
        slices, rows, columns = geometry.shape
        return cls(
            study_instance_uid=identity.study_instance_uid,
            series_instance_uid=identity.series_instance_uid,
            frame_of_reference_uid=identity.frame_of_reference_uid,
            planes=_ImagePlanes(geometry.datasets),
            affine_ras=geometry.voxel_to_ras,
            shape=(columns, rows, slices),
            folders=_folders_of(geometry.datasets),
        )

    @property
    def extent_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """World LPS bounding box (min, max) of the voxel centres."""
        return volume_extent_lps(self.affine_ras, self.shape)

    def describe_extent(self) -> str:
        """The extent as ``"(x0..x1, y0..y1, z0..z1)"`` mm, for messages."""
        return format_extent_lps(self.affine_ras, self.shape)

    def contains(self, position_lps: Sequence[float]) -> bool:
        """Whether a seed lies inside the scan, by the rule of the bundle's ``SeedROICrop``.

        The seed's continuous voxel index must lie within half a voxel of the voxel-centre grid on
        every axis, i.e. in ``[-0.5, n - 0.5]``.
        """
        return seed_inside_scan(self.affine_ras, self.shape, position_lps)

    def applies_to_folder(self, folder: Path) -> bool:
        """Whether a seeds file in ``folder`` applies to this series (its files lie there or below)."""
        if not self.folders:
            return True
        folder = folder.resolve()
        return any(f == folder or folder in f.parents for f in self.folders)


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# checking and choosing
# --------------------------------------------------------------------------------------------------


def _skip_reason(seed: NoduleSeed, ct: CTSeriesInfo) -> str | None:
    position = np.asarray(seed.position_lps, dtype=np.float64)
    if position.shape != (3,) or not np.all(np.isfinite(position)):
        return f"its position {seed.position_lps!r} is not 3 finite numbers"
    if seed.frame_of_reference_uid and seed.frame_of_reference_uid != ct.frame_of_reference_uid:
        return (
            f"its frame of reference {seed.frame_of_reference_uid} is not the CT series' "
            f"({ct.frame_of_reference_uid}); the point cannot be placed on this scan"
        )
    if not ct.contains(position):
        x, y, z = position
        return (
            f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS lies outside the scan, which spans "
            f"{ct.describe_extent()} mm LPS"
        )
    return None


_NEIGHBOUR_CELLS = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]


class _RepeatFinder:
    """Says whether a seed repeats an earlier one (same tracking UID, or in the same frame of
    reference within :data:`_DUPLICATE_DISTANCE_MM`), in constant time per seed.

    Positions are hashed into cubes of the duplicate distance: a repeat lies in the seed's cube or
    one of its 26 neighbours, so thousands of seeds are checked in linear time, not quadratic.
    """

    def __init__(self) -> None:
        self._tracking_uids: set[str] = set()
        self._cells: dict[tuple[str | None, int, int, int], list[np.ndarray]] = {}

    def seen(self, seed: NoduleSeed) -> bool:
        """True when ``seed`` repeats an earlier one; otherwise it is remembered."""
        if seed.tracking_uid and seed.tracking_uid in self._tracking_uids:
            return True
        position = np.asarray(seed.position_lps, dtype=np.float64)
        cell = None
        if position.shape == (3,) and np.isfinite(position).all():
            cell = tuple(math.floor(v / _DUPLICATE_DISTANCE_MM) for v in position)
            for di, dj, dk in _NEIGHBOUR_CELLS:
                key = (seed.frame_of_reference_uid, cell[0] + di, cell[1] + dj, cell[2] + dk)
                for other in self._cells.get(key, ()):
                    if np.linalg.norm(position - other) <= _DUPLICATE_DISTANCE_MM:
                        return True
        if seed.tracking_uid:
            self._tracking_uids.add(seed.tracking_uid)
        if cell is not None:
            self._cells.setdefault((seed.frame_of_reference_uid, *cell), []).append(position)
        return False


class _UniqueLabels:
    """``label``, then ``label (2)``, ``label (3)``... for repeats, in amortised constant time."""

    def __init__(self) -> None:
        self._used: set[str] = set()
        self._next_number: dict[str, int] = {}

    def __call__(self, label: str) -> str:
        candidate, number = label, self._next_number.get(label, 2)
        while candidate in self._used:
            candidate, number = f"{label} ({number})", number + 1
        self._next_number[label] = number
        self._used.add(candidate)
        return candidate


def check_seeds(seeds: Sequence[NoduleSeed], ct: CTSeriesInfo) -> tuple[list[NoduleSeed], list[SkippedSeed]]:
    """Split seeds into usable and skipped ones; drop repeats; make labels unique.

    Args:
        seeds: seeds of one source.
        ct: the CT series.

    Returns:
        ``(usable, skipped)``; usable seeds carry the CT's frame of reference UID.
    """
    usable: list[NoduleSeed] = []
    skipped: list[SkippedSeed] = []
    repeats = _RepeatFinder()
    unique_label = _UniqueLabels()
    for seed in seeds:
        if repeats.seen(seed):
            logger.info("%s: repeats an earlier seed; used once", seed.source)
            continue
        label = seed.label
        if len(label) > MAX_LABEL_CHARACTERS:
            label = label[: MAX_LABEL_CHARACTERS - 3] + "..."
            logger.warning(
                "%s: label of %d characters cut to %d", seed.source, len(seed.label), MAX_LABEL_CHARACTERS
            )
        label = unique_label(label)
        reason = _skip_reason(seed, ct)
        if reason is None:
            usable.append(
                NoduleSeed(
                    position_lps=tuple(float(v) for v in seed.position_lps),  # type: ignore[arg-type]
                    label=label,
                    source=seed.source,
                    frame_of_reference_uid=ct.frame_of_reference_uid,
                    tracking_uid=seed.tracking_uid,
                )
            )
        else:
            relabelled = NoduleSeed(
                seed.position_lps, label, seed.source, seed.frame_of_reference_uid, seed.tracking_uid
            )
            skipped.append(SkippedSeed(relabelled, reason))
    return usable, skipped


def find_seeds(
    input_dir: str | Path,
    ct: CTSeriesInfo,
    sources: Sequence[SeedSource] = DEFAULT_SOURCES,
    max_seeds: int = MAX_SEEDS_PER_SERIES,
) -> tuple[list[NoduleSeed], list[SkippedSeed], str]:
    """The seeds of one CT series: those of the first source that has a usable one.

    Args:
        input_dir: the app's input folder.
        ct: the CT series.
        sources: sources in order of precedence.
        max_seeds: most usable seeds accepted for the series.

    Returns:
        ``(seeds, skipped, source name)``: the usable seeds (frame set to the CT's), the skipped
        seeds of the same source with their reasons, and the name of the source used.

    Raises:
        UserInputError: no source has a usable seed for the series (names the folder, what each
            source found, and the accepted seed sources), or more than ``max_seeds`` are usable.
    """
    folder = Path(input_dir)
    findings: list[str] = []
    for source in sources:
        found = source.find(folder, ct) or []
        if not found:
            findings.append(f"{source.name}: none")
            continue
        usable, skipped = check_seeds(found, ct)
        for item in skipped:
            logger.warning("seed %s (%s) skipped: %s", item.seed.label, item.seed.source, item.reason)
        if len(usable) > max_seeds:
            raise UserInputError(
                f"CT series {ct.series_instance_uid}: {source.name} gives {len(usable)} usable seeds, "
                f"more than the {max_seeds} analysed per series; send fewer seeds or raise the limit "
                "(--max-seeds)"
            )
        if usable:
            logger.info(
                "CT series %s: %d seed(s) from %s%s",
                ct.series_instance_uid,
                len(usable),
                source.name,
                f", {len(skipped)} skipped" if skipped else "",
            )
            return usable, skipped, source.name
        reasons = "; ".join(f"{s.seed.source}: {s.reason}" for s in skipped)
        findings.append(f"{source.name}: {len(skipped)} seed(s), none usable ({reasons})")
    accepted = "; ".join(f"({k}) {s.name}" for k, s in enumerate(sources, start=1))
    raise UserInputError(
        f"input folder {folder}: no usable nodule seed for CT series {ct.series_instance_uid} "
        f"({'; '.join(findings)}). Give the seeds as, in order of precedence: {accepted}"
    )
