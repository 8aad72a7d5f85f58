"""Nodule seeds from the input folder: SR (SCOORD3D and 2D SCOORD), SEG, seeds.csv/json, precedence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from deploy_app import dicom_io
from deploy_app.dicom_io import write_dataset
from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed, SeriesResult
from deploy_app.seeds import (
    DEFAULT_SOURCES,
    SR_STORAGE_CLASSES,
    CTSeriesInfo,
    ImagePlane,
    SeedSource,
    find_seeds,
)
from deploy_app.sr import build_measurement_report, build_seed_sr
from deploy_app.volume import check_series_geometry
from scripts.errors import UserInputError
from scripts.geometry import volume_extent_lps
from scripts.transforms import LoadCT, SeedROICrop
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

#: rows along y 0.8 mm, columns along x 0.7 mm: a row/column or spacing swap moves every point
GEOMETRY = CTGeometry(
    shape=(12, 24, 28), pixel_spacing=(0.8, 0.7), slice_spacing=2.5, origin_lps=(-9.0, -8.0, -12.0)
)
INSIDE = ((0.0, 0.0, 0.0), (3.1, -2.2, 5.0))
OUTSIDE = (50.0, 0.0, 0.0)
SR_SOURCE, SEG_SOURCE, FILE_SOURCE = (source.name for source in DEFAULT_SOURCES)


def series_info(datasets: list[pydicom.Dataset]) -> CTSeriesInfo:
    """The seed sources' view of a CT series, as the app builds it (after the geometry check)."""
    return CTSeriesInfo.from_geometry(check_series_geometry(datasets, min_slices=1))


class Case:
    """A CT series in ``input_dir/ct`` and the helpers to put seed inputs beside it."""

    def __init__(self, root: Path, study: str = "seeds-test") -> None:
        self.input_dir = root / "in"
        self.written = write_ct_series(
            np.full(GEOMETRY.shape, -800.0),
            GEOMETRY,
            self.input_dir / "ct",
            patient=SyntheticPatient("SEEDS"),
            uid_seed=study,
        )
        self.datasets = [pydicom.dcmread(path) for path in self.written.files]
        self.info = series_info(self.datasets)

    def write(self, name: str, text: str) -> Path:
        path = self.input_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def seed_sr(self, seeds: list[NoduleSeed], name: str = "seeds_sr.dcm") -> Path:
        return write_dataset(build_seed_sr(self.datasets, seeds), self.input_dir / name)

    def seg(self, name: str = "seg.dcm") -> tuple[Path, dict[int, np.ndarray]]:
        """A SEG with two cuboid segments; returns the path and each segment's exact centre (LPS)."""
        mask = np.zeros(GEOMETRY.shape, dtype=np.uint8)
        cuboids = {
            1: (slice(3, 6), slice(4, 10), slice(10, 16)),
            2: (slice(8, 10), slice(15, 19), slice(3, 7)),
        }
        centres = {}
        for number, box in cuboids.items():
            mask[box] = number
            centre_index = [(s.start + s.stop - 1) / 2.0 for s in box]
            centres[number] = GEOMETRY.index_to_lps(centre_index)
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"Lesion {number}",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                tracking_uid=f"1.2.826.0.1.3680043.8.498.77{number}",
                tracking_id=f"Lesion {number}",
            )
            for number in cuboids
        ]
        seg = hd.seg.Segmentation(
            source_images=self.datasets,
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=50,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
        )
        return write_dataset(seg, self.input_dir / name), centres


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return Case(tmp_path)


def _seeds(*positions: tuple[float, float, float], **kwargs: object) -> list[NoduleSeed]:
    return [NoduleSeed(p, f"Nodule {k}", "test", **kwargs) for k, p in enumerate(positions, start=1)]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the CT series and the notion of "inside"
# --------------------------------------------------------------------------------------------------


