"""How far each zero-shot semantic finding of a model can be trusted, recorded with the model.

A model set (``models/`` or ``models/<name>/``) may hold ``finding_reliability.json`` beside
``calibration.json``. ``python -m training.evaluate`` writes it from the evaluated nodules; a
model without one gets the defaults below, and every output says so.

Per feature column:

- ``auroc`` (with ``auroc_low``/``auroc_high``, a patient-bootstrap 95 % interval, when computed):
  the prevalence-weighted one-vs-rest zero-shot AUROC on the annotated nodules (``n_annotated``);
- ``confidence_threshold``: the probability of the predicted value from which the finding is
  stated as a value rather than as "indeterminate". Derived as the lowest predicted-value
  probability ``t`` at which the zero-shot precision (the share of nodules whose predicted value
  is the annotated one, among those predicted with probability >= ``t``) reaches
  :data:`TARGET_PRECISION`, over at least :data:`MIN_SUPPORT` nodules. ``null`` when the precision
  never reaches it: that feature is always reported as indeterminate.

A feature the record does not name gets :data:`DEFAULT_CONFIDENCE` and no AUROC ("not evaluated").
A feature is *at chance* when its AUROC interval reaches 0.5 or lies below it (without an
interval: when the AUROC is at most 0.5 + :data:`CHANCE_MARGIN`).

The threshold applies to the probability of the predicted value, and the value is predicted
whatever the number of values (2, 3 or 5); findings are ranked against each other on the
normalised margin :func:`normalised_margin`, not on raw probability.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from scripts.errors import UserInputError

RELIABILITY_FILE = "finding_reliability.json"
DEFAULT_CONFIDENCE = 0.6
"""Confidence threshold of a feature the model's record does not name."""
TARGET_PRECISION = 0.8
MIN_SUPPORT = 5
"""Fewest nodules a threshold may rest on."""
CHANCE_MARGIN = 0.05


def normalised_margin(probability: float, n_values: int) -> float:
    """How far a predicted value's probability lies above a uniform guess: ``p - 1/n_values``.

    Comparable across features with different numbers of values, unlike the raw probability (0.5
    is a coin toss for Present/Absent, and twice chance for a three-valued feature).
    """
    if n_values < 1:
        raise ValueError(f"a feature needs at least one value, got {n_values}")
    return float(probability) - 1.0 / n_values


def confidence_threshold(
    correct: Sequence[bool] | np.ndarray,
    probability: Sequence[float] | np.ndarray,
    *,
    target: float = TARGET_PRECISION,
    min_support: int = MIN_SUPPORT,
) -> float | None:
    """The lowest predicted-value probability from which zero-shot precision reaches ``target``.

    Args:
        correct: per nodule, whether the predicted value is the annotated one.
        probability: per nodule, the predicted value's probability.
        target: precision to reach.
        min_support: fewest nodules at or above the threshold.

    Returns:
        the threshold, or None when no threshold over ``min_support`` or more nodules reaches it.
    """
    correct = np.asarray(correct, dtype=bool)
    probability = np.asarray(probability, dtype=np.float64)
    if correct.shape != probability.shape or correct.ndim != 1:
        raise ValueError("correct and probability must be 1-D and of the same length")
    order = np.argsort(-probability, kind="stable")
    ranked = probability[order]
    hits = np.cumsum(correct[order])
    counts = np.arange(1, len(ranked) + 1)
    # a threshold keeps every nodule tied with it: score only the last position of each tie
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True] if len(ranked) else np.zeros(0, bool)
    reaches = last_of_tie & (counts >= min_support) & (hits >= target * counts - 1e-12)
    if not reaches.any():
        return None
    return float(ranked[np.flatnonzero(reaches)[-1]])


