"""Hostile headers through the app and the listener: refused with the tag named, nothing misplaced.

A UID is never a path: every hostile Study, Series and SOP Instance UID case plants a marker file
where the value would point (the output folder's parent, an absolute folder, a sub-folder) and
checks that it survives, that nothing is written, and that the refusal names the attribute. Corrupt
geometry and pixel-value headers, which used to give exit 0 with wrong probabilities, are refused
the same way.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom import config
from pynetdicom import AE

from demo.study import write_demo_study
from deploy_app import inference
from deploy_app.__main__ import EXIT_INPUT, main
from deploy_app.findings import NoduleSeed
from deploy_app.inference import BundleModels
from deploy_app.pacs import STATUS_CANNOT_UNDERSTAND, StorageServer, StudyCollector, WorkDirs
from deploy_app.seeds import MAX_LABEL_CHARACTERS, CTSeriesInfo, check_seeds, read_seeds_csv, read_seeds_json
from deploy_app.uids import PATH_UID_KEYWORDS, InvalidUIDError, check_uid, is_valid_uid, path_inside
from deploy_app.volume import check_series_geometry
from scripts.errors import UserInputError
from scripts.transforms import LoadCT
from training.demo_bundle import build_untrained_bundle
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

TOO_LONG = "1." + "2" * 63  # digits and dots, but 65 characters
HOSTILE = ["..", "../victim", "/abs/path", "a/b", "", TOO_LONG]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def hostile_value(value: str, root: Path) -> str:
    """``/abs/path`` aims at a folder beside ``root`` (the test's own), never at the real file system."""
    return str(root.parent / "victim") if value == "/abs/path" else value


def plant_markers(root: Path) -> list[Path]:
    """Marker files where the hostile values would land if ``root / value`` were used as a path."""
    markers = [
        root.parent / "marker.txt",
        root.parent / "victim" / "marker.txt",
        root / "a" / "b" / "marker.txt",
    ]
    for marker in markers:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("must survive")
    return markers


def assert_markers_survive(markers: list[Path]) -> None:
    assert all(marker.read_text() == "must survive" for marker in markers)
    assert [p.name for p in markers[1].parent.iterdir()] == ["marker.txt"]


def files_besides_markers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name != "marker.txt"]


def rewrite(files: list[Path], keyword: str, value: str) -> None:
    """Set ``keyword`` to ``value``: on every slice for study/series, on one slice for the SOP UID."""
    targets = files if keyword != "SOPInstanceUID" else files[len(files) // 2 : len(files) // 2 + 1]
    previous = config.settings.writing_validation_mode  # pydicom would refuse to write a bad UI value
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for path in targets:
            dataset = pydicom.dcmread(path)
            setattr(dataset, keyword, value)
            if keyword == "SOPInstanceUID":
                dataset.file_meta.MediaStorageSOPInstanceUID = value
            dataset.save_as(path)
    finally:
        config.settings.writing_validation_mode = previous


@pytest.mark.parametrize("value", ["1.2.3", "0", "1.2.840.10008.1.2", "9" * 64])
def test_valid_uids_pass(value: str) -> None:
    assert is_valid_uid(value) and check_uid(value, "SeriesInstanceUID", "here") == value


@pytest.mark.parametrize(
    "value", [*HOSTILE, "1.02", "1..2", ".1", "1.2.", " 1.2", "1.2 ", "1.2\n", "1.2\x00", None, 12]
)
def test_invalid_uids_are_refused_with_the_attribute_named(value: object) -> None:
    assert not is_valid_uid(value)
    with pytest.raises(InvalidUIDError, match=r"series 3 instance 4: SOPInstanceUID is .*not a valid"):
        check_uid(value, "SOPInstanceUID", "series 3 instance 4")


def test_a_hostile_value_is_shown_cut_short() -> None:
    with pytest.raises(InvalidUIDError) as raised:
        check_uid("x" * 10_000, "StudyInstanceUID", "here")
    assert len(str(raised.value)) < 400 and "10000 characters" in str(raised.value)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/etc", "../x"])
def test_path_inside_refuses_what_leaves_the_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserInputError, match="would not lie directly inside"):
        path_inside(tmp_path, name)


def test_path_inside_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "1.2.3").symlink_to(tmp_path)
    with pytest.raises(UserInputError):
        path_inside(tmp_path / "root", "1.2.3")
    assert path_inside(tmp_path / "root", "1.2.4") == tmp_path / "root" / "1.2.4"