def test_series_info_matches_the_bundle_loader(case: Case) -> None:
    image = LoadCT()(case.input_dir / "ct")
    low, high = case.info.extent_lps
    expected_low, expected_high = volume_extent_lps(image.affine, image.shape[1:])
    np.testing.assert_allclose(low, expected_low, atol=1e-4)
    np.testing.assert_allclose(high, expected_high, atol=1e-4)
    assert case.info.shape == tuple(image.shape[1:])
    assert len(case.info.planes) == GEOMETRY.shape[0]
    assert case.info.frame_of_reference_uid == case.written.frame_of_reference_uid
    # the same "inside" as SeedROICrop: within half a voxel of the voxel-centre grid
    crop = SeedROICrop(roi_size=4)
    dx, dz = GEOMETRY.pixel_spacing[1], GEOMETRY.slice_spacing
    probes = [
        (high[0] + 0.4 * dx, 0.0, 0.0),
        (high[0] + 0.6 * dx, 0.0, 0.0),
        (0.0, 0.0, low[2] - 0.45 * dz),
        (0.0, 0.0, low[2] - 0.55 * dz),
        (low[0], low[1], high[2]),
    ]
    for probe in probes:
        try:
            crop(image, probe)
            bundle_inside = True
        except UserInputError:
            bundle_inside = False
        assert case.info.contains(probe) == bundle_inside, probe
    assert [case.info.contains(p) for p in probes] == [True, False, True, False, True]


def test_series_info_from_the_checked_geometry_is_the_written_series(case: Case) -> None:
    shuffled = list(case.datasets)
    np.random.default_rng(0).shuffle(shuffled)
    info = series_info(shuffled)
    assert info.series_instance_uid == case.written.series_instance_uid
    assert info.frame_of_reference_uid == case.written.frame_of_reference_uid
    assert info.study_instance_uid == str(case.datasets[0].StudyInstanceUID)
    assert info.shape == GEOMETRY.shape[::-1]  # (columns, rows, slices)
    index_krc = np.array([[0, 0, 0], [5, 7, 9], [11, 23, 27]], dtype=float)
    index_crk1 = np.concatenate([index_krc[:, ::-1], np.ones((3, 1))], axis=1)
    lps = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ info.affine_ras @ index_crk1.T).T[:, :3]
    np.testing.assert_allclose(lps, GEOMETRY.index_to_lps(index_krc), atol=1e-6)
    assert info.folders == ((case.input_dir / "ct").resolve(),)
    assert sorted(info.planes) == sorted(str(ds.SOPInstanceUID) for ds in case.datasets)
    for ds in case.datasets:  # each plane is its own header's, read when asked for
        plane = info.planes[str(ds.SOPInstanceUID)]
        assert plane.position_lps == tuple(float(v) for v in ds.ImagePositionPatient)
        assert plane.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
        assert plane.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
        assert (plane.rows, plane.columns) == (ds.Rows, ds.Columns)


def test_image_coordinates_use_the_pixel_centre_convention() -> None:
    # a sagittal image: columns run anterior -> posterior (+y), rows superior -> inferior (-z)
    plane = ImagePlane((10.0, 20.0, 30.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (2.0, 0.5), rows=8, columns=8)
    world = plane.image_to_world(np.array([[3.5, 1.5], [0.0, 0.0]]))
    np.testing.assert_allclose(world[0], (10.0, 20.0 + 3 * 0.5, 30.0 - 1 * 2.0))  # centre of column 3, row 1
    np.testing.assert_allclose(world[1], (10.0, 20.0 - 0.25, 30.0 + 1.0))  # outer corner of pixel (0, 0)


# --------------------------------------------------------------------------------------------------
# each source
# --------------------------------------------------------------------------------------------------


def test_seed_sr_scoord3d_points(case: Case) -> None:
    given = [
        NoduleSeed(INSIDE[0], "Lesion A", "test", tracking_uid="1.2.826.0.1.3680043.8.498.55"),
        NoduleSeed(INSIDE[1], "Lesion B", "test"),
    ]
    case.seed_sr(given)
    seeds, skipped, source = find_seeds(case.input_dir, case.info)
    assert (source, skipped) == (SR_SOURCE, [])
    assert [s.label for s in seeds] == ["Lesion A", "Lesion B"]
    assert seeds[0].tracking_uid == "1.2.826.0.1.3680043.8.498.55"
    assert seeds[1].tracking_uid  # the seeds SR gave it one
    for seed, expected in zip(seeds, INSIDE, strict=True):
        np.testing.assert_allclose(seed.position_lps, expected, atol=1e-4)
        assert seed.frame_of_reference_uid == case.info.frame_of_reference_uid
        assert "seeds_sr.dcm" in seed.source


def test_results_sr_reads_back_as_seeds(case: Case) -> None:
    model = ModelInfo("lung_nodule_ct_semantic_clip", "0.1.0", folds=1, calibrated=False)
    nodules = tuple(
        NoduleResult(seed, 0.5, (0.5,), {"cavitation": {"Present": 0.3, "Absent": 0.7}}, (1 / 9,) * 9)
        for seed in _seeds(*INSIDE)
    )
    sr = build_measurement_report(case.datasets, SeriesResult(nodules, (), model))
    write_dataset(sr, case.input_dir / "out" / "results.dcm")
    seeds, _, source = find_seeds(case.input_dir, case.info)
    assert source == SR_SOURCE
    assert [s.label for s in seeds] == ["Nodule 1", "Nodule 2"]
    np.testing.assert_allclose([s.position_lps for s in seeds], INSIDE, atol=1e-4)


@pytest.mark.parametrize(
    ("graphic_type", "points"),
    [
        ("POINT", [[5.5, 9.5]]),
        ("CIRCLE", [[5.5, 9.5], [8.5, 9.5]]),
        ("ELLIPSE", [[3.5, 9.5], [7.5, 9.5], [5.5, 8.5], [5.5, 10.5]]),
        ("POLYLINE", [[4.5, 8.5], [6.5, 8.5], [6.5, 10.5], [4.5, 10.5], [4.5, 8.5]]),
    ],
)
def test_sr_2d_scoord_on_a_ct_image(case: Case, graphic_type: str, points: list[list[float]]) -> None:
    image = case.datasets[7]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues[graphic_type],
        graphic_data=np.array(points),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Reader 1 lesion"),
        referenced_region=region,
        finding_type=codes.SCT.Nodule,
    )
    person = hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^One"),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[image],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="viewer",
    )
    write_dataset(sr, case.input_dir / "reader.dcm")
    seeds, _, source = find_seeds(case.input_dir, case.info)
    assert source == SR_SOURCE
    assert [s.label for s in seeds] == ["Reader 1 lesion"]
    # (5.5, 9.5) is the centre of column 5, row 9 of slice 7
    np.testing.assert_allclose(seeds[0].position_lps, GEOMETRY.index_to_lps((7, 9, 5)), atol=1e-4)


