"""``python -m training.crossval``: train once per fold, calibrate, write one deployable bundle.

For every fold of a split folder (``python -m training.splits``) the bundle's own ``train.json`` runs
unchanged with ``--fold k`` (a separate ``monai.bundle run`` process per fold, in
``WORK/fold_<k>/``). Then, per fold, the chosen best checkpoint is exported to TorchScript, the fold's
validation patients are predicted with it, and a beta calibration (Kull et al. 2017) is fitted on
those predictions. The output bundle holds:

- ``models/fold_<k>/model.ts`` (exported), ``best_auroc.pt`` and ``best_loss.pt`` (checkpoints);
- ``models/calibration.json`` (per-fold beta calibration, read by the deploy app and the evaluation);
- ``models/crossval_record.json``: cohort and split (with SHA-256), label policy (from the cohort's
  JSON sidecar when there is one), settings, per-fold results and software versions.

Neither file holds a path of the machine that trained: the cohort is named by its file name and
SHA-256, the split folder and a label-policy sidecar by their paths relative to the cohort CSV's folder.

Interrupted runs resume: finished folds are kept (``WORK/fold_<k>/complete.json``) and an interrupted
fold continues after its last finished epoch (the bundle's ``models/last.pt``). Changing the training
settings between runs is refused instead of mixing two trainings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

# Only light modules here: --help, a bad argument and a missing cohort answer before torch, MONAI and
# open_clip load (seconds); the functions that need them import them.
from scripts.bundle_files import BUNDLE_ROOT, copy_bundle
from scripts.calibration import CALIBRATION_FILE, fit_beta_calibration, save_calibration
from scripts.cohort import read_cohort, validate_cohort
from scripts.errors import UserInputError, exit_on_user_error
from scripts.split_folder import read_split_plan
from training.staging import new_output_folder

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("training.crossval")

CHECKPOINTS = ("best_auroc.pt", "best_loss.pt")
RECORD_FILE = "crossval_record.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The train.json ids this run sets (the same for every fold)."""
    overrides: dict[str, Any] = {
        "model_name": args.model_name,
        "pretrained": args.pretrained,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "learning_rate": args.learning_rate,
        "patience": args.patience,
        "seed": args.seed,
    }
    for item in args.override or []:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise UserInputError(f"--override '{item}': expected KEY=VALUE, e.g. --override cache_rate=0.5")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return {k: v for k, v in overrides.items() if v is not None}


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def train_fold(
    fold: int, cohort: Path, split_dir: Path, fold_dir: Path, overrides: dict[str, Any], device: str | None
) -> None:
    """Run the bundle's train.json for one fold (resuming when it was interrupted)."""
    settings = {"cohort": str(cohort), "split_dir": str(split_dir), "fold": fold, "overrides": overrides}
    settings_file = fold_dir / "settings.json"
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text())
        if previous != settings:
            raise UserInputError(
                f"fold {fold}: '{fold_dir}' holds a training with other settings ({settings_file}); "
                "use the same options to resume it, or another --work folder to start a new one"
            )
        logger.info("fold %d: resuming the interrupted training in %s", fold, fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings, indent=2))
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", "configs/train.json", "--meta_file", "configs/metadata.json",
        "--bundle_root", str(fold_dir), "--dataset_csv", str(cohort), "--split_dir", str(split_dir),
        "--fold", str(fold),
    ]  # fmt: skip
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    if device:
        command += ["--device", f"$torch.device('{device}')"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BUNDLE_ROOT), os.environ.get("PYTHONPATH", "")])}
    logger.info("fold %d: training (%s)", fold, " ".join(command[3:]))
    completed = subprocess.run(command, cwd=BUNDLE_ROOT, env=env)
    if completed.returncode != 0:
        raise UserInputError(
            f"training fold {fold} failed (exit code {completed.returncode}); see its messages above. "
            f"Run the same command again to continue: finished folds are kept and fold {fold} resumes "
            "after its last finished epoch"
        )
    missing = [name for name in CHECKPOINTS if not (fold_dir / "models" / name).is_file()]
    if missing:
        raise UserInputError(
            f"fold {fold}: training finished without {', '.join(missing)} in {fold_dir / 'models'}"
        )
    import torch  # heavy: only once a fold has trained

    state = torch.load(fold_dir / "models" / "last.pt", map_location="cpu", weights_only=True)
    best = [max((priority for priority, _ in saver["_saved"]), default=None) for saver in state["savers"]]
    summary = {
        "epochs": int(state["epoch"]),
        "best_val_auroc": best[0],
        "best_val_loss": None if best[1] is None else -best[1],
    }
    (fold_dir / "complete.json").write_text(json.dumps(summary, indent=2))


def build_network(overrides: dict[str, Any]) -> torch.nn.Module:
    """The network exactly as train.json builds it with these overrides (random weights, CPU)."""
    from monai.bundle import ConfigParser  # heavy: only when a network is built

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({**overrides, "pretrained": None, "device": "$torch.device('cpu')"})
    return parser.get_parsed_content("network_def", instantiate=True)


def _label_policy(cohort: Path) -> Any:
    """The cohort's label policy: its ``label_policy`` column (LIDC tables and phantoms carry one),
    else a JSON sidecar with a ``label_policy`` entry, else a note that none was recorded."""
    header = pd.read_csv(cohort, nrows=0).columns
    if "label_policy" in header:
        policies = pd.read_csv(cohort, usecols=["label_policy"], dtype=str)["label_policy"].dropna()
        return {"source": f"{cohort.name}: column label_policy", "policies": sorted(set(policies))}
    for sidecar in (cohort.with_suffix(".json"), cohort.parent / "phantoms.json"):
        try:
            content = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and "label_policy" in content:
            return {"source": sidecar.name, "label_policy": content["label_policy"]}
    return "not recorded (no label_policy column or JSON sidecar with the cohort CSV)"


