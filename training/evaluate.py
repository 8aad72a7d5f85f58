"""Evaluate a bundle's fold models on a cohort against two baselines: ``python -m training.evaluate``.

::

    python -m training.evaluate --bundle BUNDLE --cohort cohort.csv --split-dir splits \\
        [--subset test|val|all] --out eval_dir [--bootstrap 1000] [--seed 0]
    python -m training.evaluate --predictions predictions.csv --cohort cohort.csv --split-dir splits --out DIR

Protocol (the same for the model and the baselines):

- Folds: every ``BUNDLE/models/fold_<k>/model.ts`` (or a single ``BUNDLE/models/model.ts``, taken as
  fold 0); the split folder must hold ``fold_<k>/train_pid.csv`` and ``val_pid.csv`` for each (the
  layout :mod:`training.splits` writes), and optionally ``test_pid.csv``.
- A validation patient of fold k is predicted by fold k alone (out of fold); a held-out test patient
  by the mean over the folds. ``--subset val`` evaluates the out-of-fold predictions, ``test`` the
  held-out patients, ``all`` both together.
- Model: the image head's probability per fold (``raw_k``) and their mean (``ensemble``); with
  ``BUNDLE/models/calibration.json``, each fold's beta map applied to its own probability
  (``calibrated_k``) and their mean (``calibrated_ensemble``). The columns ``model`` and
  ``model_calibrated`` hold what is evaluated (out of fold or mean, as above). The calibration maps
  were fitted on the validation sets, so calibrated out-of-fold numbers are optimistic.
- Baselines, fitted per fold on that fold's training patients: ``baseline_size`` (logistic
  regression on ``mean_diameter``; a missing diameter gets the training median, and the log says how
  many) and ``baseline_semantic`` (logistic regression on the one-hot radiologist features, a missing
  value being its own category, plus the diameter); features standardised, L2 penalty C = 1.
- Metrics (:mod:`training.metrics`): AUROC, AUPRC, FPR / precision / specificity at 90 % and 95 %
  sensitivity, Brier score, ECE, each with a patient-level bootstrap percentile CI; DeLong's paired
  test of every predictor against each baseline; zero-shot semantic AUROC per feature.

Output folder (written in a temporary sibling, renamed into place at the end): ``predictions.csv``,
``metrics.csv``, ``metrics.json``, ``semantic_auroc.csv``, ``roc.png``, ``precision_recall.png``,
``calibration.png``, ``semantic_auroc.png`` (when a feature can be scored) and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from scripts.calibration import CALIBRATION_FILE, ensemble_probability, load_calibration
from scripts.cohort import NoduleRecord, read_cohort, read_pids, read_split
from scripts.errors import UserInputError, exit_on_user_error
from scripts.export import exported_models
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES
from training.metrics import (
    N_CALIBRATION_BINS,
    BinaryEvaluation,
    DeLongResult,
    SemanticEvaluation,
    binary_metric_names,
    calibration_bins,
    delong_test,
    evaluate_binary,
    evaluate_semantic_feature,
    patient_resample_counts,
)
from training.staging import new_output_folder

logger = logging.getLogger(__name__)

SUBSETS = ("test", "val", "all")
SIZE_COLUMN = "mean_diameter"
MODEL = "model"
MODEL_CALIBRATED = "model_calibrated"
BASELINE_SIZE = "baseline_size"
BASELINE_SEMANTIC = "baseline_semantic"
BASELINES = (BASELINE_SIZE, BASELINE_SEMANTIC)
PREDICTOR_TITLES = {
    MODEL: "Model (fold ensemble)",
    MODEL_CALIBRATED: "Model, beta-calibrated",
    BASELINE_SIZE: "Baseline: size (mean diameter)",
    BASELINE_SEMANTIC: "Baseline: radiologist semantic features + size",
}
_RAW = re.compile(r"^raw_(\d+)$")
_CALIBRATED = re.compile(r"^calibrated_(\d+)$")
_FOLD_DIR = re.compile(r"^fold_(\d+)$")
_LISTED = 10


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in list(items)[:_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _LISTED else "")


# --------------------------------------------------------------------------------------------------
# bundle and split
# --------------------------------------------------------------------------------------------------


def bundle_identity(bundle: Path | None) -> dict[str, str]:
    """Name and version from ``BUNDLE/configs/metadata.json`` ("unknown" when unreadable)."""
    if bundle is None:
        return {"name": "(none: predictions file)", "version": ""}
    path = Path(bundle) / "configs" / "metadata.json"
    try:
        metadata = json.loads(path.read_text())
        return {
            "name": str(metadata.get("name", "unknown")),
            "version": str(metadata.get("version", "unknown")),
        }
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is missing or unreadable: bundle name and version unknown", path)
        return {"name": "unknown", "version": "unknown"}


@dataclass(frozen=True)
class SplitPlan:
    """Patient ids of the evaluated folds' train and validation sets, and of the test set."""

    folds: tuple[int, ...]
    train: dict[int, frozenset[str]]
    val: dict[int, frozenset[str]]
    test: frozenset[str]

    def heldout_fold(self, pid: str) -> int:
        """The evaluated fold whose validation set holds ``pid``; -1 when none does."""
        for fold in self.folds:
            if pid in self.val[fold]:
                return fold
        return -1