# --- the app, through its command line (in-process: main() is what `python -m deploy_app` runs) ---


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_untrained_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-nodule demo CT with its seed in ``seeds.csv`` (which does not depend on any UID)."""
    folder = tmp_path_factory.mktemp("study") / "in"
    write_demo_study(folder, seed=5, n_nodules=1, seed_sr=False, seeds_csv=True)
    return folder


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("keyword", PATH_UID_KEYWORDS)
def test_the_app_refuses_a_hostile_uid_and_touches_nothing_outside_its_output(
    study: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, keyword: str, value: str
) -> None:
    output = tmp_path / "out"
    markers = plant_markers(output)
    inputs = shutil.copytree(study, tmp_path / "in")
    rewrite(sorted((inputs / "ct").glob("*.dcm")), keyword, hostile_value(value, output))

    code = main(["--input", str(inputs), "--output", str(output), "--model", str(bundle)])

    assert code == EXIT_INPUT
    message = capsys.readouterr().err
    if keyword != "SOPInstanceUID" and value == "":
        # The SDK's loader itself drops instances without a study or series UID: the app never sees them.
        assert "no CT series in the input folder" in message and keyword in message
    else:
        assert f"{keyword} is" in message
    assert_markers_survive(markers)
    assert files_besides_markers(output) == []


def test_the_untouched_study_is_analysed(study: Path, bundle: Path, tmp_path: Path) -> None:
    """The hostile cases above fail for their UID alone: the same study without it succeeds."""
    assert main(["--input", str(study), "--output", str(tmp_path / "out"), "--model", str(bundle)]) == 0
    series_uid = pydicom.dcmread(next((study / "ct").glob("*.dcm"))).SeriesInstanceUID
    assert [p.name for p in (tmp_path / "out").iterdir()] == [series_uid]


def set_header(files: list[Path], keyword: str, value: object, only: int | None = None) -> None:
    """Set ``keyword`` on every slice, or only on ``files[only]``."""
    for path in files if only is None else files[only : only + 1]:
        dataset = pydicom.dcmread(path)
        setattr(dataset, keyword, value)
        dataset.save_as(path)


@pytest.mark.parametrize(
    ("keyword", "value", "only", "message"),
    [
        (
            "ImageOrientationPatient",
            [1, 0, 0, 0.05, 0.9987, 0],
            None,
            "ImageOrientationPatient .* not orthogonal",
        ),
        ("ImageOrientationPatient", [0.99, 0, 0, 0, 1, 0], None, "not two unit vectors"),
        ("PixelSpacing", [0, 0], None, "PixelSpacing .* must be two positive"),
        ("PixelSpacing", [0.75, -0.75], None, "PixelSpacing .* must be two positive"),
        ("RescaleSlope", "nan", 10, "instance 11 has RescaleSlope 'nan'"),
        ("RescaleSlope", 500, None, "RescaleSlope '500.0'; a CT needs"),
        ("RescaleIntercept", "inf", None, "RescaleIntercept 'inf'"),
        ("PixelRepresentation", 0, None, "median voxel is .* HU .* PixelRepresentation"),
    ],
    ids=[
        "not-orthogonal",
        "not-unit",
        "spacing-zero",
        "spacing-negative",
        "slope-nan-one-slice",
        "slope-absurd",
        "intercept-inf",
        "unsigned-read-of-signed",
    ],
)
def test_corrupt_geometry_and_pixel_headers_are_refused_with_the_tag_named(
    study: Path,
    bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    keyword: str,
    value: object,
    only: int | None,
    message: str,
) -> None:
    inputs = shutil.copytree(study, tmp_path / "in")
    set_header(sorted((inputs / "ct").glob("*.dcm")), keyword, value, only)

    code = main(["--input", str(inputs), "--output", str(tmp_path / "out"), "--model", str(bundle)])

    assert code == EXIT_INPUT
    assert re.search(message, capsys.readouterr().err)
    assert files_besides_markers(tmp_path / "out") == []


def test_a_sop_instance_uid_used_twice_is_refused(
    study: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The same UID at a new position used to be accepted as one more slice."""
    inputs = shutil.copytree(study, tmp_path / "in")
    files = sorted((inputs / "ct").glob("*.dcm"))
    reused = pydicom.dcmread(files[3]).SOPInstanceUID
    set_header(files, "SOPInstanceUID", reused, only=20)

    assert (
        main(["--input", str(inputs), "--output", str(tmp_path / "out"), "--model", str(bundle)])
        == EXIT_INPUT
    )
    assert f"share the SOPInstanceUID {reused}" in capsys.readouterr().err


# --- the PACS listener ---


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StorageServer]:
    storage = StorageServer(
        StudyCollector(WorkDirs(tmp_path / "work"), stable_seconds=10), ae_title="LNSC_TEST", port=0
    )
    storage.start()
    yield storage
    storage.stop()


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    geometry = CTGeometry(shape=(2, 8, 8), pixel_spacing=(1.0, 1.0), slice_spacing=2.0)
    folder = tmp_path_factory.mktemp("ct") / "ct"
    volume = np.zeros(geometry.shape, np.int16)
    return write_ct_series(volume, geometry, folder, patient=SyntheticPatient("U")).files[0]