def _versions() -> dict[str, str]:
    import monai
    import open_clip
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
    }


def crossval(
    cohort: Path,
    split_dir: Path,
    out: Path,
    *,
    work: Path | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str = "best_auroc.pt",
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
) -> Path:
    """Train, export and calibrate every fold; write the deployable bundle ``out`` (all or nothing)."""
    # absolute paths: each fold trains in a process whose working folder is the bundle
    cohort, split_dir, out = Path(cohort).resolve(), Path(split_dir).resolve(), Path(out).resolve()
    overrides = dict(overrides or {})
    if checkpoint not in CHECKPOINTS:
        raise UserInputError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got '{checkpoint}'")
    if out.exists():
        raise UserInputError(f"output bundle '{out}' already exists; choose a new --out or remove it")
    summary = validate_cohort(cohort, split_dir=split_dir)
    logger.info("%s", summary)
    records = read_cohort(cohort, require_label=True)
    available = sorted(fold for fold, _, _ in summary.folds)
    chosen = list(folds) if folds is not None else available
    unknown = sorted(set(chosen) - set(available))
    if unknown or not chosen:
        raise UserInputError(f"split folder '{split_dir}' has folds {available}; asked for {chosen}")
    plan = read_split_plan(split_dir, chosen, {r.pid for r in records})
    work = Path(work).resolve() if work is not None else out.parent / f"{out.name}.work"
    results: dict[int, dict[str, Any]] = {}
    for fold in chosen:
        fold_dir = work / f"fold_{fold}"
        if (fold_dir / "complete.json").is_file():
            logger.info("fold %d: already trained (%s)", fold, fold_dir / "complete.json")
        else:
            train_fold(fold, cohort, split_dir, fold_dir, overrides, device)
        results[fold] = json.loads((fold_dir / "complete.json").read_text())

    # heavy (torch, MONAI, open_clip): only once every fold has trained
    from scripts.deployed import FoldEnsemble
    from scripts.export import export_torchscript
    from training.model_outputs import predict_records

    with new_output_folder(out) as bundle:
        copy_bundle(bundle, exist_ok=True)
        calibrators = {}
        for index, fold in enumerate(chosen):
            target = bundle / "models" / f"fold_{index}"
            target.mkdir(parents=True)
            for name in CHECKPOINTS:
                shutil.copyfile(work / f"fold_{fold}" / "models" / name, target / name)
            export_torchscript(
                build_network(overrides),
                target / "model.ts",
                checkpoint=target / checkpoint,
                extra_metadata={"source_fold": fold, "checkpoint": checkpoint, **overrides},
            )
            val = [r for r in records if r.pid in plan.val[fold]]
            outputs = predict_records(val, FoldEnsemble.load({fold: target / "model.ts"}, device or "cpu"))
            labels = np.array([r.label for r in val])
            calibrators[index] = fit_beta_calibration(
                outputs.raw[0], labels, where=f"fold {fold} (validation)"
            )
            results[fold].update(validation_nodules=len(val), calibration=calibrators[index].to_dict())
        cohort_sha256 = sha256_of(cohort)
        save_calibration(
            bundle / "models" / CALIBRATION_FILE,
            calibrators,
            provenance={
                "fitted_on": "each fold's validation patients",
                "cohort": cohort.name,
                "cohort_sha256": cohort_sha256,
            },
        )
        record = {
            "cohort": {"file": cohort.name, "sha256": cohort_sha256, "nodules": len(records)},
            "split": {
                "folder": os.path.relpath(split_dir, cohort.parent),
                "folds": {str(f): {"train": len(plan.train[f]), "val": len(plan.val[f])} for f in chosen},
                "test_patients": len(plan.test),
            },
            "label_policy": _label_policy(cohort),
            "checkpoint_exported": checkpoint,
            "settings": overrides,
            "configs": ["configs/train.json"],
            "folds": {str(f): results[f] for f in chosen},
            "versions": _versions(),
        }
        (bundle / "models" / RECORD_FILE).write_text(json.dumps(record, indent=2))
    logger.info("wrote %s (%d fold models, calibrated)", out, len(chosen))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.crossval", description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, required=True, help="cohort CSV (with labels)")
    parser.add_argument(
        "--split-dir", type=Path, required=True, help="folder of fold_<k>/{train,val}_pid.csv"
    )
    parser.add_argument("--out", type=Path, required=True, help="the deployable bundle to write (new folder)")
    parser.add_argument("--work", type=Path, help="training folders (default OUT.work beside OUT)")
    parser.add_argument(
        "--folds", type=lambda s: [int(v) for v in s.split(",")], help="e.g. 0,1,2 (default all)"
    )
    parser.add_argument("--checkpoint", default="best_auroc.pt", choices=CHECKPOINTS)
    parser.add_argument("--model-name", help="open_clip architecture or bundle config (train.json default)")
    parser.add_argument("--pretrained", help="open_clip tag, local file, or 'none'")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: train.json's choice)")
    parser.add_argument("--override", action="append", metavar="KEY=VALUE", help="any other train.json id")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    crossval(
        args.cohort,
        args.split_dir,
        args.out,
        work=args.work,
        folds=args.folds,
        checkpoint=args.checkpoint,
        overrides=training_overrides(args),
        device=args.device,
    )


if __name__ == "__main__":
    main()
