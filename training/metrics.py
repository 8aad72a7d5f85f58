"""Binary and zero-shot semantic evaluation metrics with patient-level (cluster) bootstrap CIs.

Pure numpy/scipy functions, vectorised over bootstrap resamples:

- AUROC (Mann-Whitney, ties count one half), AUPRC (average precision: the step-wise sum
  ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, scikit-learn's definition, not the
  trapezoid), Brier score, expected calibration error (ECE: 10 equal-width bins of the predicted
  probability on [0, 1], the last bin closed at 1; ``sum_b n_b / N * |mean label_b - mean p_b|``).
- Operating points at a target sensitivity: the highest threshold ``t`` (a predicted score; a nodule
  is positive when ``score >= t``) whose sensitivity reaches the target; false-positive rate,
  specificity and precision there.
- Cluster bootstrap: each resample draws the *patients* with replacement and takes all their
  nodules, so nodules of one patient stay together (a patient's nodules are not independent). A
  resample is a vector of multiplicities per nodule; every metric is computed with those weights,
  which equals computing it on the resampled (duplicated) nodules. Resamples with one class only
  are skipped and counted. CIs are percentile intervals. The same resamples serve every predictor,
  so their intervals are paired.
- DeLong's test of two correlated AUROCs (paired: same nodules), with the O(n log n) midrank
  algorithm of Sun and Xu (IEEE Signal Processing Letters 21(11), 2014). It treats nodules as
  independent; with several nodules per patient the cluster-bootstrap CIs are the safer guide.
- Zero-shot semantic AUROC of a feature: one-vs-rest AUROC per observed value (the value
  probabilities renormalised over the observed values, as :func:`scripts.workflow.semantic_aurocs`
  does), and their average weighted by each value's prevalence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "N_CALIBRATION_BINS",
    "SENSITIVITY_TARGETS",
    "BinaryEvaluation",
    "DeLongResult",
    "Estimate",
    "OperatingPoint",
    "SemanticEvaluation",
    "average_precision",
    "auroc",
    "binary_metric_names",
    "bootstrap_binary_metrics",
    "brier_score",
    "calibration_bins",
    "delong_covariance",
    "delong_test",
    "evaluate_binary",
    "evaluate_semantic_feature",
    "expected_calibration_error",
    "operating_point",
    "patient_resample_counts",
    "sensitivity_key",
]

SENSITIVITY_TARGETS: tuple[float, ...] = (0.90, 0.95)
N_CALIBRATION_BINS = 10
_CHUNK_ELEMENTS = 2_000_000  # resamples x nodules per vectorised block (~16 MB of float64)
_RELATIVE_TOLERANCE = 1e-9  # so that 0.95 * 20 positives counts 19 true positives as reaching 95 %


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap percentile interval (NaN when not computed)."""

    value: float
    low: float = math.nan
    high: float = math.nan


@dataclass(frozen=True)
class OperatingPoint:
    """The highest threshold reaching a target sensitivity, and the rates there."""

    target_sensitivity: float
    threshold: float
    sensitivity: float
    specificity: float
    false_positive_rate: float
    precision: float


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's paired test of ``auc - auc_reference`` (two-sided)."""

    auc: float
    auc_reference: float
    difference: float
    standard_error: float
    z: float
    p_value: float


@dataclass(frozen=True)
class BinaryEvaluation:
    """Every binary metric of one predictor, with bootstrap CIs.

    Attributes:
        estimates: metric name -> estimate (names from :func:`binary_metric_names`).
        n_resamples: bootstrap resamples drawn.
        n_skipped: resamples skipped because they held one class only.
    """

    estimates: dict[str, Estimate]
    n_resamples: int
    n_skipped: int

    def as_row(self) -> dict[str, float]:
        """Flat ``{metric, metric_low, metric_high}`` for a table."""
        row: dict[str, float] = {}
        for name, estimate in self.estimates.items():
            row[name] = estimate.value
            row[f"{name}_low"] = estimate.low
            row[f"{name}_high"] = estimate.high
        return row


@dataclass(frozen=True)
class SemanticEvaluation:
    """Zero-shot AUROC of one semantic feature.

    Attributes:
        values: the observed values (at least two), in the feature's order.
        positives: nodules annotated with each value.
        aurocs: one-vs-rest AUROC of each value.
        weighted: prevalence-weighted AUROC with its bootstrap CI.
        n_annotated: nodules with an annotation of this feature.
        n_skipped: resamples with fewer than two observed values.
    """

    values: tuple[str, ...]
    positives: tuple[int, ...]
    aurocs: tuple[float, ...]
    weighted: Estimate
    n_annotated: int
    n_skipped: int


