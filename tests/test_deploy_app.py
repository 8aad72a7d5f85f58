"""The deploy app end to end: DICOM CT + seeds SR in, SR + PDF + SC out; bad inputs; the CLI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import RLELossless

from conftest import REPO_ROOT
from demo.study import write_demo_study
from deploy_app.__main__ import EXIT_INPUT, EXIT_OK, EXIT_PARTIAL
from deploy_app.__main__ import main as cli_main
from deploy_app.app import process_folder
from deploy_app.findings import NoduleSeed
from deploy_app.inference import BundleModels
from deploy_app.sr_reader import read_measurement_report
from scripts.calibration import BetaCalibration, save_calibration
from scripts.errors import UserInputError
from scripts.transforms import LoadCT, nine_planes_for_seeds
from training.demo_bundle import build_untrained_bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # folds as LoRA cross-validation leaves them: one backbone, which the app keeps once
    return build_untrained_bundle(tmp_path_factory.mktemp("bundle") / "bundle", folds=2, shared_backbone=True)


@pytest.fixture(scope="module")
def models(bundle: Path) -> BundleModels:
    return BundleModels.load(bundle)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("study") / "in"
    return folder, write_demo_study(folder, seed=3, n_nodules=3)


def copy_study(study, target: Path) -> Path:
    shutil.copytree(study[0], target)
    return target


def test_sr_holds_the_models_output_for_every_seed(study, models: BundleModels, tmp_path: Path) -> None:
    folder, demo = study
    outcome = process_folder(folder, tmp_path / "out", models=models)
    assert not outcome.failures
    series_uid = demo.series.series_instance_uid
    written = {path.name for path in outcome.written[series_uid]}
    assert written == {
        "sr.dcm",
        "report_pdf.dcm",
        "report.pdf",
        "nodule_1_sc.dcm",
        "nodule_2_sc.dcm",
        "nodule_3_sc.dcm",
    }
    nodules = read_measurement_report(tmp_path / "out" / series_uid / "sr.dcm")
    assert [n.label for n in nodules] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    # the same numbers as the bundle's own loader + preprocessing + both folds, averaged
    volume = LoadCT()(str(demo.series.directory))
    planes = nine_planes_for_seeds(volume, [seed.position_lps for seed in demo.seeds])
    expected = np.mean([p(planes)["malignancy"].numpy() for p in models.predictors], axis=0)
    np.testing.assert_allclose([n.malignancy for n in nodules], expected, atol=1e-5)
    for nodule, seed in zip(nodules, demo.seeds, strict=True):
        np.testing.assert_allclose(nodule.position_lps, seed.position_lps, atol=1e-3)
        assert nodule.frame_of_reference_uid == demo.series.frame_of_reference_uid
        assert len(nodule.semantic) == 17
    result = outcome.results[series_uid]
    assert result.model.untrained_demo and result.model.folds == 2
    assert all(len(n.attention) == 9 and abs(sum(n.attention) - 1) < 1e-5 for n in result.nodules)
    sr = pydicom.dcmread(tmp_path / "out" / series_uid / "sr.dcm")
    ct = pydicom.dcmread(demo.series.files[0], stop_before_pixels=True)
    assert sr.StudyInstanceUID == ct.StudyInstanceUID and sr.PatientID == ct.PatientID


def test_calibrators_in_the_bundle_are_applied_per_fold(study, bundle: Path, tmp_path: Path) -> None:
    calibrated = shutil.copytree(bundle, tmp_path / "bundle")
    calibrators = {0: BetaCalibration(1.2, 0.8, 0.3), 1: BetaCalibration(0.9, 1.1, -0.2)}
    save_calibration(calibrated / "models" / "calibration.json", calibrators, provenance={"test": True})
    models = BundleModels.load(calibrated)
    assert models.info.calibrated
    outcome = process_folder(study[0], tmp_path / "out", models=models)
    result = next(iter(outcome.results.values()))
    for nodule in result.nodules:
        folds = [calibrators[k](np.array([p]))[0] for k, p in enumerate(nodule.malignancy_per_fold)]
        assert nodule.malignancy == pytest.approx(float(np.mean(folds)), abs=1e-6)


def test_two_studies_one_bad_the_other_still_analysed(study, models: BundleModels, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    copy_study(study, inputs / "good")
    other = write_demo_study(inputs / "bad", seed=11, n_nodules=1, seed_sr=False, patient_id="PHANTOM-B")
    outcome = process_folder(inputs, tmp_path / "out", models=models)
    assert list(outcome.written) == [study[1].series.series_instance_uid]
    assert len(outcome.failures) == 1
    assert other.series.series_instance_uid in outcome.failures[0].series
    assert "no nodule seeds" in outcome.failures[0].message or "seed" in outcome.failures[0].message


def _slices(folder: Path) -> list[Path]:
    return sorted((folder / "ct").glob("*.dcm"))


def _edit_slices(folder: Path, edit) -> None:
    for index, path in enumerate(_slices(folder)):
        dataset = pydicom.dcmread(path)
        if edit(index, dataset, path) is not False:
            dataset.save_as(path)


def break_study(kind: str, folder: Path) -> None:
    """Damage a copy of the demo study in one way."""
    if kind == "single slice":
        for path in _slices(folder)[1:]:
            path.unlink()
    elif kind == "missing slice":
        _slices(folder)[20].unlink()
    elif kind == "duplicate slice":
        source = pydicom.dcmread(_slices(folder)[10])
        source.SOPInstanceUID = pydicom.uid.generate_uid()
        source.save_as(folder / "ct" / "duplicate.dcm")
    elif kind == "uneven spacing":

        def shift(index, dataset, _):
            if index >= 30:
                dataset.ImagePositionPatient[2] += 0.7

        _edit_slices(folder, shift)
    elif kind == "not axial":

        def sagittal(_, dataset, __):
            dataset.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

        _edit_slices(folder, sagittal)
    elif kind == "corrupt pixel data":

        def truncate(index, dataset, _):
            if index == 5:
                dataset.PixelData = dataset.PixelData[:100]
            else:
                return False

        _edit_slices(folder, truncate)
    elif kind == "no CT":
        shutil.rmtree(folder / "ct")
        (folder / "notes.txt").write_text("not DICOM")
    elif kind == "seeds outside":
        (folder / "seeds_sr.dcm").unlink()
        (folder / "seeds.csv").write_text("x,y,z\n900,900,900\n")
    elif kind == "other frame of reference":
        sr = pydicom.dcmread(folder / "seeds_sr.dcm")

        def move(_, element):
            if element.keyword == "ReferencedFrameOfReferenceUID":
                element.value = "1.2.826.0.1.3680043.8.498.1"

        sr.walk(move)
        sr.save_as(folder / "seeds_sr.dcm")
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("single slice", r"has 1 slice\(s\); at least 16"),
        ("missing slice", "missing slice"),
        ("uneven spacing", "uneven slice spacing"),
        ("not axial", "is not axial"),
        ("corrupt pixel data", "instance 6 .*pixel data cannot be decoded"),
        ("no CT", "no CT series"),
        ("seeds outside", "outside the scan"),
        ("other frame of reference", "frame of reference"),
    ],
)
def test_bad_series_fail_with_a_message_and_write_nothing(
    study, models: BundleModels, tmp_path: Path, kind: str, message: str
) -> None:
    folder = copy_study(study, tmp_path / "in")
    break_study(kind, folder)
    outcome = process_folder(folder, tmp_path / "out", models=models)
    assert not outcome.written
    assert len(outcome.failures) == 1
    assert __import__("re").search(message, outcome.failures[0].message), outcome.failures[0].message
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_a_resent_duplicate_slice_is_dropped_and_logged(
    study, models: BundleModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The SDK loader keeps one instance per position (the higher AcquisitionNumber) and logs it.
    folder = copy_study(study, tmp_path / "in")
    break_study("duplicate slice", folder)
    with caplog.at_level(logging.INFO, logger="monai.deploy.operators.dicom_data_loader_operator"):
        outcome = process_folder(folder, tmp_path / "out", models=models)
    assert not outcome.failures and len(outcome.written) == 1
    assert "Duplicate spatial coordinates detected" in caplog.text


def test_non_dicom_files_beside_the_study_are_ignored(study, models: BundleModels, tmp_path: Path) -> None:
    folder = copy_study(study, tmp_path / "in")
    (folder / "README.txt").write_text("hello")
    (folder / "ct" / "thumbs.db").write_bytes(os.urandom(300))
    outcome = process_folder(folder, tmp_path / "out", models=models)
    assert not outcome.failures and len(outcome.written) == 1


def test_rle_compressed_series_is_decoded(study, models: BundleModels, tmp_path: Path) -> None:
    folder = copy_study(study, tmp_path / "in")

    def compress(_, dataset, __):
        dataset.compress(RLELossless)

    _edit_slices(folder, compress)
    outcome = process_folder(folder, tmp_path / "out", models=models)
    assert not outcome.failures
    reference = process_folder(study[0], tmp_path / "reference", models=models)
    uid = study[1].series.series_instance_uid
    assert [n.malignancy for n in outcome.results[uid].nodules] == pytest.approx(
        [n.malignancy for n in reference.results[uid].nodules], abs=1e-6
    )


def test_undecodable_transfer_syntax_is_named(study, models: BundleModels, tmp_path: Path) -> None:
    folder = copy_study(study, tmp_path / "in")

    def fake_jpeg2000(index, dataset, _):
        if index != 3:
            return False
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
        dataset.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + os.urandom(64)])
        dataset["PixelData"].VR = "OB"

    _edit_slices(folder, fake_jpeg2000)
    outcome = process_folder(folder, tmp_path / "out", models=models)
    assert len(outcome.failures) == 1
    assert "JPEG 2000" in outcome.failures[0].message and "instance 4" in outcome.failures[0].message


@pytest.mark.parametrize("problem", ["empty input", "missing input", "no model", "unwritable output"])
def test_unusable_folders_are_user_errors(study, bundle: Path, tmp_path: Path, problem: str) -> None:
    inputs, output, model = study[0], tmp_path / "out", bundle
    if problem == "empty input":
        inputs = tmp_path / "empty"
        inputs.mkdir()
    elif problem == "missing input":
        inputs = tmp_path / "nowhere"
    elif problem == "no model":
        model = shutil.copytree(bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("*.ts"))
    elif problem == "unwritable output":
        output.mkdir()
        output.chmod(0o500)
        if os.access(output, os.W_OK):  # root ignores permissions
            output = tmp_path / "file"
            output.write_text("")
    with pytest.raises(UserInputError) as error:
        process_folder(inputs, output, model)
    assert {"empty input": "is empty", "missing input": "does not exist", "no model": "no exported model",
            "unwritable output": "not writable"}[problem] in str(error.value)  # fmt: skip


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "deploy_app", *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )


def test_the_command_line_runs_as_a_process(study, bundle: Path, tmp_path: Path) -> None:
    """The one subprocess run of ``python -m deploy_app``; the other cases call ``main()`` in-process."""
    result = run_cli("-i", str(study[0]), "-o", str(tmp_path / "a"), "-m", str(bundle))
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    assert "UNTRAINED DEMO MODEL" in result.stdout and "Nodule 3" in result.stdout
    assert (tmp_path / "a" / study[1].series.series_instance_uid / "sr.dcm").is_file()


def test_the_holoscan_variables_stand_for_the_arguments(
    study, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOLOSCAN_INPUT_PATH", str(study[0]))
    monkeypatch.setenv("HOLOSCAN_OUTPUT_PATH", str(tmp_path / "b"))
    monkeypatch.setenv("HOLOSCAN_MODEL_PATH", str(bundle))
    assert cli_main([]) == EXIT_OK
    assert (tmp_path / "b" / study[1].series.series_instance_uid / "sr.dcm").is_file()


def test_cli_exit_codes_for_bad_and_partial_input(
    study, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["-i", str(empty), "-o", str(tmp_path / "out"), "-m", str(bundle)]) == EXIT_INPUT
    assert "error: input folder" in capsys.readouterr().err
    inputs = tmp_path / "two"
    copy_study(study, inputs / "good")
    write_demo_study(inputs / "bad", seed=12, n_nodules=1, seed_sr=False, patient_id="PHANTOM-C")
    assert cli_main(["-i", str(inputs), "-o", str(tmp_path / "out2"), "-m", str(bundle)]) == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "error: series" in err and "seed" in err, err


@pytest.mark.slow
def test_app_yaml_parses_and_the_staged_map_folder_runs(tmp_path: Path) -> None:
    from holoscan_cli.packager.config_reader import ApplicationConfiguration

    from deploy_app.map_stage import stage

    config = ApplicationConfiguration()
    config.read(REPO_ROOT / "deploy_app" / "app.yaml")
    assert (
        config.title() == json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())["name"]
    )
    folder = stage(tmp_path / "map")
    for name in (
        "__main__.py",
        "requirements.txt",
        "deploy_app/app.yaml",
        "deploy_app/series_rules.json",
        "bundle/scripts/transforms.py",
        "bundle/configs/metadata.json",
    ):
        assert (folder / name).is_file(), name  # fmt: skip
    assert not (folder / "bundle" / "models").exists()
    assert not (folder / "training").exists(), "a MAP ships no training code"
    environment = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(folder), "--help"], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0 and "HOLOSCAN_INPUT_PATH" in result.stdout, result.stderr[-2000:]


def test_seeds_of_a_plugged_detector_are_used(study, models: BundleModels, tmp_path: Path) -> None:
    class CentreDetector:
        name = "test detector"

        def find(self, input_dir, ct):
            centre = np.mean(np.asarray(ct.extent_lps), axis=0)
            return [NoduleSeed(tuple(float(v) for v in centre), "Detected 1", "test detector")]

    folder = copy_study(study, tmp_path / "in")
    (folder / "seeds_sr.dcm").unlink()
    outcome = process_folder(folder, tmp_path / "out", models=models, seed_sources=[CentreDetector()])
    result = next(iter(outcome.results.values()))
    assert [n.seed.label for n in result.nodules] == ["Detected 1"]
    assert torch.is_tensor(torch.as_tensor(result.nodules[0].planes))
