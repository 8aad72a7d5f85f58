"""What every readable output shows, in one place: banners, model identity and the rows per nodule.

The PDF (:mod:`deploy_app.report.pdf`), the Secondary Capture montage
(:mod:`deploy_app.report.montage`) and any further readable output (a JSON or text summary, a site's
own writer in :mod:`deploy_app.report.writers`) take their words and numbers from here, so they
cannot drift apart: the same finding rows, percentages, positions, plane titles and banners.
Pure functions of a :class:`~deploy_app.findings.SeriesResult` and its nodules; no drawing.
"""

from __future__ import annotations

from collections.abc import Sequence

from deploy_app.findings import INDETERMINATE, Finding, NoduleResult, SeriesResult, most_certain
from scripts.finding_reliability import DEFAULT_CONFIDENCE
from scripts.transforms import PLANE_DIRECTIONS

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


def finding_text(finding: Finding) -> str:
    """A finding's reported value as shown: ``"Present"``, or ``"Indeterminate (Present?)"`` below its
    confidence threshold (the most probable value follows with a question mark)."""
    return finding.value if finding.confident else f"{INDETERMINATE} ({finding.value}?)"


def threshold_text(finding: Finding) -> str:
    """The confidence threshold a finding was compared with: ``"60.0 %"``, or ``"never"`` when the
    validation data never reached the target precision."""
    threshold = finding.reliability.confidence_threshold
    return "never" if threshold is None else percent(threshold)


def reliability_note(result: SeriesResult) -> str:
    """Where the confidence thresholds and AUROCs come from, in one sentence."""
    reliability = result.model.reliability
    if not reliability.recorded:
        return (
            "No validation record of the findings came with the model: every finding uses the default "
            f"confidence threshold of {100.0 * DEFAULT_CONFIDENCE:.0f} %, and none has a measured AUROC."
        )
    return (
        "Thresholds: the probability from which zero-shot precision reached "
        f"{100.0 * reliability.target_precision:.0f} % on the model's validation data "
        f"({reliability.source}); "
        'AUROC: how well the model separates the feature\'s values there ("at chance": not better than a '
        "coin toss). Features without a record use the default threshold of "
        f"{100.0 * DEFAULT_CONFIDENCE:.0f} %."
    )


def top_findings(result: SeriesResult, nodule: NoduleResult, limit: int = 6) -> list[Finding]:
    """The findings worth burning into a picture: confident, other than "Absent", most certain first
    (normalised margin; the PDF lists every feature)."""
    return most_certain(nodule.findings(result.model.reliability), limit, include_absent=False)


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