def _binary_inputs(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray):
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return y, s


def sensitivity_key(target: float) -> str:
    """``0.9`` -> ``"sens90"``, the suffix of the operating-point metric names."""
    return f"sens{round(target * 100):d}"


def binary_metric_names(sensitivities: Sequence[float] = SENSITIVITY_TARGETS) -> list[str]:
    """Names of the metrics :func:`evaluate_binary` reports, in table order."""
    names = ["auroc", "auprc"]
    for target in sensitivities:
        key = sensitivity_key(target)
        names += [f"fpr_at_{key}", f"precision_at_{key}", f"specificity_at_{key}", f"threshold_at_{key}"]
    return [*names, "brier", "ece"]


class _RankedScores:
    """Scores sorted once (descending) and grouped into tie levels; metrics for many weightings."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        self.order = np.argsort(-scores, kind="stable")
        self.sorted_scores = scores[self.order]
        self.sorted_labels = labels[self.order]
        changes = np.flatnonzero(self.sorted_scores[1:] != self.sorted_scores[:-1]) + 1
        self.starts = np.concatenate([[0], changes])
        self.level_scores = self.sorted_scores[self.starts]

        self.ends = np.concatenate([changes, [scores.size]]) - 1  # last sorted index of each level

    def cumulative_counts(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted true and false positives when thresholding at each tie level, ``(B, G)`` each.

        Level g holds the g-th highest distinct score; a sample is positive when its score is at
        least the level's.
        """
        weighted = weights[:, self.order]
        positives = weighted * self.sorted_labels
        tp = np.cumsum(positives, axis=1)
        fp = np.cumsum(weighted, axis=1) - tp
        if self.ends.size == self.sorted_scores.size:  # no ties
            return tp, fp
        return tp[:, self.ends], fp[:, self.ends]


def _curve_metrics(
    ranked: _RankedScores,
    weights: np.ndarray,
    sensitivities: Sequence[float],
    n_bins: int,
    auroc_only: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All binary metrics (or the AUROC alone) for each row of ``weights`` ``(B, N)`` (multiplicities).

    Returns:
        metric name -> ``(B,)`` values, and the ``(B,)`` mask of rows holding both classes.
    """
    tp, fp = ranked.cumulative_counts(weights)
    level_pos = np.diff(tp, axis=1, prepend=0.0)
    level_neg = np.diff(fp, axis=1, prepend=0.0)
    total_pos, total_neg = tp[:, -1], fp[:, -1]
    valid = (total_pos > 0) & (total_neg > 0)
    safe_pos = np.where(valid, total_pos, 1.0)
    safe_neg = np.where(valid, total_neg, 1.0)
    # AUROC: each positive beats the negatives of lower levels and ties half of its own level
    below = total_neg[:, None] - fp
    values: dict[str, np.ndarray] = {
        "auroc": np.sum(level_pos * (below + 0.5 * level_neg), axis=1) / (safe_pos * safe_neg)
    }
    if auroc_only:
        return {"auroc": np.where(valid, values["auroc"], np.nan)}, valid
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    values["auprc"] = np.sum(level_pos * precision, axis=1) / safe_pos
    rows = np.arange(len(weights))
    for target in sensitivities:
        key = sensitivity_key(target)
        reached = tp >= (target - _RELATIVE_TOLERANCE) * total_pos[:, None]
        level = np.argmax(reached, axis=1)  # first = highest threshold reaching the target
        tp_at, fp_at = tp[rows, level], fp[rows, level]
        values[f"fpr_at_{key}"] = fp_at / safe_neg
        values[f"precision_at_{key}"] = tp_at / np.maximum(tp_at + fp_at, 1e-300)
        values[f"specificity_at_{key}"] = 1.0 - fp_at / safe_neg
        values[f"threshold_at_{key}"] = ranked.level_scores[level]
    sorted_weights = weights[:, ranked.order]
    total = sorted_weights.sum(axis=1)
    residual = (ranked.sorted_scores - ranked.sorted_labels) ** 2
    values["brier"] = sorted_weights @ residual / np.maximum(total, 1e-300)
    bins = _bin_index(ranked.sorted_scores, n_bins)
    one_hot = np.zeros((len(bins), n_bins))
    one_hot[np.arange(len(bins)), bins] = 1.0
    gap = sorted_weights @ (one_hot * (ranked.sorted_labels - ranked.sorted_scores)[:, None])
    values["ece"] = np.abs(gap).sum(axis=1) / np.maximum(total, 1e-300)
    for name in values:
        values[name] = np.where(valid, values[name], np.nan)
    return values, valid


def _bin_index(probabilities: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability on [0, 1]; 1.0 falls in the last bin."""
    return np.clip(np.floor(probabilities * n_bins).astype(np.int64), 0, n_bins - 1)


def _point_metrics(
    labels: np.ndarray, scores: np.ndarray, sensitivities: Sequence[float], n_bins: int
) -> dict[str, float]:
    ranked = _RankedScores(labels, scores)
    values, valid = _curve_metrics(ranked, np.ones((1, labels.size)), sensitivities, n_bins)
    if not valid[0]:
        raise ValueError("both classes are needed (labels hold one class only)")
    return {name: float(array[0]) for name, array in values.items()}


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count one half).

    Args:
        labels: 0/1 per sample (both classes present).
        scores: higher = more likely positive.

    Returns:
        the AUROC.
    """
    return _point_metrics(*_binary_inputs(labels, scores), (), N_CALIBRATION_BINS)["auroc"]


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation).

    Args:
        labels: 0/1 per sample (both classes present).
        scores: higher = more likely positive.

    Returns:
        ``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds, highest first.
    """
    return _point_metrics(*_binary_inputs(labels, scores), (), N_CALIBRATION_BINS)["auprc"]


