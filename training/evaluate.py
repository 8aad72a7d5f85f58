"""Evaluate a bundle's fold models on a cohort against two baselines: ``python -m training.evaluate``.

::

    python -m training.evaluate --bundle BUNDLE --cohort cohort.csv --split-dir splits \\
        [--subset test|val|all] --out eval_dir [--bootstrap 1000] [--seed 0]
    python -m training.evaluate --predictions predictions.csv --cohort cohort.csv --split-dir splits --out DIR

Protocol (the same for the model and the baselines):

- Folds: every ``BUNDLE/models/fold_<k>/model.ts`` (or a single ``BUNDLE/models/model.ts``, taken as
  fold 0), opened with :class:`scripts.deployed.DeployedBundle`; the split folder must hold
  ``fold_<k>/train_pid.csv`` and ``val_pid.csv`` for each (:mod:`scripts.split_folder`), and
  optionally ``test_pid.csv``.
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
  value being its own category, plus the diameter); features standardised, L2 penalty C = 1
  (:mod:`training.baselines`).
- Metrics (:mod:`training.metrics`): AUROC, AUPRC, FPR / precision / specificity at 90 % and 95 %
  sensitivity, Brier score, ECE, each with a patient-level bootstrap percentile CI; DeLong's paired
  test of every predictor against each baseline; zero-shot semantic AUROC per feature.

Output folder (written in a temporary sibling, renamed into place at the end): ``predictions.csv``,
``metrics.csv``, ``metrics.json``, ``semantic_auroc.csv``, ``roc.png``, ``precision_recall.png``,
``calibration.png``, ``semantic_auroc.png`` (when a feature can be scored) and ``report.md``
(:mod:`training.evaluation_report`). The model outputs come from the bundle or from a predictions
file (:mod:`training.model_outputs`); this module chooses the subset, applies the protocol and runs
the command.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

# Only light modules here: --help, a bad argument and a missing input path answer before torch and
# open_clip load (scripts.deployed, training.model_outputs and training.evaluation_report import
# them); evaluate() imports those after its argument and path checks.
from scripts.cohort import NoduleRecord, read_cohort
from scripts.errors import UserInputError, exit_on_user_error
from scripts.split_folder import SplitPlan, read_split_plan
from training.baselines import BASELINES, fit_baselines

if TYPE_CHECKING:
    from scripts.deployed import DeployedBundle
    from training.model_outputs import ModelOutputs

logger = logging.getLogger(__name__)

SUBSETS = ("test", "val", "all")
PROTOCOLS = {
    "test": "held-out test patients, mean over the folds",
    "val": "validation patients, each predicted by the fold that held it out",
    "all": "validation patients out of fold, test patients by the mean over the folds",
}


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


def _prediction_frame(
    records: list[NoduleRecord],
    heldout: np.ndarray,
    outputs: ModelOutputs,
    ensemble: np.ndarray,
    calibrated_ensemble: np.ndarray | None,
    predictors: dict[str, np.ndarray],
) -> pd.DataFrame:
    from training.model_outputs import MODEL, MODEL_CALIBRATED

    frame: dict[str, Any] = {
        "pid": [r.pid for r in records],
        "nodule_id": [r.nodule_id for r in records],
        "malignant": [r.label for r in records],
        "heldout_fold": pd.array([None if f < 0 else int(f) for f in heldout], dtype="Int64"),
    }
    for row, fold in enumerate(outputs.folds):
        frame[f"raw_{fold}"] = outputs.raw[row]
    frame["ensemble"] = ensemble
    if outputs.calibrated is not None:
        for row, fold in enumerate(outputs.folds):
            frame[f"calibrated_{fold}"] = outputs.calibrated[row]
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
    _check_paths_exist(cohort, split_dir, bundle, predictions_csv)
    # heavy (torch, open_clip): after every check that needs neither
    from scripts.deployed import DeployedBundle, bundle_calibrators, read_bundle_identity
    from training.evaluation_report import compute_results, write_outputs
    from training.model_outputs import (
        MODEL,
        MODEL_CALIBRATED,
        predict_records,
        predictions_file_folds,
        read_predictions,
    )

    deployed: DeployedBundle | None = None
    if predictions_csv is None:
        # every check of the bundle (models, calibration against the folds) before the cohort's
        deployed = DeployedBundle.open(Path(bundle), device, require_identity=False)  # type: ignore[arg-type]
        folds: Sequence[int] = deployed.ensemble.folds
    else:
        folds = predictions_file_folds(Path(predictions_csv))
    all_records = read_cohort(cohort, require_label=True)
    plan = read_split_plan(Path(split_dir), folds, {r.pid for r in all_records})
    if subset is None:
        subset = "test" if plan.test else "val"
        logger.info("subset: %s (%s)", subset, "the split has a test set" if plan.test else "no test set")
    if subset not in SUBSETS:
        raise UserInputError(f"--subset must be one of {', '.join(SUBSETS)}, got '{subset}'")
    records, heldout = select_subset(all_records, plan, subset)
    if deployed is not None:
        _check_images(Path(cohort), records)  # before hours of inference, not in the middle
    labels = np.array([r.label for r in records], dtype=np.int64)
    if len(set(labels.tolist())) < 2:
        raise UserInputError(
            f"the '{subset}' subset holds only {'malignant' if labels[0] else 'benign'} nodules: "
            "AUROC and the other metrics need both classes"
        )
    baselines, notes = fit_baselines(all_records, records, plan)

    if deployed is not None:
        outputs = predict_records(records, deployed.ensemble, batch_size)
        source = f"fold models of the bundle ({len(folds)}: {', '.join(map(str, folds))})"
        identity = deployed.identity
    else:
        calibrators = bundle_calibrators(Path(bundle)) if bundle is not None else None
        outputs = read_predictions(Path(predictions_csv), records, all_records, calibrators)  # type: ignore[arg-type]
        source = f"predictions file `{Path(predictions_csv).name}`"  # type: ignore[arg-type]
        identity = read_bundle_identity(Path(bundle), required=False) if bundle is not None else None
    ensemble = outputs.raw.mean(axis=0)
    calibrated_ensemble = (
        outputs.calibrated.mean(axis=0) if outputs.calibrated is not None else outputs.calibrated_mean
    )
    calibration_note = outputs.calibration

    predictors: dict[str, np.ndarray] = {MODEL: protocol_prediction(outputs.raw, outputs.folds, heldout)}
    if outputs.calibrated is not None:
        predictors[MODEL_CALIBRATED] = protocol_prediction(outputs.calibrated, outputs.folds, heldout)
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
    context = {
        "bundle_name": identity.name if identity is not None else "(none: predictions file)",
        "bundle_version": identity.version if identity is not None else "",
        "source": source,
        "cohort": str(cohort),
        "split_dir": str(split_dir),
        "subset": subset,
        "protocol": PROTOCOLS[subset],
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
    frame = _prediction_frame(records, heldout, outputs, ensemble, calibrated_ensemble, predictors)
    return write_outputs(out_dir, frame, results, labels.astype(np.float64), predictors, context)


def _check_paths_exist(
    cohort: Path, split_dir: Path, bundle: Path | None, predictions_csv: Path | None
) -> None:
    """Refuse an input path that does not exist, before the models load (a typo answers at once).

    Each message is the one the later, thorough check gives (named beside it), in the same order:
    the bundle's models or the predictions file, then the cohort, then the split folder.
    """
    if predictions_csv is None:
        folder = Path(bundle)  # type: ignore[arg-type]
        # BUNDLE/models/<set> is a model set (scripts.deployed.locate_models): left to the full check
        parent = folder.parent
        model_set = parent.name == "models" and (parent.parent / "configs" / "metadata.json").is_file()
        if not folder.is_dir() and not model_set:  # as scripts.export.exported_models says it
            raise UserInputError(f"bundle folder '{folder}' does not exist or is not a folder")
    elif not Path(predictions_csv).is_file():  # as training.model_outputs.predictions_file_folds
        raise UserInputError(f"predictions file '{Path(predictions_csv)}' does not exist")
    cohort_csv = Path(cohort).expanduser()
    if not cohort_csv.is_file():  # as scripts.cohort.read_cohort
        raise UserInputError(f"cohort CSV '{cohort_csv}' does not exist or is not a file")
    if not Path(split_dir).is_dir():  # as scripts.split_folder.read_split_plan
        raise UserInputError(f"split folder '{Path(split_dir)}' does not exist")


def _check_images(cohort: Path, records: list[NoduleRecord]) -> None:
    from training.model_outputs import listing

    missing = [f"line {r.line}: {r.image_path}" for r in records if not r.image_path.exists()]
    if missing:
        raise UserInputError(
            f"{cohort.name}: {len(missing)} evaluated nodule(s) have no image at their image_path: "
            f"{listing(missing)}"
        )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder with models/fold_<k>/model.ts"
    )
    parser.add_argument("--cohort", type=Path, required=True, help="cohort CSV (docs/semantic_schema.md)")
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
    from training.evaluation_report import with_ci

    table = pd.read_csv(out / "metrics.csv")
    for row in table.itertuples():
        print(
            f"{row.predictor:<20} AUROC {with_ci(row.auroc, row.auroc_low, row.auroc_high):<24} "
            f"AUPRC {with_ci(row.auprc, row.auprc_low, row.auprc_high)}"
        )
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
