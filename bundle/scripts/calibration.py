"""Per-fold beta calibration of the malignancy probability (Kull, Silva Filho and Flach, AISTATS 2017).

The three-parameter beta map is

    mu(s) = 1 / (1 + 1 / (exp(c) * s**a / (1 - s)**b)),   i.e.   logit mu(s) = c + a ln s - b ln(1 - s),

applied to the probability ``s`` clipped to ``[eps, 1 - eps]`` (``eps`` = float64 machine epsilon).
It is fitted as a logistic regression of the label on ``[ln s, -ln(1 - s)]``; ``a`` and ``b`` are kept
non-negative (so the map is monotonic non-decreasing) the way the ``betacal`` package does: when the
joint fit gives ``a < 0`` the fit is redone on ``-ln(1 - s)`` alone with ``a = 0``; when it gives
``b < 0``, on ``ln s`` alone with ``b = 0``. Two differences from ``betacal`` 1.1.0: the regression
is solved to a tight tolerance (betacal stops at scikit-learn's default, up to ~0.1 short of the
optimum in ``a``, ``b``, ``c``), and when that refit still gives a negative weight (the model ranks
the fold's nodules backwards), betacal returns the decreasing map while this module returns the
constant map at the prevalence and logs a warning. ``betacal`` is not
imported: it also switches off every Python warning of the process when it fits.

Each fold model gets its own map, fitted on that fold's validation set; at inference each fold's
probability goes through its fold's map and the calibrated probabilities are averaged
(:func:`ensemble_probability`). The maps live in ``models/calibration.json``::

    {"method": "beta", "folds": {"0": {"a": ..., "b": ..., "c": ...}, ...}, "provenance": {...}}

Applying a map needs numpy only (the deploy app); fitting imports scikit-learn when called.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scripts.atomic import write_text_atomically
from scripts.errors import UserInputError

__all__ = [
    "CALIBRATION_FILE",
    "METHOD",
    "MIN_SAMPLES_PER_CLASS",
    "BetaCalibration",
    "FoldCalibrators",
    "ensemble_probability",
    "fit_beta_calibration",
    "load_calibration",
    "save_calibration",
]

CALIBRATION_FILE = "calibration.json"
"""File name of the calibration maps inside a bundle's ``models/`` folder."""

METHOD = "beta"
"""The only calibration method this module writes and reads."""

MIN_SAMPLES_PER_CLASS = 2
"""Fewer benign or malignant nodules than this in a fold's validation set: no map is fitted."""

logger = logging.getLogger(__name__)

_EPS = float(np.finfo(np.float64).eps)
# betacal's effectively unpenalised logistic regression (C = 1e11), solved to a tighter tolerance than
# scikit-learn's default (which betacal uses and which can stop ~0.1 short of the optimum in a, b, c).
_INVERSE_PENALTY = 99999999999.0
_TOLERANCE = 1e-8


