"""Beta calibration: the map, its fit (against betacal), the JSON file and the fold ensemble."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from scripts.calibration import (
    BetaCalibration,
    ensemble_probability,
    fit_beta_calibration,
    load_calibration,
    save_calibration,
)
from scripts.errors import UserInputError

GRID = np.linspace(0.0, 1.0, 201)


def sample(calibration: BetaCalibration, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform in (0, 1) and labels drawn with the probability the known map gives."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.001, 0.999, n)
    labels = (rng.uniform(size=n) < calibration(scores)).astype(int)
    return scores, labels


def betacal_map(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The betacal package's fitted map on GRID (it silences warnings process-wide: contain that)."""
    from betacal import BetaCalibration as ReferenceBetaCalibration

    with warnings.catch_warnings():
        reference = ReferenceBetaCalibration(parameters="abm").fit(scores, labels)
    return reference.predict(GRID)


def test_the_map_is_kulls_formula() -> None:
    calibration = BetaCalibration(a=1.3, b=0.6, c=-0.4)
    s = np.array([0.05, 0.3, 0.5, 0.9])
    expected = 1.0 / (1.0 + 1.0 / (np.exp(-0.4) * s**1.3 / (1.0 - s) ** 0.6))
    np.testing.assert_allclose(calibration(s), expected, rtol=1e-12)


def test_identity_parameters_give_the_identity_and_extremes_stay_finite() -> None:
    identity = BetaCalibration(a=1.0, b=1.0, c=0.0)
    np.testing.assert_allclose(identity(GRID[1:-1]), GRID[1:-1], atol=1e-12)
    ends = identity(np.array([0.0, 1.0]))
    assert np.all(np.isfinite(ends)) and ends[0] < 1e-12 and ends[1] > 1 - 1e-12


@pytest.mark.parametrize(("a", "b", "c"), [(1.5, 0.7, 0.3), (0.5, 2.0, -1.0), (2.5, 2.5, 0.8)])
def test_fit_recovers_known_parameters(a: float, b: float, c: float) -> None:
    truth = BetaCalibration(a, b, c)
    fitted = fit_beta_calibration(*sample(truth, 200_000, seed=1))
    # a and b are strongly correlated when both are large: the MLE of (2.5, 2.5, 0.8) is ~0.07 away
    np.testing.assert_allclose([fitted.a, fitted.b, fitted.c], [a, b, c], atol=0.1)
    assert np.abs(fitted(GRID) - truth(GRID)).max() < 0.01


@pytest.mark.parametrize(
    "truth",
    [
        BetaCalibration(1.5, 0.7, 0.3),
        BetaCalibration(0.4, 1.8, -0.5),
        BetaCalibration(3.0, 0.1, 0.0),  # b small: the joint fit may give b < 0 and refit on ln s
        BetaCalibration(0.1, 3.0, 0.0),  # a small: a < 0 and refit on -ln(1 - s)
    ],
)
@pytest.mark.parametrize("n", [60, 5000])
def test_fit_agrees_with_betacal(truth: BetaCalibration, n: int) -> None:
    scores, labels = sample(truth, n, seed=n)
    fitted = fit_beta_calibration(scores, labels)
    assert fitted.a >= 0 and fitted.b >= 0
    # betacal stops at scikit-learn's default tolerance; the maps agree to that precision
    np.testing.assert_allclose(fitted(GRID), betacal_map(scores, labels), atol=2e-3)


@pytest.mark.parametrize(
    ("truth", "zero"), [(BetaCalibration(-0.3, 1.5, 0.0), "a"), (BetaCalibration(1.5, -0.3, 0.0), "b")]
)
def test_fit_takes_the_one_term_refit_when_a_weight_is_negative(truth: BetaCalibration, zero: str) -> None:
    scores, labels = sample(truth, 20_000, seed=5)
    fitted = fit_beta_calibration(scores, labels)
    other = "b" if zero == "a" else "a"
    assert getattr(fitted, zero) == 0.0 and getattr(fitted, other) > 0
    np.testing.assert_allclose(fitted(GRID), betacal_map(scores, labels), atol=2e-3)


def test_a_fold_ranked_backwards_gets_a_constant_map(caplog: pytest.LogCaptureFixture) -> None:
    # decreasing truth: betacal would return a decreasing map; here the map stays non-decreasing
    scores, labels = sample(BetaCalibration(-1.0, -1.5, 0.0), 2000, seed=4)
    fitted = fit_beta_calibration(scores, labels, where="fold 2")
    assert (fitted.a, fitted.b) == (0.0, 0.0)
    np.testing.assert_allclose(fitted(GRID), labels.mean(), atol=1e-12)
    assert "fold 2" in caplog.text and "backwards" in caplog.text
    assert np.all(np.diff(betacal_map(scores, labels)) <= 0)


