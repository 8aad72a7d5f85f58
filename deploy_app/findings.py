"""Typed results passed between the deploy app's operators and its pure DICOM-building functions.

Coordinates are world LPS millimetres in the frame of reference of the CT series they came with.
:meth:`NoduleResult.findings` is the one place that decides, for every output, whether a semantic
finding is stated as a value or as "indeterminate" (:mod:`scripts.finding_reliability`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from scripts.finding_reliability import FeatureReliability, FindingReliability, normalised_margin
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES

INDETERMINATE = "Indeterminate"
"""What a finding below its confidence threshold is reported as."""


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
    reliability: FindingReliability = field(default_factory=FindingReliability)


@dataclass(frozen=True)
class Finding:
    """One semantic feature of one nodule, as every output reports it.

    Args:
        column: the feature column.
        title: its display title.
        value: the most probable value.
        probability: that value's probability.
        n_values: how many values the feature has.
        reliability: what the model's validation data showed for the feature.
    """

    column: str
    title: str
    value: str
    probability: float
    n_values: int
    reliability: FeatureReliability

    @property
    def confident(self) -> bool:
        """Whether the probability reaches the feature's confidence threshold."""
        return self.reliability.is_confident(self.probability)

    @property
    def stated_value(self) -> str:
        """The value when confident, else :data:`INDETERMINATE`."""
        return self.value if self.confident else INDETERMINATE

    @property
    def margin(self) -> float:
        """The probability above a uniform guess (what findings are ranked on)."""
        return normalised_margin(self.probability, self.n_values)


def most_certain(findings: Sequence[Finding], limit: int, *, include_absent: bool = True) -> list[Finding]:
    """The confident findings with the largest normalised margin, at most ``limit``.

    Args:
        findings: a nodule's findings.
        limit: most findings returned.
        include_absent: False leaves out findings whose value is "Absent" (for a picture, which
            shows what is there).
    """
    kept = [f for f in findings if f.confident and (include_absent or f.value != "Absent")]
    return sorted(kept, key=lambda f: -f.margin)[:limit]


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

    def findings(self, reliability: FindingReliability) -> list[Finding]:
        """Every feature with values, in vocabulary order (columns the vocabulary does not know
        follow in their given order, titled by their column name)."""
        known = [feature.column for feature in FEATURES if feature.column in self.semantic]
        unknown = [column for column in self.semantic if column not in FEATURE_BY_COLUMN]
        findings = []
        for column in (*known, *unknown):
            if not self.semantic[column]:
                continue
            value, probability = self.predicted_value(column)
            title = FEATURE_BY_COLUMN[column].title if column in FEATURE_BY_COLUMN else column
            n_values = (
                len(FEATURE_BY_COLUMN[column].values)
                if column in FEATURE_BY_COLUMN
                else len(self.semantic[column])
            )
            findings.append(Finding(column, title, value, probability, n_values, reliability.feature(column)))
        return findings


@dataclass(frozen=True)
class SeriesResult:
    """Everything the writers need for one CT series."""

    nodules: tuple[NoduleResult, ...]
    skipped: tuple[SkippedSeed, ...]
    model: ModelInfo


CONSOLE_FINDINGS = 3
"""Most certain findings the console table shows per nodule."""


def results_table(result: SeriesResult) -> str:
    """A plain-text table: nodule, seed position, probability of cancer and its most certain findings.

    A finding is shown only when confident (see :meth:`NoduleResult.findings`), most certain first
    (normalised margin); the count of indeterminate ones follows.
    """
    lines = [f"{'nodule':<12} {'seed LPS (mm)':<26} {'P(cancer)':>9}  most certain findings (probability)"]
    for nodule in result.nodules:
        x, y, z = nodule.seed.position_lps
        findings = nodule.findings(result.model.reliability)
        shown = [
            f"{f.title.lower()}: {f.value} ({f.probability:.2f})"
            for f in most_certain(findings, CONSOLE_FINDINGS)
        ]
        indeterminate = sum(not f.confident for f in findings)
        if indeterminate:
            shown.append(f"{indeterminate} of {len(findings)} indeterminate")
        position = f"({x:7.1f}, {y:7.1f}, {z:7.1f})"
        lines.append(f"{nodule.seed.label:<12} {position:<26} {nodule.malignancy:>9.3f}  {'; '.join(shown)}")
    for skipped in result.skipped:
        lines.append(f"{skipped.seed.label:<12} skipped ({skipped.seed.source}): {skipped.reason}")
    return "\n".join(lines)
