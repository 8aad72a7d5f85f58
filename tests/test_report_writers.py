"""The report writers: the defaults write what the report functions give; a site adds or drops one."""

from __future__ import annotations

import copy
import json
import logging
import re
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_report import _assert_dciodvfy_clean, _pages, _text_blocks

from demo.study import write_demo_study
from deploy_app.app import process_folder
from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed, SeriesResult, SkippedSeed
from deploy_app.inference import BundleModels
from deploy_app.report import (
    DEFAULT_WRITERS,
    DEMO_BANNER,
    RESEARCH_BANNER,
    ReportHeader,
    ReportInput,
    ReportWriter,
    SecondaryCaptureWriter,
    derivation_description,
    encapsulated_document_bytes,
    nearest_instance,
    render_montage,
    render_report_pdf,
    secondary_capture,
)
from deploy_app.sr_reader import read_measurement_report
from training.demo_bundle import build_untrained_bundle
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEFAULT_FILES = {"sr.dcm", "report.pdf", "report_pdf.dcm", "nodule_1_sc.dcm", "nodule_2_sc.dcm"}


def _finding_rows(result: SeriesResult, nodule: NoduleResult) -> list[list[object]]:
    return [[f.title, f.stated_value, f.probability] for f in nodule.findings(result.model.reliability)]


class FindingsJsonWriter:
    """A site's own output: the finding rows of every nodule as JSON."""

    name = "findings JSON (findings.json)"

    def write(self, report: ReportInput, folder: Path) -> None:
        nodules = [
            {"label": nodule.seed.label, "findings": _finding_rows(report.result, nodule)}
            for nodule in report.result.nodules
        ]
        (folder / "findings.json").write_text(json.dumps({"nodules": nodules}))


class BrokenWriter:
    """A writer that fails after writing part of its output."""

    name = "broken output"

    def write(self, report: ReportInput, folder: Path) -> None:
        (folder / "half_written.txt").write_text("partial")
        raise OSError("disk full")


class BuggyWriter:
    """A writer with a bug (not a file-system error)."""

    name = "buggy output"

    def write(self, report: ReportInput, folder: Path) -> None:
        raise ValueError("a bug")


def _result() -> SeriesResult:
    rng = np.random.default_rng(5)
    nodules = tuple(
        NoduleResult(
            seed=NoduleSeed((-2.0 + 3 * k, 1.0, 0.5 * k), f"Nodule {k + 1}", f"seeds.csv line {k + 2}"),
            malignancy=0.3 + 0.4 * k,
            malignancy_per_fold=(0.25 + 0.4 * k, 0.35 + 0.4 * k),
            semantic={"nodule_consistency": {"Solid": 0.7 - 0.4 * k, "Part-solid": 0.2 + 0.4 * k}},
            attention=tuple(rng.dirichlet(np.ones(9))),
            planes=rng.uniform(0.0, 1.0, (9, 224, 224)).astype(np.float32),
        )
        for k in range(2)
    )
    skipped = (
        SkippedSeed(NoduleSeed((0.0, 0.0, 900.0), "Nodule 3", "seeds.csv line 4"), "outside the scan"),
    )
    model = ModelInfo("lung_nodule_ct_semantic_clip", "0.1.0", 2, calibrated=False, untrained_demo=True)
    return SeriesResult(nodules=nodules, skipped=skipped, model=model)


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    written = write_ct_series(
        np.full((4, 8, 8), -1000.0),
        CTGeometry((4, 8, 8), (1.0, 1.0), 2.0, origin_lps=(-4.0, -4.0, -2.0)),
        tmp_path_factory.mktemp("ct") / "series",
        patient=SyntheticPatient("WRITERS-TEST"),
        uid_seed="writers-test",
    )
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in written.files]