def test_seg_segment_centroids(case: Case) -> None:
    _, centres = case.seg()
    seeds, skipped, source = find_seeds(case.input_dir, case.info)
    assert (source, skipped) == (SEG_SOURCE, [])
    assert [s.label for s in seeds] == ["Lesion 1", "Lesion 2"]
    assert [s.tracking_uid for s in seeds] == [
        "1.2.826.0.1.3680043.8.498.771",
        "1.2.826.0.1.3680043.8.498.772",
    ]
    for seed, number in zip(seeds, (1, 2), strict=True):
        assert np.linalg.norm(np.subtract(seed.position_lps, centres[number])) < 0.5
        np.testing.assert_allclose(seed.position_lps, centres[number], atol=1e-3)
        assert "seg.dcm: segment" in seed.source


def test_seeds_csv(case: Case) -> None:
    case.write(
        "seeds.csv",
        "x, y, z, label, series_instance_uid\n"
        "0, 0, 0, A,\n"
        "\n"
        f"3.1, -2.2, 5.0, A, {case.info.series_instance_uid}\n"
        "1, 1, 1, other series, 1.2.3.4.5\n"
        "1, 2, 3, ,\n",
    )
    seeds, skipped, source = find_seeds(case.input_dir, case.info)
    assert (source, skipped) == (FILE_SOURCE, [])
    assert [s.label for s in seeds] == ["A", "A (2)", "Nodule 3"]
    assert [s.source for s in seeds] == ["seeds.csv line 2", "seeds.csv line 4", "seeds.csv line 6"]
    np.testing.assert_allclose([s.position_lps for s in seeds], [*INSIDE, (1.0, 2.0, 3.0)])
    assert all(s.frame_of_reference_uid == case.info.frame_of_reference_uid for s in seeds)


def test_seeds_json(case: Case) -> None:
    entries = [
        {"position_lps": list(INSIDE[0]), "label": "first"},
        {"position_lps": list(INSIDE[1]), "series_instance_uid": case.info.series_instance_uid},
        {"position_lps": [1, 1, 1], "series_instance_uid": "1.2.3.4.5"},
    ]
    case.write("seeds.json", json.dumps({"seeds": entries}))
    seeds, _, source = find_seeds(case.input_dir, case.info)
    assert source == FILE_SOURCE
    assert [(s.label, s.source) for s in seeds] == [
        ("first", "seeds.json seeds[0]"),
        ("Nodule 2", "seeds.json seeds[1]"),
    ]
    np.testing.assert_allclose([s.position_lps for s in seeds], INSIDE)