def assert_nothing_stored(server: StorageServer, markers: list[Path]) -> None:
    assert_markers_survive(markers)
    assert files_besides_markers(server.collector.dirs.root) == []
    assert server.collector.pending_studies() == {}


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("keyword", PATH_UID_KEYWORDS)
def test_the_listener_refuses_a_hostile_uid_with_0xC000_and_an_error_comment(
    server: StorageServer, slice_file: Path, tmp_path: Path, keyword: str, value: str
) -> None:
    """Through a real association, whenever pynetdicom's own client agrees to send the value."""
    incoming = server.collector.dirs.incoming
    markers = plant_markers(incoming)
    dataset = pydicom.dcmread(slice_file)
    setattr(dataset, keyword, hostile_value(value, incoming))
    ae = AE(ae_title="TESTSCU")
    # Every refusal must come back as a status: a client that waited for its DIMSE timeout would
    # mean the listener dropped the request silently (5 s is plenty on one machine).
    ae.dimse_timeout = 5
    ae.add_requested_context(dataset.SOPClassUID)
    association = ae.associate(*server.address, ae_title="LNSC_TEST")
    assert association.is_established
    try:
        response = association.send_c_store(dataset)
    except ValueError:  # pynetdicom's client itself refuses an AffectedSOPInstanceUID this bad
        response = None
    finally:
        association.release()
    if response is not None:
        assert "Status" in response, "no C-STORE response came back before the DIMSE timeout"
        assert 0xC000 <= response.Status <= 0xCFFF
        refused = "AffectedSOPInstanceUID" if keyword == "SOPInstanceUID" and value == "" else keyword
        assert response.ErrorComment == f"{refused} is not a valid DICOM UID"
    assert_nothing_stored(server, markers)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("keyword", [*PATH_UID_KEYWORDS, "AffectedSOPInstanceUID"])
def test_the_store_handler_refuses_what_any_client_could_send(
    server: StorageServer, slice_file: Path, tmp_path: Path, keyword: str, value: str
) -> None:
    """The same refusal for values a client library other than pynetdicom's would send."""
    incoming = server.collector.dirs.incoming
    markers = plant_markers(incoming)
    dataset = pydicom.dcmread(slice_file)
    affected = dataset.SOPInstanceUID
    hostile = hostile_value(value, incoming)
    if keyword == "AffectedSOPInstanceUID":
        affected = hostile
    else:
        setattr(dataset, keyword, hostile)
    event = SimpleNamespace(
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="ANYSCU")),
        dataset=dataset,
        request=SimpleNamespace(AffectedSOPInstanceUID=affected),
        encoded_dataset=lambda: b"\0" * 132,
    )
    response = server._handle_store(event)
    assert response.Status == STATUS_CANNOT_UNDERSTAND
    assert response.ErrorComment == f"{keyword} is not a valid DICOM UID"
    assert_nothing_stored(server, markers)


def test_a_data_set_sop_uid_other_than_the_requests_is_refused(
    server: StorageServer, slice_file: Path
) -> None:
    dataset = pydicom.dcmread(slice_file)
    event = SimpleNamespace(
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="ANYSCU")),
        dataset=dataset,
        request=SimpleNamespace(AffectedSOPInstanceUID="1.2.3.4"),
        encoded_dataset=lambda: b"\0" * 132,
    )
    response = server._handle_store(event)
    assert response.Status == STATUS_CANNOT_UNDERSTAND and "differs" in response.ErrorComment
    assert server.collector.pending_studies() == {}


# --- seeds files and seed counts ---


@pytest.fixture(scope="module")
def ct_info(study: Path) -> CTSeriesInfo:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((study / "ct").glob("*.dcm"))]
    return CTSeriesInfo.from_geometry(check_series_geometry(headers))


def scan_centre_lps(info: CTSeriesInfo) -> np.ndarray:
    ras = info.affine_ras @ np.array([*((np.array(info.shape) - 1) / 2), 1.0])
    return ras[:3] * np.array([-1.0, -1.0, 1.0])


def test_a_latin1_seeds_csv_is_named_and_refused(tmp_path: Path) -> None:
    path = tmp_path / "seeds.csv"
    path.write_bytes("x,y,z,label\n1,2,3,Läsion\n".encode("latin-1"))
    with pytest.raises(UserInputError, match=r"seeds.csv: not UTF-8 text .* save the file as UTF-8"):
        read_seeds_csv(path)


