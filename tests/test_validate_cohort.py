"""Cohort validation before training: every problem of the CSV, its images, seeds and split at once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scripts.cohort import CohortSummary, validate_cohort
from scripts.errors import UserInputError, find_user_error
from training import validate_cohort as cli
from training.synthetic import write_synthetic_cohort


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 patients x 2 nodules, NIfTI phantoms, split fold_0 (2 train / 2 val patients)."""
    return write_synthetic_cohort(tmp_path_factory.mktemp("synthetic"), n_patients=4, nodules_per_patient=2)


@pytest.fixture()
def cohort(pristine: Path, tmp_path: Path) -> Path:
    """A private copy to spoil."""
    shutil.copytree(pristine.parent, tmp_path / "cohort")
    return tmp_path / "cohort" / "cohort.csv"


def _edit(csv_path: Path, line: int, **cells: str) -> None:
    """Set cells of the row on file line ``line`` (the header is line 1)."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    for column, value in cells.items():
        table.loc[line - 2, column] = value
    table.to_csv(csv_path, index=False)


def _problems(csv_path: Path, **kwargs: object) -> str:
    with pytest.raises(UserInputError) as info:
        validate_cohort(csv_path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_good_cohort_passes(cohort: Path) -> None:
    summary = validate_cohort(cohort, split_dir=cohort.parent / "splits", fold=0)
    assert isinstance(summary, CohortSummary)
    assert (summary.rows, summary.patients, summary.images) == (8, 4, 4)
    assert summary.labels == {"0": 4, "1": 4, "unlabelled": 0}
    assert summary.folds == ((0, 2, 2),)
    assert str(summary).startswith("cohort.csv: OK: 8 rows, 4 patients, labels 0: 4, 1: 4")


def test_unknown_semantic_value(cohort: Path) -> None:
    _edit(cohort, 3, nodule_shape="Squarish")
    message = _problems(cohort)
    assert "1 problem(s)" in message
    assert "line 3: column 'nodule_shape' has unknown value 'Squarish'" in message
    assert "Round, Ovoid, Polygonal, Complex/Irregular" in message


def test_missing_column(cohort: Path) -> None:
    pd.read_csv(cohort, dtype=str).drop(columns=["coordZ"]).to_csv(cohort, index=False)
    message = _problems(cohort)
    assert "line 1: missing required column(s): coordZ" in message


def test_missing_image(cohort: Path) -> None:
    _edit(cohort, 4, image_path="images/nowhere.nii.gz")
    message = _problems(cohort)
    assert "line 4: column 'image_path' ('images/nowhere.nii.gz')" in message
    assert "no such file or folder" in message


def test_image_that_does_not_load(cohort: Path) -> None:
    garbage = cohort.parent / "images" / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a NIfTI file" * 10)
    _edit(cohort, 5, image_path="images/garbage.nii.gz")
    _edit(cohort, 6, image_path="images/garbage.nii.gz")
    message = _problems(cohort)
    assert "1 problem(s)" in message  # the image is loaded (and reported) once for both rows
    assert "lines 5, 6: column 'image_path' ('images/garbage.nii.gz')" in message
    assert "cannot read it" in message


def test_seed_outside_the_image(cohort: Path) -> None:
    table = pd.read_csv(cohort, dtype=str)
    _edit(cohort, 7, coordX=str(float(table.loc[5, "coordX"]) + 500.0))
    message = _problems(cohort)
    assert "line 7: " in message and "lies outside the scan" in message
    assert validate_cohort(cohort, check_images=False).rows == 8  # only the image check sees it


def test_split_pid_not_in_the_csv(cohort: Path) -> None:
    train = cohort.parent / "splits" / "fold_0" / "train_pid.csv"
    train.write_text(train.read_text() + "GHOST01\n")
    message = _problems(cohort, split_dir=cohort.parent / "splits", fold=0)
    assert f"{train}: 1 patient id(s) not in cohort.csv: line 4 'GHOST01'" in message


def test_patient_in_train_and_val(cohort: Path) -> None:
    fold = cohort.parent / "splits" / "fold_0"
    (fold / "train_pid.csv").write_text("pid\nSYN0002\nSYN0003\nSYN0000\n")
    message = _problems(cohort, split_dir=cohort.parent / "splits")  # every fold_* when fold is None
    expected = "1 patient(s) in both train and val: 'SYN0000' (train_pid.csv line 4, val_pid.csv line 2)"
    assert expected in message


def test_missing_fold_folder(cohort: Path) -> None:
    message = _problems(cohort, split_dir=cohort.parent / "splits", fold=3)
    assert "fold_3' does not exist" in message


def test_every_problem_in_one_run(cohort: Path) -> None:
    (cohort.parent / "images" / "garbage.nii.gz").write_bytes(b"\x00\x01garbage")
    table = pd.read_csv(cohort, dtype=str)
    _edit(cohort, 2, nodule_consistency="Gelatinous")
    _edit(cohort, 3, image_path="images/nowhere.nii.gz", nodule_shape="Squarish")
    _edit(cohort, 5, coordY=str(float(table.loc[3, "coordY"]) - 900.0))
    _edit(cohort, 7, coordZ="not a number")
    _edit(cohort, 8, image_path="images/garbage.nii.gz")
    split = cohort.parent / "splits" / "fold_0"
    (split / "val_pid.csv").write_text("pid\nSYN0000\nSYN0002\nNOBODY\n")
    message = _problems(cohort, split_dir=cohort.parent / "splits", fold=0)
    expected = [
        "line 2: column 'nodule_consistency' has unknown value 'Gelatinous'",
        "line 3: column 'nodule_shape' has unknown value 'Squarish'",
        "line 3: column 'image_path' ('images/nowhere.nii.gz')",
        "line 5: ",
        "line 7: column 'coordZ' must be a finite number",
        "line 8: column 'image_path' ('images/garbage.nii.gz')",
        "1 patient id(s) not in cohort.csv: line 4 'NOBODY'",
        "1 patient(s) in both train and val: 'SYN0002'",
    ]
    positions = [message.find(fragment) for fragment in expected]
    assert all(p >= 0 for p in positions), message
    assert positions == sorted(positions)  # rows in file order, then the split
    assert "8 problem(s)" in message
    assert "lies outside the scan" in message


def test_cli_ok_and_error(cohort: Path, capsys: pytest.CaptureFixture) -> None:
    summary = cli.main([str(cohort), "--split-dir", str(cohort.parent / "splits"), "--fold", "0"])
    assert summary.rows == 8
    assert capsys.readouterr().out.strip() == str(summary)
    _edit(cohort, 2, malignant="maybe")
    with pytest.raises(SystemExit) as info:
        cli.main([str(cohort), "--no-images"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cohort.csv: 1 problem(s)") and "line 2: column 'malignant'" in err
    assert "Traceback" not in err


def test_unlabelled_cohort_for_inference(cohort: Path) -> None:
    _edit(cohort, 2, malignant="")
    assert "line 2: column 'malignant' is empty" in _problems(cohort, check_images=False)
    summary = validate_cohort(cohort, check_images=False, require_label=False)
    assert summary.labels["unlabelled"] == 1 and "unlabelled: 1" in str(summary)
    assert "not checked" in str(summary)


def test_dicom_series_folder_images(tmp_path: Path) -> None:
    from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

    geometry = CTGeometry(
        shape=(6, 12, 10), pixel_spacing=(0.8, 0.7), slice_spacing=2.0, origin_lps=(-3.0, -4.0, 50.0)
    )
    write_ct_series(
        np.full(geometry.shape, -700, dtype=np.int16),
        geometry,
        tmp_path / "series",
        patient=SyntheticPatient("PHANTOM"),
        uid_seed="validate",
    )
    inside = geometry.index_to_lps((2.5, 5.0, 4.0))
    outside = geometry.index_to_lps((9.0, 5.0, 4.0))  # three slices beyond the last
    rows = [
        ("P1", 0, *inside, 1),
        ("P1", 1, *outside, 0),
    ]
    table = pd.DataFrame(rows, columns=["pid", "nodule_id", "coordX", "coordY", "coordZ", "malignant"])
    table.insert(2, "image_path", "series")
    csv_path = tmp_path / "dicom.csv"
    table.to_csv(csv_path, index=False)
    message = _problems(csv_path)
    assert "1 problem(s)" in message and "line 3: pid P1 nodule 1: seed" in message
    table.iloc[:1].to_csv(csv_path, index=False)
    assert validate_cohort(csv_path).images == 1


def test_train_config_validates_the_cohort_first(cohort: Path) -> None:
    """``monai.bundle run`` with train.json runs validate_cohort in "initialize", before any dataset."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    _edit(cohort, 4, nodule_shape="Squarish")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(cohort.parent), "dataset_csv": str(cohort)})
    parser["split_dir"] = str(cohort.parent / "splits")
    assert any("validate_cohort" in str(item) for item in parser["initialize"])
    with pytest.raises(Exception) as info:  # MONAI wraps what an expression raises
        parser.get_parsed_content("initialize")
    user_error = find_user_error(info.value)
    assert user_error is not None
    assert "line 4: column 'nodule_shape' has unknown value 'Squarish'" in str(user_error)


def test_header_only_csv(cohort: Path) -> None:
    cohort.write_text(cohort.read_text().splitlines()[0] + "\n")
    message = _problems(cohort, split_dir=cohort.parent / "splits", fold=0)
    assert message == "cohort.csv: the cohort CSV has a header but no rows"
