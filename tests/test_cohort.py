"""Cohort CSV reading and validation, splits and dataset items."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from scripts.cohort import NoduleRecord, read_cohort, select
from scripts.errors import UserInputError
from scripts.split_folder import read_split

HEADER = (
    "pid,nodule_id,image_path,coordX,coordY,coordZ,malignant,nodule_consistency,nodule_margins,"
    "cyst_like_spaces,mean_diameter,level_of_suspicion_of_lung_cancer"
)
GOOD_ROWS = [
    "00123,1,img/a.nii.gz,-10.5,20.25,-30,1,Solid,Spiculated,Present,12.5,High",
    "00123,2,img/a.nii.gz,1,2,3,0,pure ground glass,,,,",
    "456,1,/abs/b.nii.gz,4,5,6,0,,Smooth,Absent,7,Low",
]


def _write(tmp_path: Path, rows: list[str], header: str = HEADER, name: str = "cohort.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(UserInputError) as info:
        read_cohort(path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_good_csv_round_trip(tmp_path: Path) -> None:
    records = read_cohort(_write(tmp_path, GOOD_ROWS))
    assert [(r.pid, r.nodule_id, r.line) for r in records] == [
        ("00123", "1", 2),
        ("00123", "2", 3),
        ("456", "1", 4),
    ]
    first = records[0]
    assert first.image_path == tmp_path / "img/a.nii.gz"
    assert first.seed_lps == (-10.5, 20.25, -30.0)
    assert first.label == 1
    assert first.semantics["nodule_consistency"] == "Solid"
    assert first.semantics["nodule_margins"] == "Spiculated/Serrated"
    assert first.semantics["cyst-like_spaces"] == "Present"  # LIDC column spelling accepted
    assert first.semantics["cavitation"] is None  # absent column -> missing
    assert len(first.semantics) == 17
    assert first.sizes["mean_diameter"] == 12.5 and first.sizes["short_diameter_(mm)"] is None
    assert first.suspicion == "High"
    assert records[1].semantics["nodule_consistency"] == "Pure ground glass"
    assert records[1].suspicion is None
    assert records[2].image_path == Path("/abs/b.nii.gz")


def test_as_item_is_collate_friendly(tmp_path: Path) -> None:
    records = read_cohort(_write(tmp_path, GOOD_ROWS))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "00123_1.txt").write_text("Impression: given.", encoding="utf-8")
    item = records[0].as_item(reports)
    assert item["image"] == str(tmp_path / "img/a.nii.gz")
    assert item["seed"].dtype == np.float32 and item["seed"].shape == (3,)
    np.testing.assert_allclose(item["seed"], [-10.5, 20.25, -30.0])
    assert item["label"] == 1 and item["pid"] == "00123" and item["nodule_id"] == "1"
    assert item["semantics"]["cavitation"] == "" and item["semantics"]["nodule_consistency"] == "Solid"
    assert math.isnan(item["sizes"]["short_diameter_(mm)"]) and item["sizes"]["mean_diameter"] == 12.5
    assert item["suspicion"] == "High" and item["report"] == "Impression: given."
    other = records[1].as_item()
    assert other["report"] == "" and other["suspicion"] == ""
    assert all(isinstance(v, str) for v in other["semantics"].values())


def test_label_optional_at_inference(tmp_path: Path) -> None:
    header = "pid,nodule_id,image_path,coordX,coordY,coordZ"
    records = read_cohort(_write(tmp_path, ["1,1,a.nii,0,0,0"], header), require_label=False)
    assert records[0].label is None and records[0].as_item()["label"] == -1
    message = _error(_write(tmp_path, ["1,1,a.nii,0,0,0"], header))
    assert "malignant" in message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.csv")
    assert "nope.csv" in message and "does not exist" in message


@pytest.mark.parametrize("content", ["", HEADER + "\n", HEADER + "\n\n\n"])
def test_empty_csv(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(content, encoding="utf-8")
    message = _error(path)
    assert "empty.csv" in message and ("empty" in message or "no rows" in message)


@pytest.mark.parametrize(
    "column", ["pid", "nodule_id", "image_path", "coordX", "coordY", "coordZ", "malignant"]
)
def test_missing_required_column(tmp_path: Path, column: str) -> None:
    names = HEADER.split(",")
    keep = [i for i, n in enumerate(names) if n != column]
    header = ",".join(names[i] for i in keep)
    rows = [",".join(r.split(",")[i] for i in keep) for r in GOOD_ROWS]
    message = _error(_write(tmp_path, rows, header))
    assert "line 1" in message and "missing required column" in message and column in message


@pytest.mark.parametrize(
    ("row", "column", "fragment"),
    [
        ("1,1,a.nii,x,0,0,0,,,,,", "coordX", "finite number"),
        ("1,1,a.nii,0,inf,0,0,,,,,", "coordY", "finite number"),
        ("1,1,a.nii,0,0,,0,,,,,", "coordZ", "finite number"),
        ("1,1,a.nii,0,0,0,2,,,,,", "malignant", "allowed: 0, 1"),
        ("1,1,a.nii,0,0,0,,,,,,", "malignant", "allowed: 0, 1"),
        (
            "1,1,a.nii,0,0,0,0,Liquid,,,,",
            "nodule_consistency",
            "allowed: Solid, Part-solid, Pure ground glass",
        ),
        ("1,1,a.nii,0,0,0,0,,Wavy,,,", "nodule_margins", "unknown value 'Wavy'"),
        ("1,1,a.nii,0,0,0,0,,,Maybe,,", "cyst-like_spaces", "allowed: Present, Absent"),
        ("1,1,a.nii,0,0,0,0,,,,-3,", "mean_diameter", "non-negative"),
        (",1,a.nii,0,0,0,0,,,,,", "pid", "empty"),
        ("1,1,,0,0,0,0,,,,,", "image_path", "empty"),
    ],
)
def test_bad_row_names_line_and_column(tmp_path: Path, row: str, column: str, fragment: str) -> None:
    message = _error(_write(tmp_path, [GOOD_ROWS[0], row]))
    assert "cohort.csv: line 3" in message
    assert f"'{column}'" in message
    assert fragment in message


def test_duplicate_nodule(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, [GOOD_ROWS[0], GOOD_ROWS[1], GOOD_ROWS[0]]))
    assert "line 4" in message and "duplicate" in message and "line 2" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    rows = [
        "1,1,a.nii,x,0,0,0,,,,,",
        "1,2,a.nii,0,0,0,7,,,,,",
        "1,3,a.nii,0,0,0,0,Liquid,,,,",
        "1,3,a.nii,0,0,0,0,,,,,",
    ]
    message = _error(_write(tmp_path, rows))
    assert "4 problem(s)" in message
    for fragment in (
        "line 2",
        "'coordX'",
        "line 3",
        "'malignant'",
        "line 4",
        "'nodule_consistency'",
        "line 5",
    ):
        assert fragment in message


def test_missing_column_and_bad_rows_reported_together(tmp_path: Path) -> None:
    header = "pid,nodule_id,image_path,coordX,coordY,malignant,nodule_shape"
    message = _error(_write(tmp_path, ["1,1,a.nii,0,0,0,Star"], header))
    assert "coordZ" in message and "'nodule_shape'" in message and "line 2" in message


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join([HEADER, GOOD_ROWS[0], "", "1,1,a.nii,0,0,0,5,,,,,"]) + "\n", encoding="utf-8")
    assert "line 4" in _error(path)


def test_check_images(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.nii.gz").write_bytes(b"")
    path = _write(tmp_path, GOOD_ROWS[:2])
    assert len(read_cohort(path, check_images=True)) == 2
    message = _error(_write(tmp_path, GOOD_ROWS, name="c2.csv"), check_images=True)
    assert "line 4" in message and "'image_path'" in message and "/abs/b.nii.gz" in message


def _split(tmp_path: Path, train: list[str], val: list[str]) -> Path:
    fold = tmp_path / "splits" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "train_pid.csv").write_text("pid\n" + "\n".join(train) + "\n", encoding="utf-8")
    (fold / "val_pid.csv").write_text("pid\n" + "\n".join(val) + "\n", encoding="utf-8")
    return tmp_path / "splits"


def test_read_split_and_select(tmp_path: Path) -> None:
    train, val = read_split(_split(tmp_path, ["00123"], ["456"]), 0)
    assert train == {"00123"} and val == {"456"}
    records = read_cohort(_write(tmp_path, GOOD_ROWS))
    assert [r.line for r in select(records, train)] == [2, 3]
    assert [r.pid for r in select(records, val)] == ["456"]
    assert all(isinstance(r, NoduleRecord) for r in select(records, train | val))


def test_read_split_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="fold_3"):
        read_split(tmp_path, 3)
    splits = _split(tmp_path, ["1", "2"], ["2"])
    with pytest.raises(UserInputError, match="both train and val"):
        read_split(splits, 0)
    (splits / "fold_0" / "val_pid.csv").write_text("patient\n9\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="'pid'"):
        read_split(splits, 0)
    (splits / "fold_0" / "val_pid.csv").unlink()
    with pytest.raises(UserInputError, match=r"val_pid\.csv"):
        read_split(splits, 0)