def test_the_default_writers_write_what_the_report_functions_give(
    ct: list[pydicom.Dataset], tmp_path: Path
) -> None:
    result = _result()
    report = ReportInput(ct_datasets=ct, result=result)
    for writer in DEFAULT_WRITERS:
        assert isinstance(writer, ReportWriter)
        writer.write(report, tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == DEFAULT_FILES
    pdf = render_report_pdf(
        result,
        study_description=str(ct[0].StudyDescription),
        series_description=str(ct[0].SeriesDescription),
        study_date=str(ct[0].StudyDate),
        header=ReportHeader.from_dataset(ct[0]),
    )
    assert report.pdf is report.pdf  # rendered once for both PDF writers
    assert (tmp_path / "report.pdf").read_bytes() == pdf
    document = pydicom.dcmread(tmp_path / "report_pdf.dcm")
    assert encapsulated_document_bytes(document) == pdf
    assert len(document.SourceInstanceSequence) == len(ct)
    assert document.ManufacturerModelName == result.model.name
    for number, nodule in enumerate(result.nodules, start=1):
        image = pydicom.dcmread(tmp_path / f"nodule_{number}_sc.dcm")
        np.testing.assert_array_equal(image.pixel_array, render_montage(result, nodule))
        assert image.StudyInstanceUID == ct[0].StudyInstanceUID
    read = read_measurement_report(tmp_path / "sr.dcm")
    assert [nodule.label for nodule in read] == ["Nodule 1", "Nodule 2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> BundleModels:
    return BundleModels.load(build_untrained_bundle(tmp_path_factory.mktemp("bundle") / "bundle"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("study") / "in"
    return folder, write_demo_study(folder, seed=5, n_nodules=2).series.series_instance_uid


def test_a_site_adds_its_own_writer_and_drops_a_default(
    study: tuple[Path, str], models: BundleModels, tmp_path: Path
) -> None:
    folder, series_uid = study
    writers = (
        *(w for w in DEFAULT_WRITERS if not isinstance(w, SecondaryCaptureWriter)),
        FindingsJsonWriter(),
    )
    outcome = process_folder(folder, tmp_path / "out", models=models, report_writers=writers)
    assert not outcome.failures
    written = {path.name for path in outcome.written[series_uid]}
    assert written == {"sr.dcm", "report.pdf", "report_pdf.dcm", "findings.json"}
    findings = json.loads((tmp_path / "out" / series_uid / "findings.json").read_text())
    result = outcome.results[series_uid]
    assert [n["label"] for n in findings["nodules"]] == [n.seed.label for n in result.nodules]
    assert findings["nodules"][0]["findings"] == _finding_rows(result, result.nodules[0])


def test_a_failing_writer_fails_the_series_and_leaves_nothing(
    study: tuple[Path, str], models: BundleModels, tmp_path: Path
) -> None:
    """A file-system error in a writer fails that series (named, with the OS reason), a bug in one
    propagates with the writer named; neither leaves a series or staging folder behind."""
    output = tmp_path / "out"
    outcome = process_folder(
        study[0], output, models=models, report_writers=(*DEFAULT_WRITERS, BrokenWriter())
    )
    assert not outcome.written and len(outcome.failures) == 1
    assert "disk full" in outcome.failures[0].message
    assert list(output.iterdir()) == []  # no series folder, no staging folder left behind
    with pytest.raises(ValueError, match="a bug") as raised:
        process_folder(study[0], output, models=models, report_writers=(*DEFAULT_WRITERS, BuggyWriter()))
    assert any("report writer 'buggy output' failed" in note for note in raised.value.__notes__)
    assert list(output.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# the page header, the banners and the Secondary Capture's source slice, as the writers write them
# --------------------------------------------------------------------------------------------------

NAME, NAME_SHOWN = "Testperson^Anna^Maria", "Testperson, Anna Maria"
IDENTIFIERS = {
    "patient ID": "HDR-0042-X",
    "birth date": "1961-02-03",
    "accession number": "ACC-998877",
    "study date": "2024-05-17",
    "series description": "Thorax 1.0 B31f",
}


@pytest.fixture(scope="module")
def identified_ct(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    """Four slices at z = -2, 0, 2, 4 mm with known patient and study values."""
    written = write_ct_series(
        np.full((4, 8, 8), -1000.0),
        CTGeometry((4, 8, 8), (1.0, 1.0), 2.0, origin_lps=(-4.0, -4.0, -2.0)),
        tmp_path_factory.mktemp("ct") / "series",
        patient=SyntheticPatient("HDR-0042-X", NAME, birth_date="19610203"),
        uid_seed="header-test",
        series_description="Thorax 1.0 B31f",
        study_date="20240517",
        accession_number="ACC-998877",
    )
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in written.files]


def _inflated(pdf: bytes) -> bytes:
    """A compressed PDF with its Flate content streams decompressed in place (images kept as they
    are), so the text operators can be read as in an uncompressed one. Streams are skipped by their /Length:
    binary data is never searched."""
    header = re.compile(rb"<<([^<>]*?)>>\s*stream\r?\n", flags=re.DOTALL)
    pieces, position = [], 0
    while (match := header.search(pdf, position)) is not None:
        length = int(re.search(rb"/Length (\d+)", match.group(1)).group(1))
        start, end = match.end(), match.end() + length
        pieces.append(pdf[position:start])
        if b"/Subtype /Image" not in match.group(1) and b"/FlateDecode" in match.group(1):
            pieces.append(zlib.decompress(pdf[start:end]))  # its /Length is stale: nothing reads it
        else:
            pieces.append(pdf[start:end])
        position = end
    pieces.append(pdf[position:])
    return b"".join(pieces)


def _written(ct: list[pydicom.Dataset], folder: Path) -> Path:
    report = ReportInput(ct_datasets=ct, result=_result())
    for writer in DEFAULT_WRITERS:
        writer.write(report, folder)
    return folder


def test_every_pdf_page_has_the_banner_and_the_patient_and_study_header(
    identified_ct: list[pydicom.Dataset], tmp_path: Path
) -> None:
    pdf = (_written(identified_ct, tmp_path) / "report.pdf").read_bytes()
    assert encapsulated_document_bytes(pydicom.dcmread(tmp_path / "report_pdf.dcm")) == pdf
    pages = _pages(_inflated(pdf))
    assert len(pages) == len(re.findall(rb"/Type /Page\b(?!s)", pdf)) >= 4
    for number, page in enumerate(pages, start=1):
        assert page[:2] == [RESEARCH_BANNER, DEMO_BANNER], number
        header = page[2:8]
        assert f"Patient: {NAME_SHOWN}" in header, number
        assert f"Patient ID: {IDENTIFIERS['patient ID']}" in header, number
        assert f"Birth date: {IDENTIFIERS['birth date']}" in header, number
        assert f"Accession: {IDENTIFIERS['accession number']}" in header, number
        assert f"Study date: {IDENTIFIERS['study date']}" in header, number
        assert f"Series: {IDENTIFIERS['series description']}" in header, number


def test_missing_header_values_are_dashes_and_odd_characters_are_marked(
    identified_ct: list[pydicom.Dataset],
) -> None:
    ct = copy.deepcopy(identified_ct[0])
    del ct.PatientBirthDate, ct.SeriesDescription
    ct.AccessionNumber = ""
    ct.PatientID = "ID\u4e00\n7"  # outside the PDF fonts' characters, and a control character
    pages = _pages(_inflated(ReportInput(ct_datasets=[ct], result=_result()).pdf))
    for page in pages:
        header = page[2:8]
        for label in ("Birth date", "Accession", "Series"):
            assert f"{label}: \u2014" in header
        assert "Patient ID: ID? 7" in header
    bare = render_report_pdf(
        _result(), study_description=None, series_description=None, study_date=None, compress=False
    )
    assert "Patient: \u2014" in _text_blocks(bare)  # no header given: every value missing


def test_the_writers_log_no_identifier(
    identified_ct: list[pydicom.Dataset], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        _written(identified_ct, tmp_path)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in ("Testperson", "Anna", "HDR-0042-X", "19610203", "1961-02-03", "ACC-998877"):
        assert secret not in logged


def test_nearest_instance_along_the_slice_normal(identified_ct: list[pydicom.Dataset]) -> None:
    def slice_of(z: float) -> int:
        found = nearest_instance(identified_ct, (3.0, -1.0, z))
        return [ds.SOPInstanceUID for ds in identified_ct].index(found.SOPInstanceUID)

    assert [slice_of(z) for z in (-9.0, -1.2, 0.4, 1.0, 3.2, 40.0)] == [0, 0, 1, 1, 3, 3]  # 1.0: tie, first
    tilted = copy.deepcopy(identified_ct[2])
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice through y = -4 ...
    tilted.ImagePositionPatient = [0, 25.0, 0]  # ... at y = 25: its normal is y
    assert nearest_instance([identified_ct[0], tilted], (0.0, 24.0, 7.0)) is tilted  # 9 mm vs 1 mm
    no_geometry = pydicom.Dataset()
    no_geometry.SOPInstanceUID = "1.2.3"
    assert nearest_instance([no_geometry], (0.0, 0.0, 0.0)) is None
    assert nearest_instance([no_geometry, identified_ct[1]], (0.0, 0.0, 0.0)) is identified_ct[1]


def test_secondary_capture_references_the_ct_slice_nearest_its_seed(
    identified_ct: list[pydicom.Dataset], tmp_path: Path
) -> None:
    """Seeds at z = 0 and 0.5 (slice 1) and, for a third nodule, z = 3.4 (slice 3, at z = 4)."""
    result = _result()
    third = NoduleResult(
        seed=NoduleSeed((0.0, 1.0, 3.4), "Nodule 4", "seeds.csv line 5"),
        malignancy=0.5,
        malignancy_per_fold=(),
        semantic={},
        attention=(),
        planes=None,
    )
    result = SeriesResult(nodules=(*result.nodules, third), skipped=(), model=result.model)
    images = secondary_capture(result, identified_ct[0], source_datasets=identified_ct)
    uids = [ds.SOPInstanceUID for ds in identified_ct]
    for image, nodule, slice_index in zip(images, result.nodules, (1, 1, 3), strict=True):
        (item,) = image.SourceImageSequence
        assert item.ReferencedSOPClassUID == identified_ct[0].SOPClassUID == pydicom.uid.CTImageStorage
        assert item.ReferencedSOPInstanceUID == uids[slice_index]
        (purpose,) = item.PurposeOfReferenceCodeSequence
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
        assert purpose.CodeMeaning == "Source image for image processing operation"
        assert item.SpatialLocationsPreserved == "NO"
        assert image.DerivationDescription == derivation_description(nodule.seed.position_lps)
        assert (
            "Nine planes" in image.DerivationDescription and "[-1000, 500] HU" in image.DerivationDescription
        )
        assert "attention" in image.DerivationDescription and len(image.DerivationDescription) <= 1024
        assert image.DerivationCodeSequence[0].CodeValue == "113072"
        assert image.ConversionType == "WSD"
    # without the series: the reference instance
    alone = secondary_capture(result, identified_ct[2])
    assert {image.SourceImageSequence[0].ReferencedSOPInstanceUID for image in alone} == {uids[2]}


def test_every_written_secondary_capture_has_the_banner_and_both_stay_dciodvfy_clean(
    identified_ct: list[pydicom.Dataset], tmp_path: Path
) -> None:
    folder = _written(identified_ct, tmp_path)
    uids = [ds.SOPInstanceUID for ds in identified_ct]
    paths = sorted(folder.glob("nodule_*_sc.dcm"))
    assert len(paths) == len(_result().nodules)
    for path in paths:
        image = pydicom.dcmread(path)
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == uids[1]  # seeds at z 0 and 0.5
        banner = image.pixel_array[:30].reshape(-1, 3).astype(int)
        red = (banner[:, 0] > 150) & (banner[:, 1] < 60) & (banner[:, 2] < 60)
        white = np.all(banner > 230, axis=1)
        assert red.sum() > 5000 and white.sum() > 300  # the red banner with its white text
        # no identifier in the SC's pixels' text (ImageComments) either
        assert "HDR-0042-X" not in str(image.get("ImageComments", ""))
    _assert_dciodvfy_clean(*paths, folder / "report_pdf.dcm")