def operating_point(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, sensitivity: float
) -> OperatingPoint:
    """The highest threshold whose sensitivity reaches ``sensitivity``, and the rates there.

    Args:
        labels: 0/1 per sample (both classes present).
        scores: higher = more likely positive; positive means ``score >= threshold``.
        sensitivity: the target, in (0, 1].

    Returns:
        the operating point.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {sensitivity}")
    y, s = _binary_inputs(labels, scores)
    values = _point_metrics(y, s, (sensitivity,), N_CALIBRATION_BINS)
    key = sensitivity_key(sensitivity)
    threshold = values[f"threshold_at_{key}"]
    return OperatingPoint(
        target_sensitivity=sensitivity,
        threshold=threshold,
        sensitivity=float(np.mean(s[y == 1] >= threshold)),
        specificity=values[f"specificity_at_{key}"],
        false_positive_rate=values[f"fpr_at_{key}"],
        precision=values[f"precision_at_{key}"],
    )


def brier_score(labels: Sequence[int] | np.ndarray, probabilities: Sequence[float] | np.ndarray) -> float:
    """Mean squared difference between the probability and the 0/1 label."""
    y, p = _binary_inputs(labels, probabilities)
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    n_bins: int = N_CALIBRATION_BINS,
) -> float:
    """ECE over ``n_bins`` equal-width bins of [0, 1]: ``sum_b n_b / N |mean label_b - mean p_b|``."""
    y, p = _binary_inputs(labels, probabilities)
    gap = np.bincount(_bin_index(p, n_bins), weights=y - p, minlength=n_bins)
    return float(np.abs(gap).sum() / y.size)


def calibration_bins(
    labels: Sequence[int] | np.ndarray,
    probabilities: Sequence[float] | np.ndarray,
    n_bins: int = N_CALIBRATION_BINS,
) -> dict[str, np.ndarray]:
    """Reliability-diagram data per equal-width bin: ``count``, ``mean_probability``, ``fraction_positive``.

    Empty bins hold NaN means.
    """
    y, p = _binary_inputs(labels, probabilities)
    bins = _bin_index(p, n_bins)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bins, weights=p, minlength=n_bins) / count
        mean_y = np.bincount(bins, weights=y, minlength=n_bins) / count
    return {
        "lower": np.arange(n_bins) / n_bins,
        "upper": np.arange(1, n_bins + 1) / n_bins,
        "count": count,
        "mean_probability": mean_p,
        "fraction_positive": mean_y,
    }


def patient_resample_counts(groups: Sequence[object] | np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Cluster-bootstrap multiplicities: draw patients with replacement, keep all their nodules.

    Args:
        groups: the patient of each nodule (any hashable values).
        n_resamples: number of resamples B.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(B, N)`` int32: how often each nodule appears in each resample (equal within a patient;
        each row draws as many patients as there are).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    _, patient = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_patients = int(patient.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    flat = (draws + (np.arange(n_resamples) * n_patients)[:, None]).ravel()
    per_patient = np.bincount(flat, minlength=n_resamples * n_patients).reshape(n_resamples, n_patients)
    return per_patient[:, patient].astype(np.int32)


def _chunks(n_rows: int, n_columns: int) -> Iterator[slice]:
    size = max(1, _CHUNK_ELEMENTS // max(n_columns, 1))
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def bootstrap_binary_metrics(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    counts: np.ndarray,
    sensitivities: Sequence[float] = SENSITIVITY_TARGETS,
    n_bins: int = N_CALIBRATION_BINS,
    progress: Callable[[int], object] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every binary metric on every resample.

    Args:
        labels: 0/1 per nodule.
        scores: probability per nodule.
        counts: ``(B, N)`` multiplicities (:func:`patient_resample_counts`).
        sensitivities: operating-point targets.
        n_bins: ECE bins.
        progress: called with the number of resamples done after each block.

    Returns:
        metric name -> ``(B,)`` values (NaN on skipped resamples), and the ``(B,)`` validity mask.
    """
    y, s = _binary_inputs(labels, scores)
    if counts.ndim != 2 or counts.shape[1] != y.size:
        raise ValueError(f"counts must be (B, {y.size}), got {counts.shape}")
    ranked = _RankedScores(y, s)
    blocks: list[dict[str, np.ndarray]] = []
    masks: list[np.ndarray] = []
    for rows in _chunks(counts.shape[0], y.size):
        values, valid = _curve_metrics(ranked, counts[rows].astype(np.float64), sensitivities, n_bins)
        blocks.append(values)
        masks.append(valid)
        if progress is not None:
            progress(rows.stop - rows.start)
    merged = {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    return merged, np.concatenate(masks)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def evaluate_binary(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    counts: np.ndarray | None = None,
    confidence: float = 0.95,
    sensitivities: Sequence[float] = SENSITIVITY_TARGETS,
    n_bins: int = N_CALIBRATION_BINS,
    progress: Callable[[int], object] | None = None,
) -> BinaryEvaluation:
    """Point estimates of every binary metric and their cluster-bootstrap percentile CIs.

    Args:
        labels: 0/1 per nodule (both classes present).
        scores: predicted probability per nodule.
        counts: ``(B, N)`` resample multiplicities, or ``None`` for point estimates only.
        confidence: CI level.
        sensitivities: operating-point targets.
        n_bins: ECE bins.
        progress: see :func:`bootstrap_binary_metrics`.

    Returns:
        the evaluation.
    """
    y, s = _binary_inputs(labels, scores)
    point = _point_metrics(y, s, sensitivities, n_bins)
    if counts is None:
        return BinaryEvaluation({name: Estimate(value) for name, value in point.items()}, 0, 0)
    samples, valid = bootstrap_binary_metrics(y, s, counts, sensitivities, n_bins, progress)
    estimates = {
        name: Estimate(point[name], *_percentile_interval(samples[name], confidence)) for name in point
    }
    return BinaryEvaluation(estimates, n_resamples=int(counts.shape[0]), n_skipped=int((~valid).sum()))


def _midranks(values: np.ndarray) -> np.ndarray:
    return rankdata(values, method="average", axis=-1)


def delong_covariance(
    labels: Sequence[int] | np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of several predictors on the same samples and DeLong's covariance matrix.

    Sun and Xu's fast algorithm: the structural components come from midranks within the
    positives, within the negatives and in the pooled sample, O(k n log n).

    Args:
        labels: 0/1 per sample (at least two of each class).
        scores: ``(k, N)`` scores of k predictors.

    Returns:
        ``(k,)`` AUROCs and their ``(k, k)`` covariance.
    """
    y = np.asarray(labels).ravel().astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape[1] != y.size:
        raise ValueError(f"{y.size} labels but scores of shape {scores.shape}")
    positives, negatives = scores[:, y], scores[:, ~y]
    m, n = positives.shape[1], negatives.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 samples of each class ({m} positive, {n} negative)")
    rank_pos = _midranks(positives)
    rank_neg = _midranks(negatives)
    rank_all = _midranks(np.concatenate([positives, negatives], axis=1))
    aucs = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (rank_all[:, :m] - rank_pos) / n  # per positive: share of negatives it beats
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m  # per negative: share of positives that beat it
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def delong_test(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    reference_scores: Sequence[float] | np.ndarray,
) -> DeLongResult:
    """DeLong's two-sided test of ``AUROC(scores) - AUROC(reference_scores)`` on the same samples.

    Args:
        labels: 0/1 per sample.
        scores: the predictor tested.
        reference_scores: the comparison predictor (e.g. a baseline).

    Returns:
        the AUROCs, their difference, its standard error, z and the two-sided normal p-value
        (p = 1 and z = 0 when both predictors rank identically).
    """
    aucs, covariance = delong_covariance(labels, np.vstack([scores, reference_scores]))
    difference = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    if variance <= 1e-15:
        z = 0.0 if abs(difference) < 1e-12 else math.copysign(math.inf, difference)
    else:
        z = difference / math.sqrt(variance)
    p_value = math.erfc(abs(z) / math.sqrt(2.0))
    return DeLongResult(
        auc=float(aucs[0]),
        auc_reference=float(aucs[1]),
        difference=difference,
        standard_error=math.sqrt(max(variance, 0.0)),
        z=z,
        p_value=p_value,
    )


def evaluate_semantic_feature(
    truth: Sequence[str | None],
    probabilities: np.ndarray,
    values: Sequence[str],
    counts: np.ndarray | None = None,
    confidence: float = 0.95,
) -> SemanticEvaluation | None:
    """Zero-shot AUROC of one feature: one-vs-rest per observed value and the prevalence-weighted mean.

    Args:
        truth: annotated value per nodule (``None`` or ``""`` = not annotated).
        probabilities: ``(N, V)`` predicted probability of each of the feature's ``values``.
        values: the feature's values, in the column order of ``probabilities``.
        counts: ``(B, N)`` resample multiplicities for the CI of the weighted AUROC, or ``None``.
        confidence: CI level.

    Returns:
        the evaluation, or ``None`` when fewer than two values are observed.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth_array = np.array([t or "" for t in truth], dtype=object)
    if probabilities.shape != (truth_array.size, len(values)):
        expected = (truth_array.size, len(values))
        raise ValueError(f"probabilities must be {expected}, got {probabilities.shape}")
    known = truth_array != ""
    unknown = set(truth_array[known]) - set(values)
    if unknown:
        raise ValueError(f"annotated value(s) not among the feature's values: {sorted(unknown)}")
    observed = [j for j, value in enumerate(values) if np.any(truth_array[known] == value)]
    if len(observed) < 2:
        return None
    block = probabilities[known][:, observed]
    block = block / np.maximum(block.sum(axis=1, keepdims=True), 1e-300)  # renormalise over observed
    annotated = truth_array[known]
    one_vs_rest = [(annotated == values[j]).astype(np.float64) for j in observed]
    aurocs = tuple(auroc(target, block[:, i]) for i, target in enumerate(one_vs_rest))
    positives = tuple(int(target.sum()) for target in one_vs_rest)
    weighted = float(np.dot(positives, aurocs) / sum(positives))
    low = high = math.nan
    n_skipped = 0
    if counts is not None:
        samples, n_skipped = _bootstrap_weighted_auroc(one_vs_rest, block, counts[:, known])
        low, high = _percentile_interval(samples, confidence)
    return SemanticEvaluation(
        values=tuple(values[j] for j in observed),
        positives=positives,
        aurocs=aurocs,
        weighted=Estimate(weighted, low, high),
        n_annotated=int(known.sum()),
        n_skipped=n_skipped,
    )


def _bootstrap_weighted_auroc(
    one_vs_rest: list[np.ndarray], block: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, int]:
    """Prevalence-weighted one-vs-rest AUROC on each resample (NaN where < 2 values remain)."""
    n_resamples = counts.shape[0]
    weighted_sum = np.zeros(n_resamples)
    weight_total = np.zeros(n_resamples)
    present = np.zeros(n_resamples, dtype=np.int64)
    for i, target in enumerate(one_vs_rest):
        ranked = _RankedScores(target, block[:, i])
        for rows in _chunks(n_resamples, target.size):
            weights = counts[rows].astype(np.float64)
            values, valid = _curve_metrics(ranked, weights, (), 1, auroc_only=True)
            prevalence = weights @ target
            weighted_sum[rows] += np.where(valid, values["auroc"] * prevalence, 0.0)
            weight_total[rows] += np.where(valid, prevalence, 0.0)
            present[rows] += (prevalence > 0).astype(np.int64)
    usable = (present >= 2) & (weight_total > 0)
    samples = np.where(usable, weighted_sum / np.maximum(weight_total, 1e-300), np.nan)
    return samples, int((~usable).sum())