@dataclass(frozen=True)
class BetaCalibration:
    """A three-parameter beta calibration map.

    Attributes:
        a: weight of ``ln s`` (>= 0 when fitted here).
        b: weight of ``-ln(1 - s)`` (>= 0 when fitted here).
        c: intercept (log odds of the calibrated probability where ``s**a == (1 - s)**b``).
    """

    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"calibration parameter '{name}' must be a finite number, not {value!r}")

    def logit(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated log odds ``c + a ln s - b ln(1 - s)`` of ``probabilities`` (clipped to [eps, 1-eps])."""
        s = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0 - _EPS)
        return self.c + self.a * np.log(s) - self.b * np.log1p(-s)

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape as the input (float64).

        Args:
            probabilities: uncalibrated probabilities in [0, 1].

        Returns:
            ``mu(s)`` for every element.
        """
        # sigmoid via tanh: no overflow warning for large |logit|
        return 0.5 * (1.0 + np.tanh(0.5 * self.logit(probabilities)))

    def to_dict(self) -> dict[str, float]:
        """``{"a": .., "b": .., "c": ..}`` for JSON."""
        return {"a": float(self.a), "b": float(self.b), "c": float(self.c)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BetaCalibration:
        """The map of a ``{"a": .., "b": .., "c": ..}`` dict.

        Raises:
            ValueError: a key is missing or a value is not a finite number.
        """
        missing = [key for key in ("a", "b", "c") if key not in values]
        if missing:
            raise ValueError(f"missing parameter(s) {', '.join(missing)}")
        return cls(a=values["a"], b=values["b"], c=values["c"])


FoldCalibrators = Mapping[int, BetaCalibration]
"""Fold number -> that fold's calibration map."""


def _features(probabilities: np.ndarray) -> np.ndarray:
    s = np.clip(probabilities, _EPS, 1.0 - _EPS)
    return np.column_stack([np.log(s), -np.log1p(-s)])


def _logistic_fit(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.exceptions import ConvergenceWarning  # fitting only: keeps inference numpy-only
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=_INVERSE_PENALTY, tol=_TOLERANCE, max_iter=1000)
    with warnings.catch_warnings():
        # separable folds make the unpenalised optimum lie at infinity; the result is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def fit_beta_calibration(
    probabilities: np.ndarray, labels: np.ndarray, where: str = "the calibration set"
) -> BetaCalibration:
    """Fit a beta calibration map (a, b >= 0) by logistic regression on ``[ln s, -ln(1 - s)]``.

    Args:
        probabilities: ``(N,)`` uncalibrated probabilities of one fold model on its validation set.
        labels: ``(N,)`` 0/1 labels.
        where: names the data in error messages, e.g. ``"fold 3 (validation set)"``.

    Returns:
        the fitted map.

    Raises:
        UserInputError: shapes differ, values are not finite probabilities / 0-1 labels, or either
            class has fewer than :data:`MIN_SAMPLES_PER_CLASS` samples.
    """
    s = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise UserInputError(f"{where}: {s.size} probabilities but {y.size} labels")
    if not np.all(np.isfinite(s)) or np.any((s < 0) | (s > 1)):
        raise UserInputError(f"{where}: probabilities must be finite numbers in [0, 1]")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise UserInputError(f"{where}: labels must be 0 or 1")
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if min(positives, negatives) < MIN_SAMPLES_PER_CLASS:
        raise UserInputError(
            f"{where}: cannot fit a calibration map with {positives} malignant and {negatives} benign "
            f"nodule(s); each class needs at least {MIN_SAMPLES_PER_CLASS} (use larger folds or skip "
            "calibration)"
        )
    features = _features(s)
    coefficients, intercept = _logistic_fit(features, y)
    a, b = coefficients
    if a < 0:  # betacal's rule: drop the offending term and refit the other one alone
        (b,), intercept = _logistic_fit(features[:, 1:], y)
        a = 0.0
    elif b < 0:
        (a,), intercept = _logistic_fit(features[:, :1], y)
        b = 0.0
    if a < 0 or b < 0:
        # betacal would return this decreasing map; a map that reverses the fold's ranking must not
        # enter an ensemble: fall back to the constant map at the prevalence
        logger.warning(
            "%s: the model ranks these nodules backwards (fitted map decreasing); using a constant "
            "calibration map (the prevalence %.3f)",
            where,
            positives / y.size,
        )
        a, b, intercept = 0.0, 0.0, math.log(positives / negatives)
    return BetaCalibration(a=float(a), b=float(b), c=float(intercept))


def save_calibration(
    path: str | Path, calibrators: FoldCalibrators, provenance: Mapping[str, Any] | None = None
) -> Path:
    """Write the per-fold maps as JSON, atomically (temporary file in the same folder, then rename).

    Args:
        path: usually ``BUNDLE/models/calibration.json``.
        calibrators: fold -> map (at least one).
        provenance: JSON-serialisable facts about the fit (cohort, split folder, date, ...); files are
            named by name, hash or a relative path, never by an absolute path of this machine (the
            file ships with the bundle).

    Returns:
        the written path.

    Raises:
        ValueError: no maps, or a provenance value is an absolute path.
    """
    if not calibrators:
        raise ValueError("no calibration maps to save")
    absolute = _absolute_paths(provenance or {})
    if absolute:
        raise ValueError(f"calibration provenance holds absolute path(s) {', '.join(absolute)}; record names")
    document = {
        "method": METHOD,
        "folds": {str(int(fold)): calibrators[fold].to_dict() for fold in sorted(calibrators)},
        "provenance": dict(provenance or {}),
    }
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"  # fails before anything is written
    return write_text_atomically(path, text)


def _absolute_paths(value: Any) -> list[str]:
    """Every string in ``value`` (nested dicts and lists too) that is an absolute path."""
    if isinstance(value, Mapping):
        return [path for item in value.values() for path in _absolute_paths(item)]
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in _absolute_paths(item)]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        return [str(value)]
    return []


