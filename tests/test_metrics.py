"""Evaluation metrics: against scikit-learn, hand values, a slow DeLong reference and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from training.metrics import (
    auroc,
    average_precision,
    binary_metric_names,
    bootstrap_binary_metrics,
    brier_score,
    calibration_bins,
    delong_covariance,
    delong_test,
    evaluate_binary,
    evaluate_semantic_feature,
    expected_calibration_error,
    operating_point,
    patient_resample_counts,
)


def random_case(seed: int, n: int = 300, ties: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores (rounded to create ties) and patient ids (1-4 nodules per patient)."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < 0.3).astype(int)
    scores = np.clip(0.25 * labels + rng.normal(0.4, 0.2, n), 0, 1)
    if ties:
        scores = np.round(scores, 1)
    patients = np.sort(rng.integers(0, n // 2, n))
    return labels, scores, patients


def slow_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components by their O(m n) definition (Heaviside kernel, ties = 1/2)."""
    positives, negatives = scores[:, labels == 1], scores[:, labels == 0]
    m, n = positives.shape[1], negatives.shape[1]
    kernel = (positives[:, :, None] > negatives[:, None, :]) + 0.5 * (
        positives[:, :, None] == negatives[:, None, :]
    )
    v10 = kernel.mean(axis=2)  # (k, m)
    v01 = kernel.mean(axis=1)  # (k, n)
    aucs = v10.mean(axis=1)
    k = scores.shape[0]
    s10 = np.array(
        [[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)] for a in range(k)]
    )
    s01 = np.array(
        [[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)] for a in range(k)]
    )
    return aucs, s10 / m + s01 / n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [True, False])
def test_auroc_and_average_precision_match_sklearn(seed: int, ties: bool) -> None:
    labels, scores, _ = random_case(seed, ties=ties)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize(
    ("labels", "scores", "expected_auroc", "expected_ap"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0, 1.0),
        ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.0, 0.5 / 3 + 0.5 / 2),  # recall 1/2 at precision 1/3, 1 at 1/2
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5, 0.5),
        ([0, 1, 1], [0.2, 0.1, 0.3], 0.5, 0.5 * 1.0 + 0.5 * 2 / 3),
    ],
)
def test_known_values(labels: list, scores: list, expected_auroc: float, expected_ap: float) -> None:
    assert auroc(labels, scores) == pytest.approx(expected_auroc)
    assert average_precision(labels, scores) == pytest.approx(expected_ap)


def test_single_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])


# 10 positives, 6 negatives
HAND_LABELS = np.array([1] * 10 + [0] * 6)
HAND_SCORES = np.array(
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1, 0.85, 0.65, 0.45, 0.25, 0.15, 0.05]
)


@pytest.mark.parametrize(
    ("target", "threshold", "fpr", "precision"),
    [
        (0.90, 0.2, 4 / 6, 9 / 13),  # 9 of 10 positives at >= 0.2; negatives 0.85, 0.65, 0.45, 0.25
        (0.95, 0.1, 5 / 6, 10 / 15),  # 9.5 positives need all 10: threshold 0.1, one more negative
        (0.50, 0.5, 2 / 6, 5 / 7),
    ],
)
def test_operating_point_is_the_highest_threshold_reaching_the_sensitivity(
    target: float, threshold: float, fpr: float, precision: float
) -> None:
    point = operating_point(HAND_LABELS, HAND_SCORES, target)
    assert point.threshold == pytest.approx(threshold)
    assert point.false_positive_rate == pytest.approx(fpr)
    assert point.specificity == pytest.approx(1 - fpr)
    assert point.precision == pytest.approx(precision)
    assert point.sensitivity >= target


def test_operating_point_counts_a_negative_tied_with_the_threshold() -> None:
    scores = HAND_SCORES.copy()
    scores[-1] = 0.2  # the lowest negative now ties with the 90 % threshold
    point = operating_point(HAND_LABELS, scores, 0.9)
    assert point.threshold == pytest.approx(0.2)
    assert point.false_positive_rate == pytest.approx(5 / 6)