def test_seeds_file_applies_only_to_series_in_its_folder(tmp_path: Path) -> None:
    case = Case(tmp_path)
    shutil.move(case.input_dir / "ct", case.input_dir / "study_a")
    case = Case.__new__(Case)
    case.input_dir = tmp_path / "in"
    case.datasets = [pydicom.dcmread(p) for p in sorted((case.input_dir / "study_a").iterdir())]
    case.info = series_info(case.datasets)
    case.write("study_b/seeds.csv", "x,y,z\n0,0,0\n")
    with pytest.raises(UserInputError, match="no usable nodule seed"):
        find_seeds(case.input_dir, case.info)
    case.write("study_b/seeds.csv", f"x,y,z,series_instance_uid\n0,0,0,{case.info.series_instance_uid}\n")
    assert len(find_seeds(case.input_dir, case.info)[0]) == 1
    case.write("study_b/seeds.csv", "x,y,z\n0,0,0\n")
    case.write(
        "seeds.json", json.dumps({"seeds": [{"position_lps": [1, 2, 3]}]})
    )  # the input root: all series
    seeds, _, _ = find_seeds(case.input_dir, case.info)
    assert [s.position_lps for s in seeds] == [(1.0, 2.0, 3.0)]


# --------------------------------------------------------------------------------------------------
# precedence, skipping, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (("sr", "seg", "csv"), SR_SOURCE),
        (("seg", "csv"), SEG_SOURCE),
        (("csv",), FILE_SOURCE),
        (("sr", "csv"), SR_SOURCE),
    ],
)
def test_precedence(case: Case, inputs: tuple[str, ...], expected: str) -> None:
    if "sr" in inputs:
        case.seed_sr(_seeds(INSIDE[0]))
    if "seg" in inputs:
        case.seg()
    if "csv" in inputs:
        case.write("seeds.csv", "x,y,z\n3.1,-2.2,5.0\n")
    _, _, source = find_seeds(case.input_dir, case.info)
    assert source == expected


def test_a_source_with_only_skipped_seeds_gives_way(case: Case) -> None:
    case.seed_sr(_seeds(OUTSIDE))
    case.write("seeds.csv", "x,y,z\n0,0,0\n")
    seeds, skipped, source = find_seeds(case.input_dir, case.info)
    assert (source, len(seeds), skipped) == (FILE_SOURCE, 1, [])


def test_other_frame_of_reference_is_skipped(case: Case) -> None:
    foreign = NoduleSeed(
        INSIDE[1], "Elsewhere", "test", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.99"
    )
    case.seed_sr([NoduleSeed(INSIDE[0], "Here", "test"), foreign])
    seeds, skipped, source = find_seeds(case.input_dir, case.info)
    assert (source, [s.label for s in seeds]) == (SR_SOURCE, ["Here"])
    assert len(skipped) == 1
    assert skipped[0].seed.label == "Elsewhere"
    assert "seeds_sr.dcm: measurement group 2 ('Elsewhere')" in skipped[0].seed.source
    assert "frame of reference 1.2.826.0.1.3680043.8.498.99" in skipped[0].reason


def test_outside_the_scan_is_skipped(case: Case) -> None:
    case.write("seeds.csv", "x,y,z,label\n0,0,0,in\n50,0,0,out\n")
    seeds, skipped, _ = find_seeds(case.input_dir, case.info)
    assert [s.label for s in seeds] == ["in"]
    assert [(s.seed.label, s.seed.source) for s in skipped] == [("out", "seeds.csv line 3")]
    assert "(50.0, 0.0, 0.0) mm LPS lies outside the scan" in skipped[0].reason
    assert case.info.describe_extent() in skipped[0].reason


def test_no_seeds_names_the_folder_and_the_sources(case: Case) -> None:
    with pytest.raises(UserInputError) as caught:
        find_seeds(case.input_dir, case.info)
    message = str(caught.value)
    assert str(case.input_dir) in message
    for name in ("seeds.csv", "seeds.json", "SEG", "SR", case.info.series_instance_uid):
        assert name in message, name