def read_split_plan(split_dir: Path, folds: Sequence[int], cohort_pids: set[str]) -> SplitPlan:
    """Read and cross-check the split folder against the folds and the cohort.

    Raises:
        UserInputError: a fold folder is missing, a patient is in two validation sets or in the test
            set and a fold, the split lists patients the cohort lacks, or a cohort patient is in no
            split file.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserInputError(f"split folder '{split_dir}' does not exist")
    present = sorted(
        int(m.group(1)) for p in split_dir.iterdir() if p.is_dir() and (m := _FOLD_DIR.match(p.name))
    )
    missing = [fold for fold in folds if fold not in present]
    if missing:
        raise UserInputError(
            f"split folder '{split_dir}' has no fold_{missing[0]}/ (the models are of fold(s) "
            f"{_listing(list(folds))}; the split has {_listing(present) or 'no fold folder'})"
        )
    train: dict[int, frozenset[str]] = {}
    val: dict[int, frozenset[str]] = {}
    for fold in present:
        fold_train, fold_val = read_split(split_dir, fold)
        train[fold], val[fold] = frozenset(fold_train), frozenset(fold_val)
    test_file = split_dir / "test_pid.csv"
    test = frozenset(read_pids(test_file)) if test_file.is_file() else frozenset()
    seen: dict[str, int] = {}
    for fold in present:
        for pid in sorted(val[fold]):
            if pid in seen:
                raise UserInputError(
                    f"split '{split_dir}': patient {pid} is in the validation sets of fold_{seen[pid]} and "
                    f"fold_{fold}; a patient must be held out by one fold only (rebuild the split)"
                )
            seen[pid] = fold
    in_folds = set().union(*train.values(), *val.values())
    leaked = sorted(test & in_folds)
    if leaked:
        raise UserInputError(
            f"split '{split_dir}': {len(leaked)} test patient(s) also in a fold's train/val set: "
            f"{_listing(leaked)}"
        )
    listed = in_folds | test
    unknown = sorted(listed - cohort_pids)
    if unknown:
        raise UserInputError(
            f"split '{split_dir}' lists {len(unknown)} patient(s) absent from the cohort CSV: "
            f"{_listing(unknown)}; is it the split of this cohort?"
        )
    unsplit = sorted(cohort_pids - listed)
    if unsplit:
        raise UserInputError(
            f"{len(unsplit)} patient(s) of the cohort CSV are in no file of the split '{split_dir}': "
            f"{_listing(unsplit)}; is it the split of this cohort?"
        )
    return SplitPlan(
        folds=tuple(folds),
        train={fold: train[fold] for fold in folds},
        val={fold: val[fold] for fold in folds},
        test=test,
    )


def select_subset(
    records: list[NoduleRecord], plan: SplitPlan, subset: str
) -> tuple[list[NoduleRecord], np.ndarray]:
    """The nodules of ``subset`` and, per nodule, the fold holding it out (-1 for test patients).

    Raises:
        UserInputError: the subset is empty (e.g. ``test`` without ``test_pid.csv``).
    """
    heldout = {pid: plan.heldout_fold(pid) for pid in {r.pid for r in records}}
    if subset == "test":
        chosen = [r for r in records if r.pid in plan.test]
    elif subset == "val":
        chosen = [r for r in records if heldout[r.pid] >= 0]
    else:
        chosen = [r for r in records if r.pid in plan.test or heldout[r.pid] >= 0]
        skipped = {r.pid for r in records} - {r.pid for r in chosen}
        if skipped:
            logger.warning(
                "%d patient(s) are held out by no evaluated fold and are not test patients: not evaluated",
                len(skipped),
            )
    if not chosen:
        hint = "the split has no test_pid.csv; use --subset val" if subset == "test" and not plan.test else ""
        raise UserInputError(
            f"subset '{subset}' selects no nodule of the cohort{': ' + hint if hint else ''}"
        )
    return chosen, np.array([-1 if r.pid in plan.test else heldout[r.pid] for r in chosen])


def protocol_prediction(per_fold: np.ndarray, folds: Sequence[int], heldout: np.ndarray) -> np.ndarray:
    """Out-of-fold prediction for validation nodules, mean over folds for held-out test nodules.

    Args:
        per_fold: ``(K, N)`` prediction of each fold.
        folds: fold number of each row.
        heldout: ``(N,)`` fold holding each nodule out, -1 for test nodules.

    Returns:
        ``(N,)`` the evaluated prediction.
    """
    prediction = per_fold.mean(axis=0)
    for row, fold in enumerate(folds):
        own = heldout == fold
        prediction[own] = per_fold[row, own]
    return prediction


# --------------------------------------------------------------------------------------------------
# model outputs: running the exported predictors, or reading a predictions file
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelOutputs:
    """Per-fold probabilities of the selected nodules.

    Attributes:
        folds: fold number of each row of ``raw``.
        raw: ``(K, N)`` malignancy probability of each fold model.
        calibrated: ``(K, N)`` calibrated probabilities, or ``None``.
        calibrated_mean: ``(N,)`` calibrated ensemble when only it is known (predictions files).
        semantic: ``<feature>=<value>`` -> ``(N,)`` zero-shot probability (mean over folds).
    """

    folds: tuple[int, ...]
    raw: np.ndarray
    calibrated: np.ndarray | None = None
    calibrated_mean: np.ndarray | None = None
    semantic: dict[str, np.ndarray] = field(default_factory=dict)


def predict_with_models(
    records: list[NoduleRecord], model_paths: dict[int, Path], device: str, batch_size: int = 8
) -> ModelOutputs:
    """Run every fold predictor on the nodules; each CT is loaded once and its nodules batched.

    Args:
        records: the nodules to predict.
        model_paths: fold -> ``model.ts``.
        device: torch device.
        batch_size: nodules per forward pass.

    Returns:
        the raw probabilities and the fold-mean semantic probabilities.
    """
    import torch

    from scripts.export import load_fold_predictors
    from scripts.transforms import LoadCT, nine_planes_for_seeds

    folds = load_fold_predictors(model_paths, device)
    predictors = folds.modules
    names = [f"{c['feature']}={c['value']}" for c in folds.layout.get("columns", [])]
    raw = np.zeros((len(predictors), len(records)))
    semantic = np.zeros((len(records), len(names)))
    by_image: dict[Path, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_image[record.image_path].append(index)
    loader = LoadCT()
    with torch.no_grad():
        for image_path, indices in tqdm(by_image.items(), desc="inference", unit="CT"):
            volume = loader(image_path)
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                planes = nine_planes_for_seeds(
                    volume,
                    [records[i].seed_lps for i in batch],
                    pid=records[batch[0]].pid,
                    nodule_ids=[records[i].nodule_id for i in batch],
                ).to(device)
                for row, module in enumerate(predictors):
                    output = module(planes)
                    raw[row, batch] = output["malignancy"].float().cpu().numpy()
                    semantic[batch] += output["semantic"].float().cpu().numpy() / len(predictors)
    return ModelOutputs(
        folds=tuple(model_paths),
        raw=raw,
        semantic={name: semantic[:, j] for j, name in enumerate(names)},
    )


def _semantic_column(name: str) -> bool:
    feature, _, value = name.partition("=")
    return feature in FEATURE_BY_COLUMN and value in {v.name for v in FEATURE_BY_COLUMN[feature].values}


def read_predictions(
    path: Path, records: list[NoduleRecord], all_records: list[NoduleRecord]
) -> ModelOutputs:
    """Model outputs of an existing predictions file (``raw_k``, optional ``calibrated_*``, semantic).

    Args:
        path: CSV with ``pid``, ``nodule_id``, ``raw_<k>`` per fold, optionally ``calibrated_<k>`` /
            ``calibrated_ensemble``, ``malignant`` and ``<feature>=<value>`` columns.
        records: the nodules to evaluate, in output order.
        all_records: the whole cohort (to tell rows of other subsets from unknown rows).

    Raises:
        UserInputError: unreadable file, missing columns, NaN or out-of-range probabilities (the
            message names the column and lines), duplicate or unknown nodules, labels that disagree
            with the cohort, or nodules of the subset that the file lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"predictions file '{path}' does not exist")
    try:
        table = pd.read_csv(path, dtype={"pid": str, "nodule_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not a readable CSV file: {error}") from error
    table.columns = [str(c).strip() for c in table.columns]
    name = path.name
    missing = [c for c in ("pid", "nodule_id") if c not in table.columns]
    raw_columns = {int(m.group(1)): c for c in table.columns if (m := _RAW.match(c))}
    if missing or not raw_columns:
        needed = missing + ([] if raw_columns else ["raw_<k> (one per fold)"])
        raise UserInputError(
            f"{name}: missing column(s) {', '.join(needed)}; the header has {', '.join(table.columns)}"
        )
    table["pid"] = table["pid"].astype(str).str.strip()
    table["nodule_id"] = table["nodule_id"].astype(str).str.strip()
    calibrated_columns = {int(m.group(1)): c for c in table.columns if (m := _CALIBRATED.match(c))}
    probability_columns = [
        *raw_columns.values(),
        *calibrated_columns.values(),
        *[c for c in ("calibrated_ensemble",) if c in table.columns],
        *[c for c in table.columns if _semantic_column(c)],
    ]
    for column in probability_columns:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() | ~values.between(0.0, 1.0).to_numpy())
        if bad.size:
            lines = [int(i) + 2 for i in bad]
            raise UserInputError(
                f"{name}: column '{column}' has {bad.size} missing (NaN), non-numeric or out-of-[0, 1] "
                f"value(s) on line(s) {_listing(lines)}"
            )
        table[column] = values.astype(np.float64)
    keys = list(zip(table["pid"], table["nodule_id"], strict=True))
    duplicated = table.duplicated(["pid", "nodule_id"], keep="first").to_numpy()
    if duplicated.any():
        lines = [int(i) + 2 for i in np.flatnonzero(duplicated)]
        raise UserInputError(f"{name}: duplicate (pid, nodule_id) on line(s) {_listing(lines)}")
    cohort = {(r.pid, r.nodule_id): r for r in all_records}
    unknown = [line + 2 for line, key in enumerate(keys) if key not in cohort]
    if unknown:
        raise UserInputError(
            f"{name}: {len(unknown)} row(s) name a nodule (pid, nodule_id) absent from the cohort CSV, "
            f"line(s) {_listing(unknown)}"
        )
    if "malignant" in table.columns:
        given = pd.to_numeric(table["malignant"], errors="coerce").to_numpy()
        expected = np.array([cohort[key].label for key in keys], dtype=np.float64)
        wrong = [int(i) + 2 for i in np.flatnonzero(~np.isclose(given, expected))]
        if wrong:
            raise UserInputError(
                f"{name}: column 'malignant' disagrees with the cohort CSV on line(s) {_listing(wrong)}"
            )
    row_of = {key: i for i, key in enumerate(keys)}
    absent = [f"{r.pid}/{r.nodule_id}" for r in records if (r.pid, r.nodule_id) not in row_of]
    if absent:
        raise UserInputError(
            f"{name}: lacks {len(absent)} nodule(s) (pid/nodule_id) of the evaluated subset: "
            f"{_listing(absent)}"
        )
    extra = len(keys) - len(records)
    if extra:
        logger.info("%s: %d row(s) outside the evaluated subset are ignored", name, extra)
    take = np.array([row_of[(r.pid, r.nodule_id)] for r in records])
    folds = tuple(sorted(raw_columns))
    raw = np.stack([table[raw_columns[k]].to_numpy()[take] for k in folds])
    if "ensemble" in table.columns:
        given = pd.to_numeric(table["ensemble"], errors="coerce").to_numpy()[take]
        if not np.allclose(given, raw.mean(axis=0), atol=1e-4, equal_nan=False):
            logger.warning("%s: column 'ensemble' is not the mean of the raw_k columns; using the mean", name)
    outputs = ModelOutputs(folds=folds, raw=raw)
    if calibrated_columns and set(calibrated_columns) >= set(folds):
        outputs.calibrated = np.stack([table[calibrated_columns[k]].to_numpy()[take] for k in folds])
    elif "calibrated_ensemble" in table.columns:
        outputs.calibrated_mean = table["calibrated_ensemble"].to_numpy()[take]
    outputs.semantic = {c: table[c].to_numpy()[take] for c in table.columns if _semantic_column(c)}
    return outputs