@dataclass(frozen=True)
class FeatureReliability:
    """What the validation data showed for one feature (see the module docstring).

    Args:
        column: the feature column.
        auroc: zero-shot weighted AUROC, None when not evaluated.
        auroc_low: lower end of its 95 % interval, if computed.
        auroc_high: upper end of its 95 % interval, if computed.
        n_annotated: annotated nodules the AUROC and threshold rest on.
        confidence_threshold: see the module docstring (None: never confident).
        threshold_basis: ``"validation"`` (derived), ``"default"`` or ``"configured"``.
    """

    column: str
    auroc: float | None = None
    auroc_low: float | None = None
    auroc_high: float | None = None
    n_annotated: int = 0
    confidence_threshold: float | None = DEFAULT_CONFIDENCE
    threshold_basis: str = "default"

    def __post_init__(self) -> None:
        for name in ("auroc", "auroc_low", "auroc_high", "confidence_threshold"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{self.column}: {name} must be in [0, 1] or null, got {value}")

    @property
    def evaluated(self) -> bool:
        return self.auroc is not None

    @property
    def at_chance(self) -> bool:
        """Whether the model was not shown to separate this feature better than chance (False: not
        evaluated): its AUROC interval reaches 0.5 or lies below it, or without an interval its AUROC
        is at most 0.5 + :data:`CHANCE_MARGIN`."""
        if self.auroc is None:
            return False
        if self.auroc_low is not None:
            return self.auroc_low <= 0.5
        return self.auroc <= 0.5 + CHANCE_MARGIN

    def is_confident(self, probability: float) -> bool:
        """Whether a predicted value of this probability is stated as a value."""
        return self.confidence_threshold is not None and probability >= self.confidence_threshold

    def separation(self) -> str:
        """How well the model separates the feature, in words: ``"AUROC 0.96 [0.90, 1.00]"``."""
        if self.auroc is None:
            return "not evaluated"
        text = f"AUROC {self.auroc:.2f}"
        if self.auroc_low is not None and self.auroc_high is not None:
            text += f" [{self.auroc_low:.2f}, {self.auroc_high:.2f}]"
        return f"{text}, at chance" if self.at_chance else text


@dataclass(frozen=True)
class FindingReliability:
    """Every feature's :class:`FeatureReliability`, and where they come from.

    Args:
        features: feature column -> reliability (features absent get the defaults).
        source: what the numbers were computed on, in words ("" when nothing is recorded).
        target_precision: the precision the thresholds were derived for.
    """

    features: Mapping[str, FeatureReliability] = field(default_factory=dict)
    source: str = ""
    target_precision: float = TARGET_PRECISION

    @property
    def recorded(self) -> bool:
        return bool(self.features)

    def feature(self, column: str) -> FeatureReliability:
        return self.features.get(column) or FeatureReliability(column)

    def with_confidence(self, threshold: float, columns: Sequence[str]) -> FindingReliability:
        """The same record with one configured threshold for every feature in ``columns``."""
        if not 0.0 < threshold <= 1.0:
            raise UserInputError(f"the finding confidence must be in (0, 1], got {threshold}")
        features = {
            column: replace(
                self.feature(column), confidence_threshold=threshold, threshold_basis="configured"
            )
            for column in {*self.features, *columns}
        }
        return replace(self, features=features)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target_precision": self.target_precision,
            "min_support": MIN_SUPPORT,
            "features": {
                column: {k: v for k, v in asdict(item).items() if k != "column"}
                for column, item in self.features.items()
            },
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any], origin: str = RELIABILITY_FILE) -> FindingReliability:
        """Parse a record (:meth:`to_json`'s layout).

        Raises:
            UserInputError: the record is malformed, naming ``origin`` and the feature.
        """
        try:
            features = {
                str(column): FeatureReliability(column=str(column), **dict(item))
                for column, item in dict(record["features"]).items()
            }
            return cls(
                features,
                str(record.get("source", "")),
                float(record.get("target_precision", TARGET_PRECISION)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserInputError(f"{origin} is not a valid finding reliability record: {error}") from error


def read_finding_reliability(models_dir: str | Path) -> FindingReliability:
    """The record in ``models_dir/finding_reliability.json``, or an empty one (defaults) without it.

    Raises:
        UserInputError: the file exists but cannot be read or parsed.
    """
    path = Path(models_dir) / RELIABILITY_FILE
    if not path.is_file():
        return FindingReliability()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from error
    if not isinstance(record, dict):
        raise UserInputError(f"{path} is not a valid finding reliability record: not a JSON object")
    return FindingReliability.from_json(record, str(path))
