"""Typed results passed between the deploy app's operators and its pure DICOM-building functions.

Coordinates are world LPS millimetres in the frame of reference of the CT series they came with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class NoduleSeed:
    """Where a nodule is, and where that knowledge came from.

    Args:
        position_lps: world LPS mm.
        label: short tracking identifier shown to users and written to the SR (e.g. "Nodule 1").
        source: where the seed was read, for messages (e.g. "seeds.csv line 3", "SEG segment 2").
        frame_of_reference_uid: the frame the position refers to (None: the CT's, e.g. a seeds file).
        tracking_uid: a tracking UID carried over from an input SR, if any.
    """

    position_lps: tuple[float, float, float]
    label: str
    source: str
    frame_of_reference_uid: str | None = None
    tracking_uid: str | None = None


@dataclass(frozen=True)
class SkippedSeed:
    """A seed that was not analysed, and why (reported in the log and the readable report)."""

    seed: NoduleSeed
    reason: str


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the model that produced the results (from the bundle's metadata.json)."""

    name: str
    version: str
    folds: int
    calibrated: bool
    untrained_demo: bool = False


@dataclass(frozen=True)
class NoduleResult:
    """Model output for one nodule.

    Args:
        seed: the analysed seed.
        malignancy: probability of cancer: the calibrated fold ensemble when the bundle carries
            calibrators, else the mean of the folds' probabilities.
        malignancy_per_fold: each fold's raw probability.
        semantic: feature column -> value -> probability (values of a feature sum to 1).
        attention: the nine MIL attention weights, in plane order (sum to 1).
        planes: the nine windowed planes (9, H, W) in [0, 1], for the readable report.
    """

    seed: NoduleSeed
    malignancy: float
    malignancy_per_fold: tuple[float, ...]
    semantic: Mapping[str, Mapping[str, float]]
    attention: tuple[float, ...]
    planes: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        probabilities = [
            ("malignancy", self.malignancy),
            *((f"fold {k} malignancy", p) for k, p in enumerate(self.malignancy_per_fold)),
            *((f"{column} = {value}", p) for column, v in self.semantic.items() for value, p in v.items()),
        ]
        for name, probability in probabilities:
            if not 0.0 <= probability <= 1.0:  # also False for NaN
                raise ValueError(f"{self.seed.label}: {name} probability {probability} is not in [0, 1]")

    def predicted_value(self, column: str) -> tuple[str, float]:
        """The most probable value of a feature and its probability."""
        values = self.semantic[column]
        value = max(values, key=values.__getitem__)
        return value, float(values[value])


@dataclass(frozen=True)
class SeriesResult:
    """Everything the writers need for one CT series."""

    nodules: tuple[NoduleResult, ...]
    skipped: tuple[SkippedSeed, ...]
    model: ModelInfo


#: Findings the summary table shows: those the paper evaluates zero-shot (margin, consistency, shape,
#: pleural attachment); the SR and the PDF carry every feature.
SUMMARY_FEATURES = {
    "nodule_margin_conspicuity": "margin",
    "nodule_consistency": "consistency",
    "nodule_shape": "shape",
    "pleural_attachment": "pleural attachment",
}


def results_table(result: SeriesResult) -> str:
    """A plain-text table: nodule, seed position, probability of cancer and the key findings."""
    lines = [f"{'nodule':<12} {'seed LPS (mm)':<26} {'P(cancer)':>9}  findings (probability)"]
    for nodule in result.nodules:
        x, y, z = nodule.seed.position_lps
        shown = []
        for column, name in SUMMARY_FEATURES.items():
            if column in nodule.semantic:
                value, probability = nodule.predicted_value(column)
                shown.append(f"{name}: {value} ({probability:.2f})")
        position = f"({x:7.1f}, {y:7.1f}, {z:7.1f})"
        lines.append(f"{nodule.seed.label:<12} {position:<26} {nodule.malignancy:>9.3f}  {'; '.join(shown)}")
    for skipped in result.skipped:
        lines.append(f"{skipped.seed.label:<12} skipped ({skipped.seed.source}): {skipped.reason}")
    return "\n".join(lines)