# --------------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything computed, ready to be written."""

    binary: dict[str, BinaryEvaluation]
    delong: dict[str, dict[str, DeLongResult]]
    semantic: dict[str, SemanticEvaluation]
    n_resamples: int
    seed: int


def compute_results(
    labels: np.ndarray,
    pids: Sequence[str],
    predictors: dict[str, np.ndarray],
    semantic_probabilities: dict[str, np.ndarray],
    records: list[NoduleRecord],
    n_resamples: int,
    seed: int,
) -> Results:
    """Binary metrics with CIs, DeLong tests against each baseline and the semantic AUROCs."""
    counts = patient_resample_counts(pids, n_resamples, seed) if n_resamples > 0 else None
    binary: dict[str, BinaryEvaluation] = {}
    total = n_resamples * len(predictors)
    with tqdm(total=total, desc="bootstrap", unit="resample", disable=total == 0) as bar:
        for name, scores in predictors.items():
            binary[name] = evaluate_binary(labels, scores, counts, progress=bar.update)
    delong: dict[str, dict[str, DeLongResult]] = {}
    for name, scores in predictors.items():
        delong[name] = {}
        for baseline in BASELINES:
            if baseline != name and baseline in predictors:
                try:
                    delong[name][baseline] = delong_test(labels, scores, predictors[baseline])
                except ValueError as error:  # fewer than 2 of a class: no variance estimate
                    logger.warning("DeLong test of %s vs %s not computed: %s", name, baseline, error)
    semantic: dict[str, SemanticEvaluation] = {}
    for feature in FEATURES:
        names = [f"{feature.column}={v.name}" for v in feature.values]
        if not all(n in semantic_probabilities for n in names):
            continue
        probabilities = np.column_stack([semantic_probabilities[n] for n in names])
        truth = [r.semantics.get(feature.column) for r in records]
        evaluation = evaluate_semantic_feature(truth, probabilities, [v.name for v in feature.values], counts)
        if evaluation is not None:
            semantic[feature.column] = evaluation
    return Results(binary, delong, semantic, n_resamples, seed)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def metrics_table(results: Results) -> pd.DataFrame:
    """One row per predictor: every metric with its CI, then DeLong against each baseline."""
    rows = []
    for name, evaluation in results.binary.items():
        row: dict[str, Any] = {"predictor": name}
        row.update(evaluation.as_row())
        row["bootstrap_resamples"] = evaluation.n_resamples
        row["bootstrap_skipped"] = evaluation.n_skipped
        for baseline in BASELINES:
            test = results.delong[name].get(baseline)
            row[f"delong_vs_{baseline}_auc_difference"] = test.difference if test else math.nan
            row[f"delong_vs_{baseline}_z"] = test.z if test else math.nan
            row[f"delong_vs_{baseline}_p"] = test.p_value if test else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def semantic_table(results: Results) -> pd.DataFrame:
    """Per feature: one row per observed value (one-vs-rest) and a ``weighted`` row with the CI."""
    rows = []
    for column, evaluation in results.semantic.items():
        for value, positives, score in zip(
            evaluation.values, evaluation.positives, evaluation.aurocs, strict=True
        ):
            rows.append(
                {
                    "feature": column,
                    "value": value,
                    "n_annotated": evaluation.n_annotated,
                    "n_positive": positives,
                    "prevalence": positives / evaluation.n_annotated,
                    "auroc": score,
                    "auroc_low": math.nan,
                    "auroc_high": math.nan,
                }
            )
        rows.append(
            {
                "feature": column,
                "value": "weighted",
                "n_annotated": evaluation.n_annotated,
                "n_positive": sum(evaluation.positives),
                "prevalence": 1.0,
                "auroc": evaluation.weighted.value,
                "auroc_low": evaluation.weighted.low,
                "auroc_high": evaluation.weighted.high,
            }
        )
    columns = [
        "feature",
        "value",
        "n_annotated",
        "n_positive",
        "prevalence",
        "auroc",
        "auroc_low",
        "auroc_high",
    ]
    return pd.DataFrame(rows, columns=columns)


