"""What every readable output shows, in one place: banners, model identity and the rows per nodule.

The PDF (:mod:`deploy_app.report.pdf`), the Secondary Capture montage
(:mod:`deploy_app.report.montage`) and any further readable output (a JSON or text summary, a site's
own writer in :mod:`deploy_app.report.writers`) take their words and numbers from here, so they
cannot drift apart: the same finding rows, percentages, positions, plane titles and banners.
Pure functions of a :class:`~deploy_app.findings.SeriesResult` and its nodules; no drawing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deploy_app.findings import NoduleResult, SeriesResult
from scripts.transforms import PLANE_DIRECTIONS
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES

RESEARCH_BANNER = "RESEARCH USE ONLY \u2014 not for clinical decisions"
"""Shown at the top of every PDF page and every Secondary Capture image."""

DEMO_BANNER = "UNTRAINED DEMO MODEL \u2014 the numbers carry no diagnostic meaning"
"""Added below :data:`RESEARCH_BANNER` when the model is the untrained demo."""

MANUFACTURER = "lung_nodule_ct_semantic_clip"
"""Author of the PDF and Manufacturer of the generated instances (General Equipment and SC Equipment
modules)."""

PLANE_NAMES: tuple[str, ...] = (
    "Axial",
    "Coronal",
    "Sagittal",
    "Axial/sagittal 45\u00b0",  # normal (S - L)/sqrt2
    "Axial/sagittal 45\u00b0",  # normal (S + L)/sqrt2
    "Axial/coronal 45\u00b0",  # normal (S - P)/sqrt2
    "Axial/coronal 45\u00b0",  # normal (S + P)/sqrt2
    "Coronal/sagittal 45\u00b0",  # normal (P - L)/sqrt2
    "Coronal/sagittal 45\u00b0",  # normal (P + L)/sqrt2
)
"""Display name of each plane, in :data:`~scripts.transforms.PLANE_DIRECTIONS` order: the standard
planes its normal lies between (tests check this against the directions)."""


def banners(result: SeriesResult) -> list[str]:
    """The banner lines of every page and image: research use, and the demo warning when it applies."""
    return [RESEARCH_BANNER, DEMO_BANNER] if result.model.untrained_demo else [RESEARCH_BANNER]


def finding_rows(semantic: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str, float]]:
    """The semantic findings as (feature title, predicted value, probability), in vocabulary order.

    Features missing from ``semantic`` are left out; columns the vocabulary does not know follow
    in their given order under their column name.

    Args:
        semantic: feature column -> value -> probability.

    Returns:
        one row per feature present.
    """
    known = [feature.column for feature in FEATURES if feature.column in semantic]
    unknown = [column for column in semantic if column not in FEATURE_BY_COLUMN]
    rows = []
    for column in (*known, *unknown):
        values = semantic[column]
        if not values:
            continue
        value = max(values, key=values.__getitem__)
        title = FEATURE_BY_COLUMN[column].title if column in FEATURE_BY_COLUMN else column
        rows.append((title, value, float(values[value])))
    return rows


def top_findings(nodule: NoduleResult, limit: int = 6) -> list[tuple[str, str, float]]:
    """The findings worth burning into a picture: predicted values other than "Absent", most probable
    first (the PDF lists every feature).

    Args:
        nodule: the analysed nodule.
        limit: most rows returned.

    Returns:
        rows as :func:`finding_rows` gives them.
    """
    rows = [row for row in finding_rows(nodule.semantic) if row[1] != "Absent"]
    return sorted(rows, key=lambda row: -row[2])[:limit]


def percent(probability: float) -> str:
    """A probability as shown: ``0.82345`` -> ``"82.3 %"``."""
    return f"{100.0 * float(probability):.1f} %"


def position(position_lps: Sequence[float]) -> str:
    """A seed position as shown: ``"(10.0, -20.5, 30.3) mm LPS"``."""
    x, y, z = (float(v) for v in position_lps)
    return f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS"


def display_date(dicom_date: str | None) -> str:
    """YYYYMMDD -> YYYY-MM-DD; anything else as given ("unknown" when empty)."""
    text = (dicom_date or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "unknown"


def plane_attention(nodule: NoduleResult) -> list[float | None]:
    """The attention weight of each of the nine planes (all None when the model gave none)."""
    weights = [float(w) for w in nodule.attention]
    return weights if len(weights) == len(PLANE_DIRECTIONS) else [None] * len(PLANE_DIRECTIONS)


def plane_title(plane: int, weight: float | None) -> str:
    """The title above a plane image: ``"1 Axial | attention 0.050"`` (no weight: number and name)."""
    text = f"{plane + 1} {PLANE_NAMES[plane]}"
    return f"{text} | attention {weight:.3f}" if weight is not None else text


def model_line(result: SeriesResult) -> str:
    """The model's identity in one line: name, version, folds, calibration."""
    model = result.model
    calibrated = "yes" if model.calibrated else "no"
    return f"Model {model.name} version {model.version}; folds: {model.folds}; calibrated: {calibrated}"


def probability_basis(result: SeriesResult) -> str:
    """What the probability of cancer is: a calibrated ensemble or the plain mean of the folds."""
    model = result.model
    if model.calibrated:
        return f"calibrated ensemble of {model.folds} fold model(s)"
    return f"mean of {model.folds} fold model(s), not calibrated"
