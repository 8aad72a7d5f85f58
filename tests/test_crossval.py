"""Cross-validation: the bundle's train.json per fold, export, per-fold beta calibration, one bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from deploy_app.inference import BundleModels
from scripts.calibration import load_calibration
from scripts.deployed import FoldEnsemble
from scripts.errors import UserInputError
from training.crossval import crossval
from training.model_outputs import predict_records
from training.splits import make_splits, patient_labels, write_splits
from training.synthetic import write_synthetic_cohort

TINY = {"model_name": "lnsc-tiny-vit", "pretrained": "none", "epochs": 1, "num_workers": 0, "batch_size": 4}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cv")
    csv_path = write_synthetic_cohort(root / "data", n_patients=12, nodules_per_patient=1, seed=5)
    splits, test = make_splits(patient_labels(csv_path), n_folds=2, seed=0)
    return csv_path, write_splits(splits, test, root / "splits")


@pytest.fixture(scope="module")
def bundle(cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("out")
    here = Path.cwd()
    os.chdir(root)  # relative paths, as a user types them (each fold trains from the bundle folder)
    try:
        relative = [Path(os.path.relpath(p, root)) for p in cohort]
        return crossval(relative[0], relative[1], Path("bundle"), overrides=TINY).resolve()
    finally:
        os.chdir(here)


@pytest.mark.slow
def test_bundle_holds_every_fold_calibrated_and_recorded(bundle: Path, cohort) -> None:
    for fold in (0, 1):
        for name in ("model.ts", "best_auroc.pt", "best_loss.pt"):
            assert (bundle / "models" / f"fold_{fold}" / name).is_file()
    calibrators = load_calibration(bundle / "models" / "calibration.json")
    assert sorted(calibrators) == [0, 1]
    record = json.loads((bundle / "models" / "crossval_record.json").read_text())
    assert record["settings"]["model_name"] == "lnsc-tiny-vit"
    assert record["cohort"]["nodules"] == 12 and len(record["cohort"]["sha256"]) == 64
    assert set(record["folds"]) == {"0", "1"} and record["folds"]["0"]["epochs"] == 1
    assert record["folds"]["1"]["validation_nodules"] + record["folds"]["0"]["validation_nodules"] == 12
    models = BundleModels.load(bundle)
    assert models.info.folds == 2 and models.info.calibrated and not models.info.untrained_demo


@pytest.mark.slow
def test_calibration_was_fitted_on_that_folds_validation_predictions(bundle: Path, cohort) -> None:
    from scripts.calibration import fit_beta_calibration
    from scripts.cohort import read_cohort
    from scripts.split_folder import read_split

    records = read_cohort(cohort[0])
    calibrators = load_calibration(bundle / "models" / "calibration.json")
    for fold in (0, 1):
        _, val = read_split(cohort[1], fold)
        chosen = [r for r in records if r.pid in val]
        model = FoldEnsemble.load({fold: bundle / "models" / f"fold_{fold}" / "model.ts"}, "cpu")
        raw = predict_records(chosen, model).raw[0]
        expected = fit_beta_calibration(raw, np.array([r.label for r in chosen]))
        probe = np.linspace(0.05, 0.95, 7)
        np.testing.assert_allclose(calibrators[fold](probe), expected(probe), atol=1e-6)


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.mark.slow
def test_the_shipped_records_hold_no_path_of_the_training_machine(bundle: Path, cohort) -> None:
    models = bundle / "models"
    for name in ("crossval_record.json", "calibration.json"):
        absolute = [
            text for text in _strings(json.loads((models / name).read_text())) if Path(text).is_absolute()
        ]
        assert not absolute, f"{name}: {absolute}"
    record = json.loads((models / "crossval_record.json").read_text())
    csv_path, split_dir = (p.resolve() for p in cohort)
    assert record["cohort"]["file"] == csv_path.name
    assert (csv_path.parent / record["split"]["folder"]).resolve() == split_dir
    provenance = json.loads((models / "calibration.json").read_text())["provenance"]
    assert provenance["cohort_sha256"] == record["cohort"]["sha256"]


def test_the_committed_demo_records_hold_no_absolute_path() -> None:
    from training.demo_bundle import DEMO_MODEL

    for name in ("crossval_record.json", "calibration.json"):
        absolute = [
            text for text in _strings(json.loads((DEMO_MODEL / name).read_text())) if Path(text).is_absolute()
        ]
        assert not absolute, f"{name}: {absolute}"


def test_calibration_provenance_with_an_absolute_path_is_refused(tmp_path: Path) -> None:
    from scripts.calibration import BetaCalibration, save_calibration

    target = tmp_path / "calibration.json"
    with pytest.raises(ValueError, match="absolute path"):
        save_calibration(target, {0: BetaCalibration(1.0, 1.0, 0.0)}, {"cohort": {"path": str(tmp_path)}})
    assert not target.exists()


@pytest.mark.slow
def test_finished_folds_are_kept_and_changed_settings_refused(bundle: Path, cohort, tmp_path: Path) -> None:
    work = bundle.parent / "bundle.work"
    assert (work / "fold_0" / "complete.json").is_file()
    again = crossval(cohort[0], cohort[1], tmp_path / "again", work=work, folds=[1], overrides=TINY)
    assert (again / "models" / "fold_0" / "model.ts").is_file()  # fold 1 renumbered as the only fold
    (work / "fold_0" / "complete.json").unlink()  # as if fold 0 had been interrupted
    with pytest.raises(UserInputError, match="other settings"):
        crossval(cohort[0], cohort[1], tmp_path / "other", work=work, overrides={**TINY, "epochs": 2})
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_bad_inputs_are_refused_before_training(bundle: Path, cohort, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="already exists"):
        crossval(cohort[0], cohort[1], bundle, overrides=TINY)
    with pytest.raises(UserInputError, match="folds"):
        crossval(cohort[0], cohort[1], tmp_path / "x", folds=[7], overrides=TINY)
    stranger = tmp_path / "splits"
    (stranger / "fold_0").mkdir(parents=True)
    (stranger / "fold_0" / "train_pid.csv").write_text("pid\nNOBODY\n")
    (stranger / "fold_0" / "val_pid.csv").write_text("pid\nSYN0000\n")
    with pytest.raises(UserInputError):
        crossval(cohort[0], stranger, tmp_path / "y", overrides=TINY)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
