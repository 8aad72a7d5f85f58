"""Benchmark: the metrics step of ``training.evaluate`` on 2,000 nodules with 1,000 bootstrap resamples.

Synthetic predictions for ~700 patients (1-5 nodules each): four predictors (model, calibrated
model, two baselines) and five zero-shot semantic features. Times
:func:`training.evaluate.compute_results` (patient-level resampling, every binary metric with its
CI for each predictor, DeLong tests, semantic AUROCs with CIs) and reports the median over
``--repeats`` runs, and the time to import ``training.splits`` and scikit-learn's model selection
in a fresh process; ``--end-to-end`` also times a whole ``python -m training.evaluate
--predictions`` run (cohort reading, baseline fits, plots, report) once.

Usage::

    .venv/bin/python bench/bench_evaluate.py [--nodules 2000] [--patients 700] [--bootstrap 1000]
        [--repeats 5] [--end-to-end]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads the variable then

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import benchlib
import training  # noqa: F401  (its __init__ puts bundle/ on sys.path for scripts.*)
from scripts.cohort import read_cohort
from scripts.vocabulary import FEATURE_BY_COLUMN
from training.baselines import BASELINES
from training.evaluate import evaluate
from training.evaluation_report import compute_results
from training.model_outputs import MODEL, MODEL_CALIBRATED
from training.splits import make_splits, write_splits

SEMANTIC = ("nodule_margins", "nodule_consistency", "nodule_shape", "pleural_attachment", "cavitation")


def synthetic_cohort(n_nodules: int, n_patients: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cohort table (fake image paths) and a predictions table with three folds' raw columns."""
    rng = np.random.default_rng(seed)
    patient = np.sort(
        np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n_nodules - n_patients)])
    )
    labels = (rng.uniform(size=n_nodules) < 0.25).astype(int)
    cohort = pd.DataFrame(
        {
            "pid": [f"P{p:05d}" for p in patient],
            "nodule_id": pd.Series(patient).groupby(patient).cumcount().astype(str),
            "image_path": "missing.nii.gz",
            "coordX": 0.0,
            "coordY": 0.0,
            "coordZ": 0.0,
            "malignant": labels,
            "mean_diameter": np.round(np.abs(rng.normal(7 + 6 * labels, 3)), 1),
        }
    )
    predictions = cohort[["pid", "nodule_id", "malignant"]].copy()
    for fold in range(3):
        predictions[f"raw_{fold}"] = np.clip(0.3 * labels + rng.normal(0.35, 0.2, n_nodules), 0, 1)
    for column in SEMANTIC:
        values = [v.name for v in FEATURE_BY_COLUMN[column].values]
        cohort[column] = rng.choice(values, n_nodules)
        probabilities = rng.dirichlet(np.ones(len(values)), n_nodules)
        for j, value in enumerate(values):
            predictions[f"{column}={value}"] = probabilities[:, j]
    return cohort, predictions


def cold_import_seconds(module: str) -> float:
    """Seconds to import ``module`` in a fresh interpreter, as a command-line tool pays it."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=benchlib.REPO, check=True, capture_output=True, text=True
    )
    return float(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodules", type=int, default=2000)
    parser.add_argument("--patients", type=int, default=700)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cohort, predictions = synthetic_cohort(args.nodules, args.patients)
    with tempfile.TemporaryDirectory() as folder:
        cohort_csv = Path(folder) / "cohort.csv"
        cohort.to_csv(cohort_csv, index=False)
        records = read_cohort(cohort_csv)
        labels = cohort["malignant"].to_numpy()
        rng = np.random.default_rng(1)
        model = predictions[[f"raw_{k}" for k in range(3)]].mean(axis=1).to_numpy()
        predictors = {
            MODEL: model,
            MODEL_CALIBRATED: np.clip(model + rng.normal(0, 0.02, len(model)), 0, 1),
            BASELINES[0]: np.clip(cohort["mean_diameter"].to_numpy() / 25, 0, 1),
            BASELINES[1]: np.clip(0.2 * labels + rng.uniform(0, 0.8, len(model)), 0, 1),
        }
        semantic = {c: predictions[c].to_numpy() for c in predictions.columns if "=" in c}
        stages = benchlib.StageTimes()
        for repeat in range(args.repeats):  # a new resampling seed per run, no warm-up
            with stages("metrics"):
                compute_results(
                    labels, cohort["pid"].tolist(), predictors, semantic, records, args.bootstrap, repeat
                )
        times = stages.samples["metrics"]
        print(
            f"metrics step: {args.nodules} nodules, {cohort['pid'].nunique()} patients, {len(predictors)} "
            f"predictors, {len(SEMANTIC)} semantic features, {args.bootstrap} resamples: median "
            f"{statistics.median(times):.3f} s (min {min(times):.3f} s, {args.repeats} runs), "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        imports = ", ".join(
            f"{m} {cold_import_seconds(m):.2f} s" for m in ("training.splits", "sklearn.model_selection")
        )
        print(f"import in a fresh process: {imports}")
        if args.end_to_end:
            labels_by_patient = cohort.groupby("pid")["malignant"].max().to_dict()
            splits, test = make_splits(labels_by_patient, n_folds=3, test_fraction=0.2, seed=0)
            split_dir = write_splits(splits, test, Path(folder) / "splits")
            predictions_csv = Path(folder) / "predictions.csv"
            predictions.to_csv(predictions_csv, index=False)
            elapsed, _ = benchlib.median_seconds(
                lambda: evaluate(
                    cohort_csv,
                    split_dir,
                    Path(folder) / "out",
                    predictions_csv=predictions_csv,
                    subset="all",
                    n_resamples=args.bootstrap,
                ),
                repeats=1,
                warmup=0,
            )
            print(f"end to end (training.evaluate --predictions, subset all): {elapsed:.2f} s")


if __name__ == "__main__":
    main()