def test_a_csv_field_over_the_csv_limit_is_named_and_refused(tmp_path: Path) -> None:
    path = tmp_path / "seeds.csv"
    path.write_text('x,y,z,label\n1,2,3,"' + "a" * (200 * 1024) + '"\n')
    with pytest.raises(UserInputError, match="seeds.csv: not a readable CSV file"):
        read_seeds_csv(path)


def test_a_seeds_json_nested_200000_levels_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seeds.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(UserInputError, match="seeds.json: JSON nested too deeply"):
        read_seeds_json(path)


def test_ten_thousand_seeds_are_checked_in_linear_time_and_repeats_found(ct_info: CTSeriesInfo) -> None:
    positions = scan_centre_lps(ct_info) + np.random.default_rng(0).uniform(-20, 20, size=(10_000, 3))
    seeds = [NoduleSeed(tuple(p), "Nodule", "seeds.csv") for p in positions]
    repeats = [NoduleSeed(tuple(p + 0.0005), "Nodule", "seeds.csv") for p in positions[:50]]
    usable, skipped = check_seeds(seeds + repeats, ct_info)
    assert len(usable) + len(skipped) == 10_000  # the 50 repeats (0.87 µm away) are used once
    labels = [seed.label for seed in usable] + [s.seed.label for s in skipped]
    assert len(set(labels)) == 10_000 and labels[:3] == ["Nodule", "Nodule (2)", "Nodule (3)"]


def test_repeats_by_tracking_uid_and_by_position_match_the_pairwise_rule(ct_info: CTSeriesInfo) -> None:
    x, y, z = (float(v) for v in scan_centre_lps(ct_info))
    seeds = [
        NoduleSeed((x, y, z), "A", "s", tracking_uid="1.2.3"),
        NoduleSeed((x + 10, y, z), "B", "s", tracking_uid="1.2.3"),  # same tracking UID
        NoduleSeed((x + 0.0009, y, z), "C", "s"),  # within 1 µm, across a cell border or not
        NoduleSeed((x + 0.0011, y, z), "D", "s"),  # 1.1 µm from A, 0.2 µm from the dropped C
        NoduleSeed((x, y, z), "E", "s", frame_of_reference_uid="9.9"),  # another frame: not a repeat
        NoduleSeed((math.nan, y, z), "F", "s"),
        NoduleSeed((math.nan, y, z), "G", "s"),  # non-finite positions never repeat by position
    ]
    usable, skipped = check_seeds(seeds, ct_info)
    assert sorted([s.label for s in usable] + [s.seed.label for s in skipped]) == ["A", "D", "E", "F", "G"]


def test_a_5000_character_label_is_cut_and_logged(
    ct_info: CTSeriesInfo, caplog: pytest.LogCaptureFixture
) -> None:
    centre = tuple(float(v) for v in scan_centre_lps(ct_info))
    (seed, *_), _ = check_seeds([NoduleSeed(centre, "L" * 5000, "seeds.csv line 2")], ct_info)
    assert seed.label == "L" * (MAX_LABEL_CHARACTERS - 3) + "..."
    assert "label of 5000 characters cut to 64" in caplog.text


def test_more_seeds_than_the_cap_fail_the_series_with_the_option_named(
    study: Path, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = shutil.copytree(study, tmp_path / "in")
    x, y, z = (float(v) for v in (inputs / "seeds.csv").read_text().splitlines()[1].split(",")[:3])
    rows = "".join(f"{x + 0.01 * k},{y},{z},N{k}\n" for k in range(6))
    (inputs / "seeds.csv").write_text("x,y,z,label\n" + rows)
    argv = ["--input", str(inputs), "--output", str(tmp_path / "out"), "--model", str(bundle)]

    assert main([*argv, "--max-seeds", "5"]) == EXIT_INPUT
    assert "gives 6 usable seeds, more than the 5 analysed per series" in capsys.readouterr().err
    assert main([*argv, "--max-seeds", "6"]) == 0


def test_nodules_in_several_chunks_give_the_results_of_one_batch(
    study: Path, bundle: Path, ct_info: CTSeriesInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = BundleModels.load(bundle)
    volume = LoadCT()(str(study / "ct"))
    centre = scan_centre_lps(ct_info)
    seeds = [NoduleSeed(tuple(centre + (4.0 * k, 0.0, 0.0)), f"N{k}", "test") for k in range(5)]
    whole = inference.analyse_nodules(volume, seeds, models)
    monkeypatch.setattr(inference, "INFERENCE_CHUNK", 2)
    chunked = inference.analyse_nodules(volume, seeds, models)
    assert [r.seed.label for r in chunked] == [s.label for s in seeds]
    for one, other in zip(whole, chunked, strict=True):
        assert one.malignancy == pytest.approx(other.malignancy, abs=1e-6)
        np.testing.assert_allclose(one.attention, other.attention, atol=1e-6)
        np.testing.assert_array_equal(one.planes, other.planes)