def test_operating_point_reaches_an_exact_sensitivity_despite_rounding() -> None:
    # 0.95 * 20 is not exactly 19 in floating point; 19 of 20 positives must count as 95 %
    labels = np.array([1] * 20 + [0] * 5)
    scores = np.concatenate([np.linspace(1.0, 0.05, 20), [0.5, 0.4, 0.3, 0.02, 0.01]])
    point = operating_point(labels, scores, 0.95)
    assert point.threshold == pytest.approx(scores[18])
    assert point.sensitivity == pytest.approx(0.95)


def test_brier_and_ece_hand_values() -> None:
    assert brier_score([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]) == pytest.approx(0.115)
    # bins [0, .1): gap 0.05; [.1, .2): |1 - 0.3| = 0.7; [.9, 1]: |2 - 1.95| = 0.05 (1.0 in the last bin)
    labels, probabilities = [0, 1, 0, 1, 1], [0.05, 0.15, 0.15, 0.95, 1.0]
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.8 / 5)
    bins = calibration_bins(labels, probabilities)
    assert bins["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins["fraction_positive"][1] == pytest.approx(0.5)
    assert math.isnan(bins["mean_probability"][5])


def test_weighted_resample_equals_metrics_of_the_duplicated_nodules() -> None:
    labels, scores, patients = random_case(4, n=120)
    counts = patient_resample_counts(patients, 5, seed=3)
    samples, valid = bootstrap_binary_metrics(labels, scores, counts)
    assert valid.all()
    for row in range(5):
        y, s = np.repeat(labels, counts[row]), np.repeat(scores, counts[row])
        expected = evaluate_binary(y, s).estimates
        for name in binary_metric_names():
            assert samples[name][row] == pytest.approx(expected[name].value, abs=1e-12), name


def test_patient_resampling_keeps_each_patients_nodules_together() -> None:
    patients = np.array(["a", "a", "a", "b", "c", "c", "d", "e", "e", "e"])
    counts = patient_resample_counts(patients, 400, seed=0)
    assert counts.shape == (400, 10)
    for patient in np.unique(patients):
        block = counts[:, patients == patient]
        assert np.all(block == block[:, :1])  # the same multiplicity for every nodule of a patient
    first = np.array([counts[:, np.flatnonzero(patients == p)[0]] for p in np.unique(patients)]).T
    assert np.all(first.sum(axis=1) == 5)  # each resample draws as many patients as there are
    assert (first == 0).any() and (first >= 2).any()


def test_bootstrap_is_deterministic_per_seed_and_contains_the_point_estimate() -> None:
    labels, scores, patients = random_case(5)
    first = evaluate_binary(labels, scores, patient_resample_counts(patients, 1000, seed=7))
    again = evaluate_binary(labels, scores, patient_resample_counts(patients, 1000, seed=7))
    other = evaluate_binary(labels, scores, patient_resample_counts(patients, 1000, seed=8))
    assert first == again
    assert first.estimates["auroc"] != other.estimates["auroc"]
    for name in ("auroc", "auprc", "brier", "fpr_at_sens90", "precision_at_sens95"):
        estimate = first.estimates[name]
        assert estimate.low < estimate.value < estimate.high, name
    assert first.n_resamples == 1000 and first.n_skipped == 0


def test_resamples_with_one_class_are_skipped_and_counted() -> None:
    # all positives belong to one patient: every resample that misses it has no positive
    patients = np.array(["p0", "p0", "p1", "p2", "p3", "p4", "p5"])
    labels = np.array([1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.4, 0.5, 0.3, 0.2, 0.6, 0.1])
    counts = patient_resample_counts(patients, 300, seed=1)
    evaluation = evaluate_binary(labels, scores, counts)
    assert evaluation.n_skipped == int((counts[:, 0] == 0).sum()) > 0
    assert np.isfinite(evaluation.estimates["auroc"].low)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fast_delong_matches_the_structural_component_definition(seed: int) -> None:
    labels, first, _ = random_case(seed, n=150)
    rng = np.random.default_rng(seed + 10)
    scores = np.vstack(
        [first, np.round(np.clip(first + rng.normal(0, 0.2, first.size), 0, 1), 1), rng.uniform(size=150)]
    )
    aucs, covariance = delong_covariance(labels, scores)
    slow_aucs, slow_covariance = slow_delong(labels, scores)
    np.testing.assert_allclose(aucs, slow_aucs, atol=1e-12)
    np.testing.assert_allclose(covariance, slow_covariance, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(labels, scores[0]))
    result = delong_test(labels, scores[0], scores[2])
    variance = slow_covariance[0, 0] + slow_covariance[2, 2] - 2 * slow_covariance[0, 2]
    z = (slow_aucs[0] - slow_aucs[2]) / math.sqrt(variance)
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert result.difference == pytest.approx(slow_aucs[0] - slow_aucs[2])


def test_delong_known_values() -> None:
    labels, scores, _ = random_case(9)
    same = delong_test(labels, scores, scores)
    assert (same.difference, same.z, same.p_value) == (0.0, 0.0, 1.0)
    # a predictor far better than chance on 300 nodules: a tiny p-value, in the right direction
    noise = np.random.default_rng(0).uniform(size=scores.size)
    better = delong_test(labels, scores, noise)
    assert better.z > 3 and better.p_value < 1e-3
    worse = delong_test(labels, noise, scores)
    assert worse.z == pytest.approx(-better.z) and worse.p_value == pytest.approx(better.p_value)


def test_semantic_feature_weighted_auroc_is_sklearns_weighted_one_vs_rest() -> None:
    rng = np.random.default_rng(2)
    values = ["Round", "Ovoid", "Polygonal", "Complex/Irregular"]
    truth = rng.choice(["Round", "Ovoid", "Complex/Irregular", ""], 200, p=[0.4, 0.3, 0.2, 0.1])
    probabilities = rng.dirichlet(np.ones(4), 200)
    evaluation = evaluate_semantic_feature(list(truth), probabilities, values)
    assert evaluation is not None
    assert evaluation.values == ("Round", "Ovoid", "Complex/Irregular")  # Polygonal never annotated
    known = truth != ""
    observed = probabilities[known][:, [0, 1, 3]]
    observed = observed / observed.sum(axis=1, keepdims=True)
    index = np.array([evaluation.values.index(v) for v in truth[known]])
    expected = roc_auc_score(index, observed, multi_class="ovr", average="weighted", labels=[0, 1, 2])
    assert evaluation.weighted.value == pytest.approx(expected)
    assert evaluation.n_annotated == int(known.sum())
    assert sum(evaluation.positives) == evaluation.n_annotated


def test_semantic_feature_binary_and_degenerate_cases() -> None:
    truth = ["Present", "Absent", "Absent", None, "Present", "Absent"]
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.1, 0.9]])
    evaluation = evaluate_semantic_feature(truth, probabilities, ["Present", "Absent"])
    assert evaluation.aurocs[0] == evaluation.aurocs[1] == evaluation.weighted.value
    assert evaluation.weighted.value == pytest.approx(
        roc_auc_score([1, 0, 0, 1, 0], [0.8, 0.3, 0.6, 0.7, 0.1])
    )
    assert (
        evaluate_semantic_feature(["Absent", None, "Absent"], probabilities[:3], ["Present", "Absent"])
        is None
    )
    with pytest.raises(ValueError, match="not among"):
        evaluate_semantic_feature(["Maybe", "Absent", "Present"], probabilities[:3], ["Present", "Absent"])


def test_semantic_bootstrap_interval_brackets_the_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    truth = rng.choice(["Smooth", "Lobulated", "Spiculated/Serrated"], 300)
    probabilities = rng.dirichlet(np.ones(3), 300)
    probabilities[truth == "Smooth", 0] += 0.5
    patients = np.arange(300) // 2
    counts = patient_resample_counts(patients, 500, seed=0)
    values = ["Smooth", "Lobulated", "Spiculated/Serrated"]
    first = evaluate_semantic_feature(list(truth), probabilities, values, counts)
    again = evaluate_semantic_feature(list(truth), probabilities, values, counts)
    assert first == again
    assert first.weighted.low < first.weighted.value < first.weighted.high
    assert first.n_skipped == 0