def test_all_seeds_skipped_is_an_error_with_the_reasons(case: Case) -> None:
    case.write("seeds.csv", "x,y,z\n50,0,0\n")
    with pytest.raises(
        UserInputError, match=r"seeds.csv line 2: \(50.0, 0.0, 0.0\) mm LPS lies outside the scan"
    ):
        find_seeds(case.input_dir, case.info)


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("x,y\n1,2\n", "seeds.csv line 1", "missing column"),
        ("x,y,z,colour\n1,2,3,red\n", "seeds.csv line 1", "unknown column"),
        ("", "seeds.csv", "empty"),
        ("x,y,z\n1,2,3\n1,abc,3\n", "seeds.csv line 3", "3 finite numbers"),
        ("x,y,z\n1,2,nan\n", "seeds.csv line 2", "3 finite numbers"),
        ("x,y,z\n1,2,3\n\n4,5\n", "seeds.csv line 4", "2 values for 3 columns"),
    ],
)
def test_malformed_seeds_csv(case: Case, text: str, where: str, what: str) -> None:
    case.write("seeds.csv", text)
    with pytest.raises(UserInputError, match=what) as caught:
        find_seeds(case.input_dir, case.info)
    assert str(caught.value).startswith(where)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("{not json", "seeds.json: not valid JSON"),
        ('{"points": []}', "seeds.json: expected an object"),
        ('{"seeds": [{"position_lps": [0, 0, 0]}, {"position_lps": [1, 2]}]}', "seeds.json seeds[1]"),
        ('{"seeds": [{"position_lps": [true, 0, 0]}]}', "seeds.json seeds[0]"),
        ('{"seeds": [[0, 0, 0]]}', "seeds.json seeds[0]"),
    ],
)
def test_malformed_seeds_json(case: Case, text: str, where: str) -> None:
    case.write("seeds.json", text)
    with pytest.raises(UserInputError) as caught:
        find_seeds(case.input_dir, case.info)
    assert str(caught.value).startswith(where)


def test_junk_and_other_studies_are_ignored(case: Case, tmp_path: Path) -> None:
    case.write("README.txt", "seeds for the test study\n")
    case.write("notes.json", '{"seeds": "not these"}')
    (case.input_dir / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (case.input_dir / "random.bin").write_bytes(np.random.default_rng(0).bytes(2000))
    (case.input_dir / "truncated.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
    other = Case(tmp_path / "other", study="another-study")
    write_dataset(build_seed_sr(other.datasets, _seeds(INSIDE[1])), case.input_dir / "other_study_sr.dcm")
    case.write("seeds.csv", "x,y,z\n0,0,0\n")
    seeds, skipped, source = find_seeds(case.input_dir, case.info)
    assert (source, [s.position_lps for s in seeds], skipped) == (FILE_SOURCE, [INSIDE[0]], [])


def test_only_files_of_the_asked_classes_are_parsed(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    sr = write_dataset(build_seed_sr(case.datasets, _seeds(INSIDE[0])), case.input_dir / "seeds_sr.dcm")
    mislabelled = pydicom.dcmread(case.written.files[0])  # its file meta says SR, its dataset CT
    mislabelled.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    mislabelled.save_as(case.input_dir / "mislabelled.dcm")
    case.write("README.txt", "not DICOM\n")
    parsed: list[str] = []
    read = pydicom.dcmread

    def counting_dcmread(path, *args, **kwargs):
        parsed.append(Path(path).name)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(dicom_io.pydicom, "dcmread", counting_dcmread)
    found = [path for path, _ in dicom_io.iter_dicom_headers(case.input_dir, sop_classes=SR_STORAGE_CLASSES)]
    assert found == [sr]
    assert sorted(parsed) == ["mislabelled.dcm", "seeds_sr.dcm"]  # none of the CT slices


def test_an_unreadable_segmentation_of_the_study_is_named(case: Case) -> None:
    path, _ = case.seg()
    seg = pydicom.dcmread(path)
    del seg.PerFrameFunctionalGroupsSequence
    seg.save_as(path)
    case.write("seeds.csv", "x,y,z\n0,0,0\n")
    with pytest.raises(UserInputError, match=r"^seg.dcm: .*fix or remove the file|^seg.dcm: no per-frame"):
        find_seeds(case.input_dir, case.info)


def test_repeated_seeds_are_used_once(case: Case) -> None:
    path = case.seed_sr(_seeds(*INSIDE))
    shutil.copy(path, case.input_dir / "copy_of_seeds_sr.dcm")
    seeds, _, _ = find_seeds(case.input_dir, case.info)
    assert len(seeds) == 2


def test_a_detector_can_be_plugged_in(case: Case) -> None:
    class Detector:
        name = "automatic detector"

        def find(self, input_dir: Path, ct: CTSeriesInfo) -> list[NoduleSeed] | None:
            return [NoduleSeed(INSIDE[1], "Detected 1", "detector candidate 1")]

    assert isinstance(Detector(), SeedSource)
    case.write("seeds.csv", "x,y,z\n0,0,0\n")
    seeds, _, source = find_seeds(case.input_dir, case.info, sources=(Detector(), *DEFAULT_SOURCES))
    assert (source, [s.label for s in seeds]) == ("automatic detector", ["Detected 1"])
