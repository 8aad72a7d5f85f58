"""The two baselines of the evaluation, fitted per fold on that fold's training patients.

- ``baseline_size``: logistic regression on ``mean_diameter``; a missing diameter gets the fold's
  training median (the report notes how many).
- ``baseline_semantic``: logistic regression on the one-hot radiologist semantic features (a missing
  value being its own category) plus the diameter.

Features standardised, L2 penalty C = 1 (scikit-learn, imported when fitting).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

from scripts.cohort import NoduleRecord
from scripts.errors import UserInputError
from scripts.split_folder import SplitPlan
from scripts.vocabulary import FEATURES

logger = logging.getLogger(__name__)

SIZE_COLUMN = "mean_diameter"
BASELINE_SIZE = "baseline_size"
BASELINE_SEMANTIC = "baseline_semantic"
BASELINES = (BASELINE_SIZE, BASELINE_SEMANTIC)


def _diameters(records: Sequence[NoduleRecord]) -> np.ndarray:
    return np.array(
        [np.nan if r.sizes.get(SIZE_COLUMN) is None else float(r.sizes[SIZE_COLUMN]) for r in records]
    )


def _semantic_one_hot(records: Sequence[NoduleRecord]) -> np.ndarray:
    """One column per (feature, value) plus one per feature for "not annotated"."""
    columns = []
    for feature in FEATURES:
        for value in [*(v.name for v in feature.values), None]:
            columns.append([float(r.semantics.get(feature.column) == value) for r in records])
    return np.array(columns).T


def fit_baselines(
    all_records: list[NoduleRecord], records: list[NoduleRecord], plan: SplitPlan
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Fit both baselines on each fold's training patients and predict the evaluated nodules.

    Args:
        all_records: the whole cohort (training data).
        records: the nodules to predict.
        plan: folds and their patients.

    Returns:
        baseline name -> ``(K, N)`` probabilities (rows in ``plan.folds`` order), and notes for the
        report (imputation counts).

    Raises:
        UserInputError: a fold's training nodules hold one class, or none has a diameter.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    notes: list[str] = []
    eval_diameter = _diameters(records)
    eval_semantic = _semantic_one_hot(records)
    predictions = {name: np.zeros((len(plan.folds), len(records))) for name in BASELINES}
    for row, fold in enumerate(plan.folds):
        train = [r for r in all_records if r.pid in plan.train[fold]]
        labels = np.array([r.label for r in train])
        counts = Counter(labels.tolist())
        if len(counts) < 2:
            raise UserInputError(
                f"fold {fold}: the {len(train)} training nodule(s) are all "
                f"{'malignant' if 1 in counts else 'benign'}: cannot fit the baselines; rebuild the split "
                "so that every fold's training set has both classes"
            )
        diameter = _diameters(train)
        known = np.isfinite(diameter)
        if not known.any():
            raise UserInputError(
                f"fold {fold}: no training nodule has a '{SIZE_COLUMN}' value: cannot fit the size baseline"
            )
        median = float(np.median(diameter[known]))
        missing_eval = int(np.isnan(eval_diameter).sum())
        if (~known).any() or missing_eval:
            note = (
                f"fold {fold}: '{SIZE_COLUMN}' missing for {int((~known).sum())} training and {missing_eval} "
                f"evaluated nodule(s), imputed with the training median {median:.2f} mm"
            )
            logger.info(note)
            notes.append(note)
        train_size = np.where(known, diameter, median)[:, None]
        eval_size = np.where(np.isnan(eval_diameter), median, eval_diameter)[:, None]
        designs = {
            BASELINE_SIZE: (train_size, eval_size),
            BASELINE_SEMANTIC: (
                np.hstack([train_size, _semantic_one_hot(train)]),
                np.hstack([eval_size, eval_semantic]),
            ),
        }
        for name, (train_x, eval_x) in designs.items():
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
            model.fit(train_x, labels)
            predictions[name][row] = model.predict_proba(eval_x)[:, 1]
    return predictions, notes