def load_calibration(path: str | Path) -> dict[int, BetaCalibration]:
    """Read the per-fold maps written by :func:`save_calibration`.

    Args:
        path: the calibration JSON.

    Returns:
        fold -> map, sorted by fold.

    Raises:
        UserInputError: the file is missing, not JSON, not a beta calibration, or a fold entry is bad.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"calibration file '{path}' does not exist")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"calibration file '{path}' is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise UserInputError(f"calibration file '{path}': expected a JSON object with 'method' and 'folds'")
    if document.get("method") != METHOD:
        raise UserInputError(
            f"calibration file '{path}': method is {document.get('method')!r}; only '{METHOD}' is supported"
        )
    folds = document.get("folds")
    if not isinstance(folds, dict) or not folds:
        raise UserInputError(
            f"calibration file '{path}': 'folds' must map fold numbers to {{'a', 'b', 'c'}}; got {folds!r}"
        )
    calibrators: dict[int, BetaCalibration] = {}
    for key, values in folds.items():
        try:
            fold = int(key)
        except ValueError:
            raise UserInputError(
                f"calibration file '{path}': fold key {key!r} is not a fold number"
            ) from None
        if not isinstance(values, dict):
            raise UserInputError(f"calibration file '{path}': fold {key}: expected {{'a', 'b', 'c'}}")
        try:
            calibrators[fold] = BetaCalibration.from_dict(values)
        except ValueError as error:
            raise UserInputError(f"calibration file '{path}': fold {key}: {error}") from error
    return dict(sorted(calibrators.items()))


def ensemble_probability(
    raw: np.ndarray,
    calibrators: FoldCalibrators | None = None,
    folds: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Fold ensemble of the malignancy probability, raw and calibrated.

    Args:
        raw: ``(n_folds, N)`` probability of each fold model for N nodules.
        calibrators: fold -> map, or ``None`` (no calibration).
        folds: the fold number of each row of ``raw`` (default ``0 .. n_folds - 1``).

    Returns:
        ``(ensemble, calibrated_per_fold, calibrated_ensemble)``: the mean of the raw probabilities
        ``(N,)``; each fold's map applied to its own row ``(n_folds, N)``; their mean ``(N,)``. The
        last two are ``None`` without calibrators.

    Raises:
        UserInputError: a fold of ``raw`` has no calibration map.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] == 0:
        raise ValueError(f"raw probabilities must be (n_folds >= 1, N), got shape {raw.shape}")
    folds = list(range(raw.shape[0])) if folds is None else [int(f) for f in folds]
    if len(folds) != raw.shape[0]:
        raise ValueError(f"{raw.shape[0]} rows of probabilities but {len(folds)} fold numbers")
    ensemble = raw.mean(axis=0)
    if calibrators is None:
        return ensemble, None, None
    missing = [fold for fold in folds if fold not in calibrators]
    if missing:
        raise UserInputError(
            f"no calibration map for fold(s) {', '.join(map(str, missing))}; the calibration file has "
            f"fold(s) {', '.join(map(str, sorted(calibrators)))}: refit calibration for these models"
        )
    calibrated = np.stack([calibrators[fold](row) for fold, row in zip(folds, raw, strict=True)])
    return ensemble, calibrated, calibrated.mean(axis=0)
