"""Opening a deployed bundle: identity, fold predictors, calibration against the folds, the ensemble."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.calibration import BetaCalibration, save_calibration
from scripts.deployed import UNKNOWN_IDENTITY, BundleIdentity, DeployedBundle, read_bundle_identity
from scripts.errors import UserInputError
from scripts.export import load_exported
from training.demo_bundle import build_untrained_bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CALIBRATORS = {0: BetaCalibration(1.2, 0.8, 0.3), 1: BetaCalibration(0.9, 1.1, -0.2)}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_untrained_bundle(tmp_path_factory.mktemp("deployed") / "bundle", folds=2)


@pytest.fixture(scope="module")
def planes() -> torch.Tensor:
    return torch.randn(3, 9, 3, 224, 224, generator=torch.Generator().manual_seed(11))


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return shutil.copytree(bundle, tmp_path / "bundle")


def test_open_reads_identity_folds_layout_and_no_calibration(bundle: Path) -> None:
    opened = DeployedBundle.open(bundle, "cpu")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert opened.identity == BundleIdentity(metadata["name"], metadata["version"])
    assert opened.ensemble.folds == (0, 1) and len(opened.ensemble.modules) == 2
    assert opened.ensemble.calibrators is None
    assert opened.ensemble.device == torch.device("cpu")
    assert opened.untrained_demo
    assert len(opened.ensemble.semantic_columns) == 39
    assert "nodule_margins=Spiculated/Serrated" in opened.ensemble.semantic_columns


def test_a_missing_identity_is_a_clear_error_unless_tolerated(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _copy(bundle, tmp_path)
    (broken / "configs" / "metadata.json").unlink()
    with pytest.raises(UserInputError, match=r"metadata\.json' is missing or has no name/version"):
        DeployedBundle.open(broken, "cpu")
    with caplog.at_level(logging.WARNING, logger="scripts.deployed"):
        assert read_bundle_identity(broken, required=False) == UNKNOWN_IDENTITY
    assert "bundle name and version unknown" in caplog.text
    (broken / "configs" / "metadata.json").write_text(json.dumps({"name": "only a name"}))
    with pytest.raises(UserInputError, match="no name/version"):
        read_bundle_identity(broken)


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        ((0,), r"no calibration map for fold\(s\) 1 \(the bundle's models are fold\(s\) 0, 1\)"),
        ((0, 1, 2), r"maps for fold\(s\) 2 that have no model"),
    ],
)
def test_a_calibration_that_does_not_match_the_folds_is_refused(
    bundle: Path, tmp_path: Path, folds: tuple[int, ...], message: str
) -> None:
    mismatched = _copy(bundle, tmp_path)
    maps = {fold: BetaCalibration(1.0, 1.0, 0.1 * fold) for fold in folds}
    save_calibration(mismatched / "models" / "calibration.json", maps)
    with pytest.raises(UserInputError, match=message):
        DeployedBundle.open(mismatched, "cpu")


def test_the_ensemble_is_the_mean_of_the_folds(bundle: Path, planes: torch.Tensor) -> None:
    outputs = DeployedBundle.open(bundle, "cpu").ensemble.predict(planes)
    with torch.no_grad():
        folds = [load_exported(path)[0](planes) for path in sorted(bundle.glob("models/fold_*/model.ts"))]
    per_fold = np.stack([fold["malignancy"].numpy() for fold in folds])
    np.testing.assert_array_equal(outputs.per_fold, per_fold)
    np.testing.assert_array_equal(outputs.ensemble, per_fold.astype(np.float64).mean(axis=0))
    assert outputs.calibrated_per_fold is None and outputs.calibrated_ensemble is None
    np.testing.assert_array_equal(outputs.malignancy, outputs.ensemble)
    for key in ("semantic", "attention"):
        expected = np.mean([fold[key].numpy() for fold in folds], axis=0)
        np.testing.assert_allclose(getattr(outputs, key), expected, rtol=0, atol=1e-6)
    assert outputs.semantic.shape == (3, 39) and outputs.attention.shape == (3, 9)


def test_a_calibrated_ensemble_is_the_mean_of_each_folds_calibrated_probability(
    bundle: Path, tmp_path: Path, planes: torch.Tensor
) -> None:
    calibrated = _copy(bundle, tmp_path)
    save_calibration(calibrated / "models" / "calibration.json", CALIBRATORS)
    opened = DeployedBundle.open(calibrated, "cpu")
    assert opened.ensemble.calibrators == CALIBRATORS
    outputs = opened.ensemble.predict(planes)
    expected = np.stack([CALIBRATORS[fold](row) for fold, row in enumerate(outputs.per_fold)])
    np.testing.assert_array_equal(outputs.calibrated_per_fold, expected)
    np.testing.assert_array_equal(outputs.malignancy, expected.mean(axis=0))
    uncalibrated = DeployedBundle.open(bundle, "cpu").ensemble.predict(planes)
    np.testing.assert_array_equal(outputs.per_fold, uncalibrated.per_fold)