def test_fitted_map_is_monotonic_non_decreasing() -> None:
    fitted = fit_beta_calibration(*sample(BetaCalibration(0.3, 3.0, 1.0), 2000, seed=3))
    assert np.all(np.diff(fitted(GRID)) >= 0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [([1, 1, 1, 1, 1, 1], "0 benign"), ([0, 0, 0, 0, 0, 1], "1 malignant")],
)
def test_single_class_or_too_few_samples_name_the_fold(labels: list[int], message: str) -> None:
    with pytest.raises(UserInputError, match=rf"fold 3 \(validation\).*{message}"):
        fit_beta_calibration(np.linspace(0.1, 0.9, 6), np.array(labels), where="fold 3 (validation)")


@pytest.mark.parametrize(
    ("probabilities", "labels", "message"),
    [
        ([0.1, np.nan, 0.3, 0.4], [0, 1, 0, 1], "finite"),
        ([0.1, 1.2, 0.3, 0.4], [0, 1, 0, 1], r"\[0, 1\]"),
        ([0.1, 0.2, 0.3, 0.4], [0, 2, 0, 1], "0 or 1"),
        ([0.1, 0.2, 0.3], [0, 1, 0, 1], "3 probabilities but 4 labels"),
    ],
)
def test_bad_fit_input_is_a_user_error(probabilities: list, labels: list, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        fit_beta_calibration(np.array(probabilities), np.array(labels))


def test_json_round_trip(tmp_path: Path) -> None:
    calibrators = {0: BetaCalibration(1.0, 0.5, -0.25), 3: BetaCalibration(0.0, 2.0, 0.125)}
    path = save_calibration(tmp_path / "models" / "calibration.json", calibrators, {"cohort": "x.csv"})
    document = json.loads(path.read_text())
    assert document["method"] == "beta"
    assert document["folds"]["3"] == {"a": 0.0, "b": 2.0, "c": 0.125}
    assert document["provenance"] == {"cohort": "x.csv"}
    assert load_calibration(path) == calibrators
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"method": "platt", "folds": {"0": {"a": 1, "b": 1, "c": 0}}}', "only 'beta'"),
        ('{"method": "beta", "folds": {}}', "'folds' must map"),
        ('{"method": "beta", "folds": {"x": {"a": 1, "b": 1, "c": 0}}}', "'x' is not a fold number"),
        ('{"method": "beta", "folds": {"0": {"a": 1, "b": 1}}}', r"fold 0: missing parameter\(s\) c"),
        ('{"method": "beta", "folds": {"0": {"a": 1, "b": "1", "c": 0}}}', "'b' must be a finite number"),
        ('{"method": "beta", "folds": {"0": {"a": 1, "b": NaN, "c": 0}}}', "'b' must be a finite number"),
    ],
)
def test_bad_calibration_file_is_a_user_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(UserInputError, match=message):
        load_calibration(path)


def test_missing_calibration_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_calibration(tmp_path / "calibration.json")


def test_ensemble_calibrates_each_fold_then_averages() -> None:
    raw = np.array([[0.1, 0.6, 0.9], [0.2, 0.5, 0.7]])
    calibrators = {0: BetaCalibration(1.0, 1.0, 0.0), 1: BetaCalibration(2.0, 0.5, 1.0)}
    ensemble, per_fold, calibrated = ensemble_probability(raw, calibrators)
    np.testing.assert_allclose(ensemble, [0.15, 0.55, 0.8])
    np.testing.assert_allclose(per_fold[0], raw[0], atol=1e-12)
    np.testing.assert_allclose(per_fold[1], calibrators[1](raw[1]))
    np.testing.assert_allclose(calibrated, (raw[0] + calibrators[1](raw[1])) / 2)
    # not the calibration of the averaged probability
    assert not np.allclose(calibrated, calibrators[1](ensemble))


def test_ensemble_without_calibrators_and_with_fold_numbers() -> None:
    raw = np.array([[0.2, 0.4], [0.4, 0.8]])
    ensemble, per_fold, calibrated = ensemble_probability(raw)
    np.testing.assert_allclose(ensemble, [0.3, 0.6])
    assert per_fold is None and calibrated is None
    calibrators = {2: BetaCalibration(1.0, 1.0, 0.0), 4: BetaCalibration(1.0, 1.0, 0.0)}
    _, _, calibrated = ensemble_probability(raw, calibrators, folds=[2, 4])
    np.testing.assert_allclose(calibrated, [0.3, 0.6])
    with pytest.raises(UserInputError, match=r"no calibration map for fold\(s\) 1"):
        ensemble_probability(raw, calibrators, folds=[2, 1])
