"""The model outputs an evaluation scores: from the bundle's fold models, or from a predictions file.

Both sources give one :class:`ModelOutputs`: each fold's malignancy probability for the evaluated
nodules, the calibrated probabilities when there are any, and the fold-mean zero-shot semantic
probabilities.

- From the bundle (:func:`predict_records`): its :class:`~scripts.deployed.FoldEnsemble` on the
  bundle's own loader and preprocessing, each CT loaded once and its nodules batched.
- From a predictions file (:func:`read_predictions`, e.g. an earlier evaluation's
  ``predictions.csv``): columns ``pid``, ``nodule_id``, ``raw_<k>`` per fold, optionally
  ``calibrated_<k>`` or ``calibrated_ensemble``, ``malignant`` and ``<feature>=<value>``; every
  value is checked and every problem names its column and lines.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from scripts.calibration import CALIBRATION_FILE, FoldCalibrators, ensemble_probability
from scripts.cohort import NoduleRecord
from scripts.deployed import FoldEnsemble
from scripts.errors import UserInputError
from scripts.vocabulary import FEATURE_BY_COLUMN

logger = logging.getLogger(__name__)

MODEL = "model"
"""The evaluated model prediction (out of fold or the fold mean, see :mod:`training.evaluate`)."""

MODEL_CALIBRATED = "model_calibrated"
"""The same from the calibrated per-fold probabilities."""

BUNDLE_CALIBRATION = f"per-fold beta calibration from {CALIBRATION_FILE}, then averaged"

_RAW = re.compile(r"^raw_(\d+)$")
_CALIBRATED = re.compile(r"^calibrated_(\d+)$")
_LISTED = 10


def listing(items: Sequence[Any]) -> str:
    """The first items of ``items`` for a message, and how many there are when not all are shown."""
    shown = ", ".join(str(i) for i in list(items)[:_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _LISTED else "")


@dataclass
class ModelOutputs:
    """Per-fold probabilities of the selected nodules.

    Attributes:
        folds: fold number of each row of ``raw``.
        raw: ``(K, N)`` malignancy probability of each fold model.
        calibrated: ``(K, N)`` calibrated probabilities, or ``None``.
        calibrated_mean: ``(N,)`` calibrated ensemble when only it is known (predictions files).
        semantic: ``<feature>=<value>`` -> ``(N,)`` zero-shot probability (mean over folds).
        calibration: where ``calibrated`` comes from, for the report ("none" without it).
    """

    folds: tuple[int, ...]
    raw: np.ndarray
    calibrated: np.ndarray | None = None
    calibrated_mean: np.ndarray | None = None
    semantic: dict[str, np.ndarray] = field(default_factory=dict)
    calibration: str = "none"


# --------------------------------------------------------------------------------------------------
# from the bundle
# --------------------------------------------------------------------------------------------------


def predict_records(records: list[NoduleRecord], ensemble: FoldEnsemble, batch_size: int = 8) -> ModelOutputs:
    """Run the fold ensemble on the nodules; each CT is loaded once and its nodules batched.

    Args:
        records: the nodules to predict.
        ensemble: the fold predictors (and calibrators, when the bundle has them).
        batch_size: nodules per forward pass.

    Returns:
        the raw (and calibrated) probabilities of each fold and the fold-mean semantic probabilities.
    """
    from scripts.transforms import LoadCT, nine_planes_for_seeds  # MONAI: only when models run

    names = ensemble.semantic_columns
    raw = np.zeros((len(ensemble.folds), len(records)))
    calibrated = np.zeros_like(raw) if ensemble.calibrators is not None else None
    semantic = np.zeros((len(records), len(names)))
    by_image: dict[Path, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_image[record.image_path].append(index)
    loader = LoadCT()
    for image_path, indices in tqdm(by_image.items(), desc="inference", unit="CT"):
        volume = loader(image_path)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            planes = nine_planes_for_seeds(
                volume,
                [records[i].seed_lps for i in batch],
                pid=records[batch[0]].pid,
                nodule_ids=[records[i].nodule_id for i in batch],
            )
            outputs = ensemble.predict(planes)
            raw[:, batch] = outputs.per_fold
            if calibrated is not None:
                calibrated[:, batch] = outputs.calibrated_per_fold
            semantic[batch] = outputs.semantic
    return ModelOutputs(
        folds=ensemble.folds,
        raw=raw,
        calibrated=calibrated,
        semantic={name: semantic[:, j] for j, name in enumerate(names)},
        calibration=BUNDLE_CALIBRATION if calibrated is not None else "none",
    )


# --------------------------------------------------------------------------------------------------
# from a predictions file
# --------------------------------------------------------------------------------------------------


def predictions_file_folds(path: Path) -> list[int]:
    """The folds of a predictions file: the ``k`` of its ``raw_<k>`` columns, sorted.

    Raises:
        UserInputError: the file is missing, unreadable or has no ``raw_<k>`` column.
    """
    if not path.is_file():
        raise UserInputError(f"predictions file '{path}' does not exist")
    try:
        header = [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not a readable CSV file: {error}") from error
    folds = sorted(int(m.group(1)) for c in header if (m := _RAW.match(c)))
    if not folds:
        raise UserInputError(f"{path.name}: no raw_<k> column (one per fold model)")
    return folds


def _semantic_column(name: str) -> bool:
    feature, _, value = name.partition("=")
    return feature in FEATURE_BY_COLUMN and value in {v.name for v in FEATURE_BY_COLUMN[feature].values}


def read_predictions(
    path: Path,
    records: list[NoduleRecord],
    all_records: list[NoduleRecord],
    calibrators: FoldCalibrators | None = None,
) -> ModelOutputs:
    """Model outputs of an existing predictions file (``raw_k``, optional ``calibrated_*``, semantic).

    Args:
        path: CSV with ``pid``, ``nodule_id``, ``raw_<k>`` per fold, optionally ``calibrated_<k>`` /
            ``calibrated_ensemble``, ``malignant`` and ``<feature>=<value>`` columns.
        records: the nodules to evaluate, in output order.
        all_records: the whole cohort (to tell rows of other subsets from unknown rows).
        calibrators: the bundle's per-fold maps, applied to the ``raw_<k>`` columns when the file
            has neither ``calibrated_<k>`` for every fold nor ``calibrated_ensemble``; or ``None``.

    Raises:
        UserInputError: unreadable file, missing columns, NaN or out-of-range probabilities (the
            message names the column and lines), duplicate or unknown nodules, labels that disagree
            with the cohort, nodules of the subset that the file lacks, or a fold without a map in
            ``calibrators``.
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
                f"value(s) on line(s) {listing(lines)}"
            )
        table[column] = values.astype(np.float64)
    keys = list(zip(table["pid"], table["nodule_id"], strict=True))
    duplicated = table.duplicated(["pid", "nodule_id"], keep="first").to_numpy()
    if duplicated.any():
        lines = [int(i) + 2 for i in np.flatnonzero(duplicated)]
        raise UserInputError(f"{name}: duplicate (pid, nodule_id) on line(s) {listing(lines)}")
    cohort = {(r.pid, r.nodule_id): r for r in all_records}
    unknown = [line + 2 for line, key in enumerate(keys) if key not in cohort]
    if unknown:
        raise UserInputError(
            f"{name}: {len(unknown)} row(s) name a nodule (pid, nodule_id) absent from the cohort CSV, "
            f"line(s) {listing(unknown)}"
        )
    if "malignant" in table.columns:
        given = pd.to_numeric(table["malignant"], errors="coerce").to_numpy()
        expected = np.array([cohort[key].label for key in keys], dtype=np.float64)
        wrong = [int(i) + 2 for i in np.flatnonzero(~np.isclose(given, expected))]
        if wrong:
            raise UserInputError(
                f"{name}: column 'malignant' disagrees with the cohort CSV on line(s) {listing(wrong)}"
            )
    row_of = {key: i for i, key in enumerate(keys)}
    absent = [f"{r.pid}/{r.nodule_id}" for r in records if (r.pid, r.nodule_id) not in row_of]
    if absent:
        raise UserInputError(
            f"{name}: lacks {len(absent)} nodule(s) (pid/nodule_id) of the evaluated subset: "
            f"{listing(absent)}"
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
        outputs.calibration = "calibrated_<k> columns of the predictions file, averaged"
    elif "calibrated_ensemble" in table.columns:
        outputs.calibrated_mean = table["calibrated_ensemble"].to_numpy()[take]
    elif calibrators is not None:
        _, outputs.calibrated, _ = ensemble_probability(raw, calibrators, folds)
        outputs.calibration = BUNDLE_CALIBRATION
    outputs.semantic = {c: table[c].to_numpy()[take] for c in table.columns if _semantic_column(c)}
    return outputs