def _plot_curves(
    folder: Path, labels: np.ndarray, predictors: dict[str, np.ndarray], results: Results
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in predictors.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        estimate = results.binary[name].estimates["auroc"]
        axis.plot(fpr, tpr, label=f"{PREDICTOR_TITLES[name]} ({estimate.value:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(
        xlabel="False-positive rate", ylabel="Sensitivity", title="ROC (AUROC)", xlim=(0, 1), ylim=(0, 1.01)
    )
    axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "roc.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in predictors.items():
        precision, recall, _ = precision_recall_curve(labels, scores)
        estimate = results.binary[name].estimates["auprc"]
        axis.step(recall, precision, where="post", label=f"{PREDICTOR_TITLES[name]} ({estimate.value:.3f})")
    axis.axhline(
        labels.mean(), color="grey", linestyle=":", linewidth=1, label=f"prevalence {labels.mean():.3f}"
    )
    axis.set(xlabel="Recall (sensitivity)", ylabel="Precision", title="Precision-recall (AUPRC)")
    axis.set(xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "precision_recall.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, scores in predictors.items():
        bins = calibration_bins(labels, scores, N_CALIBRATION_BINS)
        filled = bins["count"] > 0
        estimate = results.binary[name].estimates["ece"]
        axis.plot(
            bins["mean_probability"][filled],
            bins["fraction_positive"][filled],
            marker="o",
            label=f"{PREDICTOR_TITLES[name]} (ECE {estimate.value:.3f})",
        )
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(
        xlabel="Mean predicted probability (10 equal-width bins)",
        ylabel="Fraction malignant",
        title="Reliability diagram",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axis.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "calibration.png", dpi=120)
    plt.close(figure)


def _plot_semantic(folder: Path, results: Results) -> bool:
    if not results.semantic:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(results.semantic)
    values = np.array([results.semantic[c].weighted.value for c in columns])
    low = np.array([results.semantic[c].weighted.low for c in columns])
    high = np.array([results.semantic[c].weighted.high for c in columns])
    errors = np.vstack([values - low, high - values]) if np.all(np.isfinite(low)) else None
    figure, axis = plt.subplots(figsize=(6.5, 0.45 * len(columns) + 1.5))
    positions = np.arange(len(columns))
    axis.barh(positions, values, xerr=errors, color="tab:blue", capsize=3)
    axis.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_yticks(positions, [FEATURE_BY_COLUMN[c].title for c in columns], fontsize=8)
    axis.invert_yaxis()
    axis.set(xlim=(0, 1), xlabel="Prevalence-weighted one-vs-rest AUROC", title="Zero-shot semantic AUROC")
    figure.tight_layout()
    figure.savefig(folder / "semantic_auroc.png", dpi=120)
    plt.close(figure)
    return True


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _with_ci(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


_METRIC_GROUPS = (
    ("Discrimination", ("auroc", "auprc"), ("AUROC", "AUPRC")),
    ("Calibration", ("brier", "ece"), ("Brier score", "ECE")),
)


def _metric_tables(results: Results) -> list[str]:
    """Markdown tables of the binary metrics: discrimination, operating points, calibration."""
    names = binary_metric_names()
    targets = [n.removeprefix("threshold_at_") for n in names if n.startswith("threshold_at_")]
    groups: list[tuple[str, list[str], list[str]]] = [(t, list(k), list(h)) for t, k, h in _METRIC_GROUPS]
    for target in targets:
        percent = target.removeprefix("sens")
        keys = [f"{m}_at_{target}" for m in ("threshold", "fpr", "specificity", "precision")]
        headers = ["threshold", "false-positive rate", "specificity", "precision"]
        groups.insert(-1, (f"Operating point at {percent} % sensitivity", keys, headers))
    lines: list[str] = []
    for title, keys, headers in groups:
        rows = []
        for name, evaluation in results.binary.items():
            cells = []
            for key in keys:
                estimate = evaluation.estimates[key]
                if key.startswith("threshold_at_"):
                    cells.append(f"{estimate.value:.4f}")
                else:
                    cells.append(_with_ci(estimate.value, estimate.low, estimate.high))
            rows.append([PREDICTOR_TITLES[name], *cells])
        lines += [f"### {title}", "", _markdown_table(["predictor", *headers], rows), ""]
    return lines


def render_report(context: dict[str, Any], results: Results, has_semantic_plot: bool) -> str:
    """The Markdown report: settings, counts, tables and the plots."""
    lines = [
        "# Evaluation report",
        "",
        f"- Bundle: {context['bundle_name']} {context['bundle_version']}".rstrip(),
        f"- Source of the model outputs: {context['source']}",
        f"- Cohort: `{context['cohort']}`",
        f"- Split: `{context['split_dir']}`; folds {', '.join(map(str, context['folds']))}",
        f"- Subset: {context['subset']} ({context['protocol']})",
        f"- Nodules: {context['n_nodules']} from {context['n_patients']} patients; "
        f"malignant {context['n_malignant']}, benign {context['n_benign']}",
        f"- Calibration: {context['calibration']}",
        (
            f"- Bootstrap: {results.n_resamples} resamples of patients (cluster bootstrap: all nodules of a "
            f"drawn patient), seed {results.seed}, 95 % percentile intervals; resamples holding one class "
            "are skipped (counts in metrics.csv)"
            if results.n_resamples
            else "- Bootstrap: none (point estimates only)"
        ),
        "- ECE: 10 equal-width bins of the predicted probability (resampling inflates it, so its percentile "
        "interval can lie above the point estimate); operating points: the highest threshold reaching the "
        "sensitivity",
        "",
        "## Malignancy",
        "",
        "Value [95 % CI] per predictor.",
        "",
        *_metric_tables(results),
        "### DeLong test against the baselines (paired, two-sided; nodules treated as independent)",
        "",
        _markdown_table(
            ["predictor", "baseline", "AUROC difference", "z", "p"],
            [
                [
                    PREDICTOR_TITLES[name],
                    PREDICTOR_TITLES[baseline],
                    f"{t.difference:+.3f}",
                    f"{t.z:.2f}",
                    f"{t.p_value:.3g}",
                ]
                for name, tests in results.delong.items()
                for baseline, t in tests.items()
                # the baselines against each other once: the richer one against the simpler one
                if not (name in BASELINES and BASELINES.index(name) < BASELINES.index(baseline))
            ],
        ),
        "",
        "![ROC](roc.png) ![Precision-recall](precision_recall.png) ![Reliability](calibration.png)",
        "",
        "## Zero-shot semantic findings",
        "",
    ]
    if results.semantic:
        lines += [
            _markdown_table(
                ["feature", "annotated", "values (n)", "one-vs-rest AUROC", "weighted AUROC"],
                [
                    [
                        FEATURE_BY_COLUMN[column].title,
                        ev.n_annotated,
                        ", ".join(f"{v} ({n})" for v, n in zip(ev.values, ev.positives, strict=True)),
                        ", ".join(f"{a:.3f}" for a in ev.aurocs),
                        _with_ci(ev.weighted.value, ev.weighted.low, ev.weighted.high),
                    ]
                    for column, ev in results.semantic.items()
                ],
            ),
            "",
        ]
        if has_semantic_plot:
            lines += ["![Semantic AUROC](semantic_auroc.png)", ""]
    else:
        lines += [
            "No semantic feature could be scored (no semantic predictions, or no feature annotated with at "
            "least two values).",
            "",
        ]
    if context["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in context["notes"]), ""]
    return "\n".join(lines)


def write_outputs(
    out_dir: Path,
    predictions: pd.DataFrame,
    results: Results,
    labels: np.ndarray,
    predictors: dict[str, np.ndarray],
    context: dict[str, Any],
) -> Path:
    """Write every output into a temporary sibling of ``out_dir`` and rename it into place."""
    out_dir = Path(out_dir)
    with new_output_folder(out_dir) as staging:
        predictions.to_csv(staging / "predictions.csv", index=False)
        metrics_table(results).to_csv(staging / "metrics.csv", index=False)
        semantic_table(results).to_csv(staging / "semantic_auroc.csv", index=False)
        document = {
            "context": {k: v for k, v in context.items()},
            "predictors": {
                name: {
                    "metrics": {m: vars(e) for m, e in evaluation.estimates.items()},
                    "bootstrap_resamples": evaluation.n_resamples,
                    "bootstrap_skipped": evaluation.n_skipped,
                    "delong": {b: vars(t) for b, t in results.delong[name].items()},
                }
                for name, evaluation in results.binary.items()
            },
            "semantic": {
                column: {
                    "values": list(ev.values),
                    "positives": list(ev.positives),
                    "aurocs": list(ev.aurocs),
                    "weighted": vars(ev.weighted),
                    "n_annotated": ev.n_annotated,
                    "bootstrap_skipped": ev.n_skipped,
                }
                for column, ev in results.semantic.items()
            },
        }
        # NaN is not JSON: write null
        text = json.dumps(_json_safe(document), indent=2, allow_nan=False)
        (staging / "metrics.json").write_text(text + "\n")
        _plot_curves(staging, labels, predictors, results)
        has_semantic_plot = _plot_semantic(staging, results)
        (staging / "report.md").write_text(render_report(context, results, has_semantic_plot))
    return out_dir


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def _prediction_frame(
    records: list[NoduleRecord],
    heldout: np.ndarray,
    outputs: ModelOutputs,
    ensemble: np.ndarray,
    calibrated: np.ndarray | None,
    calibrated_ensemble: np.ndarray | None,
    predictors: dict[str, np.ndarray],
) -> pd.DataFrame:
    frame: dict[str, Any] = {
        "pid": [r.pid for r in records],
        "nodule_id": [r.nodule_id for r in records],
        "malignant": [r.label for r in records],
        "heldout_fold": pd.array([None if f < 0 else int(f) for f in heldout], dtype="Int64"),
    }
    for row, fold in enumerate(outputs.folds):
        frame[f"raw_{fold}"] = outputs.raw[row]
    frame["ensemble"] = ensemble
    if calibrated is not None:
        for row, fold in enumerate(outputs.folds):
            frame[f"calibrated_{fold}"] = calibrated[row]
    if calibrated_ensemble is not None:
        frame["calibrated_ensemble"] = calibrated_ensemble
    frame[MODEL] = predictors[MODEL]
    if MODEL_CALIBRATED in predictors:
        frame[MODEL_CALIBRATED] = predictors[MODEL_CALIBRATED]
    frame.update(outputs.semantic)
    for name in BASELINES:
        frame[name] = predictors[name]
    return pd.DataFrame(frame)


def evaluate(
    cohort: Path,
    split_dir: Path,
    out_dir: Path,
    bundle: Path | None = None,
    predictions_csv: Path | None = None,
    subset: str | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 8,
) -> Path:
    """Run the whole evaluation (see the module docstring); returns the output folder.

    Raises:
        UserInputError: any bad input; nothing is written then.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserInputError(f"{out_dir} already exists; remove it or choose another --out")
    if bundle is None and predictions_csv is None:
        raise UserInputError(
            "give --bundle (run the models) or --predictions (re-evaluate a predictions file)"
        )
    if n_resamples < 0:
        raise UserInputError(f"--bootstrap must be 0 (no CIs) or more, got {n_resamples}")
    model_paths: dict[int, Path] = {}
    if predictions_csv is None:
        model_paths = exported_models(Path(bundle))  # type: ignore[arg-type]
        folds: Sequence[int] = list(model_paths)
    else:
        header = _read_header(Path(predictions_csv))
        folds = sorted(int(m.group(1)) for c in header if (m := _RAW.match(c)))
        if not folds:
            raise UserInputError(f"{Path(predictions_csv).name}: no raw_<k> column (one per fold model)")
    all_records = read_cohort(cohort, require_label=True)
    plan = read_split_plan(Path(split_dir), folds, {r.pid for r in all_records})
    if subset is None:
        subset = "test" if plan.test else "val"
        logger.info("subset: %s (%s)", subset, "the split has a test set" if plan.test else "no test set")
    if subset not in SUBSETS:
        raise UserInputError(f"--subset must be one of {', '.join(SUBSETS)}, got '{subset}'")
    records, heldout = select_subset(all_records, plan, subset)
    if predictions_csv is None:
        _check_images(Path(cohort), records)  # before hours of inference, not in the middle
    labels = np.array([r.label for r in records], dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        raise UserInputError(
            f"the '{subset}' subset holds only {'malignant' if labels[0] else 'benign'} nodules: "
            "AUROC and the other metrics need both classes"
        )
    baselines, notes = fit_baselines(all_records, records, plan)

    calibration_note = "none"
    if predictions_csv is None:
        calibration_path = Path(bundle) / "models" / CALIBRATION_FILE  # type: ignore[arg-type]
        calibrators = load_calibration(calibration_path) if calibration_path.is_file() else None
        uncalibrated = [fold for fold in model_paths if calibrators is not None and fold not in calibrators]
        if uncalibrated:
            raise UserInputError(
                f"{calibration_path}: no calibration map for fold(s) {_listing(uncalibrated)} of the "
                "bundle's models: refit the calibration for these models (or remove the file)"
            )
        outputs = predict_with_models(records, model_paths, device or _default_device(), batch_size)
        ensemble, calibrated, calibrated_ensemble = ensemble_probability(
            outputs.raw, calibrators, outputs.folds
        )
        if calibrators is not None:
            calibration_note = f"per-fold beta calibration from {calibration_path.name}, then averaged"
        source = f"fold models of the bundle ({len(model_paths)}: {', '.join(map(str, model_paths))})"
    else:
        outputs = read_predictions(Path(predictions_csv), records, all_records)
        ensemble = outputs.raw.mean(axis=0)
        calibrated, calibrated_ensemble = outputs.calibrated, outputs.calibrated_mean
        if calibrated is None and calibrated_ensemble is None and bundle is not None:
            calibration_path = Path(bundle) / "models" / CALIBRATION_FILE
            if calibration_path.is_file():
                calibrators = load_calibration(calibration_path)
                _, calibrated, calibrated_ensemble = ensemble_probability(
                    outputs.raw, calibrators, outputs.folds
                )
                calibration_note = f"per-fold beta calibration from {calibration_path.name}, then averaged"
        elif calibrated is not None:
            calibrated_ensemble = calibrated.mean(axis=0)
            calibration_note = "calibrated_<k> columns of the predictions file, averaged"
        source = f"predictions file `{Path(predictions_csv).name}`"

    predictors: dict[str, np.ndarray] = {MODEL: protocol_prediction(outputs.raw, outputs.folds, heldout)}
    if calibrated is not None:
        predictors[MODEL_CALIBRATED] = protocol_prediction(calibrated, outputs.folds, heldout)
    elif calibrated_ensemble is not None:
        if np.any(heldout >= 0):
            notes.append(
                "calibrated_ensemble alone cannot give out-of-fold predictions for validation nodules: "
                "the calibrated model is not evaluated"
            )
        else:
            predictors[MODEL_CALIBRATED] = calibrated_ensemble
            calibration_note = "calibrated_ensemble column of the predictions file"
    for name in BASELINES:
        predictors[name] = protocol_prediction(baselines[name], plan.folds, heldout)
    if MODEL_CALIBRATED in predictors and np.any(heldout >= 0):
        notes.append(
            "the calibration maps were fitted on the folds' validation sets: calibrated numbers on "
            "validation (out-of-fold) nodules are optimistic"
        )

    pids = [r.pid for r in records]
    results = compute_results(labels, pids, predictors, outputs.semantic, records, n_resamples, seed)
    identity = bundle_identity(Path(bundle) if bundle is not None else None)
    protocol = {
        "test": "held-out test patients, mean over the folds",
        "val": "validation patients, each predicted by the fold that held it out",
        "all": "validation patients out of fold, test patients by the mean over the folds",
    }[subset]
    context = {
        "bundle_name": identity["name"],
        "bundle_version": identity["version"],
        "source": source,
        "cohort": str(cohort),
        "split_dir": str(split_dir),
        "subset": subset,
        "protocol": protocol,
        "folds": list(outputs.folds),
        "n_nodules": len(records),
        "n_patients": len(set(pids)),
        "n_malignant": int(labels.sum()),
        "n_benign": int(len(labels) - labels.sum()),
        "calibration": calibration_note,
        "bootstrap_resamples": n_resamples,
        "seed": seed,
        "notes": notes,
    }
    frame = _prediction_frame(
        records, heldout, outputs, ensemble, calibrated, calibrated_ensemble, predictors
    )
    return write_outputs(out_dir, frame, results, labels.astype(np.float64), predictors, context)


def _check_images(cohort: Path, records: list[NoduleRecord]) -> None:
    missing = [f"line {r.line}: {r.image_path}" for r in records if not r.image_path.exists()]
    if missing:
        raise UserInputError(
            f"{cohort.name}: {len(missing)} evaluated nodule(s) have no image at their image_path: "
            f"{_listing(missing)}"
        )


def _read_header(path: Path) -> list[str]:
    if not path.is_file():
        raise UserInputError(f"predictions file '{path}' does not exist")
    try:
        return [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not a readable CSV file: {error}") from error


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder with models/fold_<k>/model.ts"
    )
    parser.add_argument("--cohort", type=Path, required=True, help="cohort CSV (SEMANTIC_SCHEMA.md)")
    parser.add_argument(
        "--split-dir", type=Path, required=True, help="split folder (python -m training.splits)"
    )
    parser.add_argument(
        "--subset",
        choices=SUBSETS,
        default=None,
        help="default: test when the split has test_pid.csv, else val",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="re-evaluate this predictions CSV instead of running models",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=8, help="nodules per forward pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = evaluate(
        cohort=args.cohort,
        split_dir=args.split_dir,
        out_dir=args.out,
        bundle=args.bundle,
        predictions_csv=args.predictions,
        subset=args.subset,
        n_resamples=args.bootstrap,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
    )
    table = pd.read_csv(out / "metrics.csv")
    for row in table.itertuples():
        print(
            f"{row.predictor:<20} AUROC {_with_ci(row.auroc, row.auroc_low, row.auroc_high):<24} "
            f"AUPRC {_with_ci(row.auprc, row.auprc_low, row.auprc_high)}"
        )
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
