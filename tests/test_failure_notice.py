"""The "analysis not performed" notice (deploy_app.report.failure_notice): content, UIDs, validity."""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, EncapsulatedPDFStorage
from test_report import _assert_dciodvfy_clean, _text_blocks

from deploy_app.dicom_io import write_dataset
from deploy_app.pacs_dispatch import NOTICE_FILE, FailureNoticeWriter
from deploy_app.report import encapsulated_document_bytes
from deploy_app.report.failure_notice import (
    MAX_REASON_CHARACTERS,
    MAX_REASONS,
    NOTICE_SERIES_DESCRIPTION,
    NOTICE_SERIES_NUMBER,
    NOTICE_TITLE,
    failure_notice,
    notice_paragraphs,
    render_failure_notice_pdf,
)
from deploy_app.report.pdf import ReportHeader
from deploy_app.report.rows import RESEARCH_BANNER
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

PATIENT_NAME = "Zyxwvut^Qponm"
PATIENT_ID = "PID-4411-NOTICE"
MOMENT = datetime.datetime(2025, 3, 4, 5, 6, 7)
REASONS = (
    "series 3 'Chest 1 mm' (1.2.826.0.1.3680043.8.498.77): no nodule seeds: the study has no seeds SR or SEG",
    "series 4 'Scout' (1.2.826.0.1.3680043.8.498.78): not an axial CT series of at least 16 slices",
)


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    written = write_ct_series(
        np.full((3, 8, 8), -1000.0),
        CTGeometry((3, 8, 8), (1.0, 1.0), 1.0),
        tmp_path_factory.mktemp("ct") / "series",
        patient=SyntheticPatient(PATIENT_ID, PATIENT_NAME),
        uid_seed="notice-test",
    )
    return written.directory


@pytest.fixture(scope="module")
def ct_dataset(ct_folder: Path) -> pydicom.Dataset:
    ct = pydicom.dcmread(sorted(ct_folder.glob("*.dcm"))[0], stop_before_pixels=True)
    ct.AccessionNumber = "ACC-9182"
    return ct


def squeezed(text: str) -> str:
    """Text without white space: a wrapped paragraph's lines are drawn as separate pieces."""
    return re.sub(r"\s+", "", text)


def notice_text(pdf: bytes) -> str:
    return squeezed("".join(_text_blocks(pdf)))


def page_count(pdf: bytes) -> int:
    return len(re.findall(rb"/Type /Page\b(?!s)", pdf))


def test_the_notice_is_an_encapsulated_pdf_in_the_same_study(
    ct_dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    ds = failure_notice(
        ct_dataset,
        REASONS,
        model_name="lung_nodule_ct_semantic_clip",
        model_version="0.3.1",
        reference="1.2.3_2",
        content_datetime=MOMENT,
    )
    path = write_dataset(ds, tmp_path / NOTICE_FILE)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == EncapsulatedPDFStorage and back.Modality == "DOC"
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.StudyInstanceUID == ct_dataset.StudyInstanceUID
    assert back.SeriesInstanceUID != ct_dataset.SeriesInstanceUID
    assert back.SOPInstanceUID != ct_dataset.SOPInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyDate",
        "StudyID",
    ):
        assert back[keyword].value == ct_dataset[keyword].value, keyword
    assert back.DocumentTitle == NOTICE_TITLE == "Analysis not performed"
    assert back.SeriesDescription == NOTICE_SERIES_DESCRIPTION and back.SeriesNumber == NOTICE_SERIES_NUMBER
    assert back.ManufacturerModelName == "lung_nodule_ct_semantic_clip" and back.SoftwareVersions == "0.3.1"
    assert back.ContentDate == "20250304" and back.ContentTime == "050607"
    assert back.SourceInstanceSequence[0].ReferencedSOPInstanceUID == ct_dataset.SOPInstanceUID
    assert back.BurnedInAnnotation == "YES"  # the page header shows the patient
    pdf = encapsulated_document_bytes(back)
    header = dataclasses.replace(
        ReportHeader.from_dataset(ct_dataset), series_description="all received series"
    )
    assert pdf == render_failure_notice_pdf(
        header,
        REASONS,
        model_name="lung_nodule_ct_semantic_clip",
        model_version="0.3.1",
        reference="1.2.3_2",
        created=MOMENT,
    )  # byte-identical for the same input
    assert page_count(pdf) == 1
    again = failure_notice(ct_dataset, REASONS, model_name="m", model_version="1")
    assert again.SeriesInstanceUID != back.SeriesInstanceUID and again.SOPInstanceUID != back.SOPInstanceUID
    given = failure_notice(
        ct_dataset,
        REASONS,
        model_name="m",
        model_version="1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.901",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.902",
    )
    assert (given.SeriesInstanceUID, given.SOPInstanceUID) == (
        "1.2.826.0.1.3680043.8.498.901",
        "1.2.826.0.1.3680043.8.498.902",
    )
    _assert_dciodvfy_clean(path)


def test_the_page_says_why_what_to_do_and_for_whom(ct_dataset: pydicom.Dataset) -> None:
    pdf = render_failure_notice_pdf(
        ReportHeader.from_dataset(ct_dataset),
        REASONS,
        model_name="lung_nodule_ct_semantic_clip",
        model_version="0.3.1",
        reference="1.2.826.0.1.3680043.8.498.10_2",
        created=MOMENT,
        compress=False,
    )
    blocks = _text_blocks(pdf)
    assert blocks[0] == RESEARCH_BANNER and page_count(pdf) == 1
    header = " | ".join(blocks[1:7])
    for shown in ("Patient: Zyxwvut, Qponm", f"Patient ID: {PATIENT_ID}", "Accession: ACC-9182"):
        assert shown in header
    assert "Birth date: " in header and "Study date: " in header
    text = notice_text(pdf)
    for expected in (
        NOTICE_TITLE,
        "produced no results",
        "This notice is not a finding",
        *REASONS,
        "What to do next",
        "nodule seeds",
        "every seed inside the scanned volume",
        "send it to the analysis again",
        "Software: model bundle lung_nodule_ct_semantic_clip, version 0.3.1",
        "Reference: 1.2.826.0.1.3680043.8.498.10_2",
        "Notice created: 2025-03-04 05:06",
    ):
        assert squeezed(expected) in text, expected
    kinds = [kind for kind, _ in notice_paragraphs(REASONS, model_name="m", model_version="1")]
    assert kinds.count("reason") == 2 and kinds.count("step") == 4 and kinds[0] == "title"


@pytest.mark.parametrize("case", ["one long word", "long text", "many reasons", "hostile characters"])
def test_long_or_odd_reasons_are_shortened_and_stay_on_one_page(
    ct_dataset: pydicom.Dataset, case: str
) -> None:
    reasons = {
        "one long word": ["x" * 100_000],
        "long text": ["word " * 20_000] * 3,
        "many reasons": [f"series {n} 'Chest' ({'1.2.' * 15}{n}): no nodule seeds " * 8 for n in range(500)],
        "hostile characters": ["tab\there\x00nul\x1bescape, \u4e2d\u6587 and <b>markup</b> & \ufffd " * 40],
    }[case]
    long_header = ReportHeader(patient_name="A" * 500 + "^" + "B" * 500, patient_id="9" * 300)
    pdf = render_failure_notice_pdf(long_header, reasons, model_name="m", model_version="1", compress=False)
    assert page_count(pdf) == 1
    body = [
        text
        for kind, text in notice_paragraphs(reasons, model_name="m", model_version="1")
        if kind == "reason"
    ]
    assert len(body) <= MAX_REASONS and all(len(text) <= MAX_REASON_CHARACTERS for text in body)
    if case == "many reasons":
        assert body[-1].startswith(f"\u2026 and {500 - (MAX_REASONS - 1)} more")
    elif case == "hostile characters":
        assert "<b>markup</b> &" in body[0] and "\x00" not in body[0] and "\t" not in body[0]
        assert "??" in body[0]  # outside the fonts' range: shown as "?", never another letter
    else:
        assert body[0].endswith("\u2026")
    text = notice_text(pdf)
    assert squeezed(NOTICE_TITLE) in text and squeezed("What to do next") in text


def test_a_notice_without_reasons_still_says_so(ct_dataset: pydicom.Dataset) -> None:
    body = notice_paragraphs(["", "  "], model_name="m", model_version="1")
    assert [text for kind, text in body if kind == "reason"] == ["no reason was given"]


def test_the_writer_prefers_a_ct_header_and_falls_back_to_any_instance(
    ct_folder: Path, ct_dataset: pydicom.Dataset, tmp_path: Path
) -> None:
    study = tmp_path / "failed" / "run"
    study.mkdir(parents=True)
    sr = pydicom.dcmread(sorted(ct_folder.glob("*.dcm"))[0], stop_before_pixels=True)
    for keyword in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns"):
        delattr(sr, keyword)
    sr.SOPClassUID = Comprehensive3DSRStorage
    sr.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.555"
    sr.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.556"
    sr.Modality = "SR"
    sr.file_meta.MediaStorageSOPClassUID = Comprehensive3DSRStorage
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.save_as(study / "0-seeds.dcm")  # sorts first: a CT is still preferred when there is one
    (study / "notes.txt").write_text("not DICOM")
    writer = FailureNoticeWriter(model_name="bundle", model_version="2.0")

    only_sr = writer(study, tmp_path / "out1", ["no CT series"], "run")
    notice = pydicom.dcmread(only_sr)
    assert only_sr.name == NOTICE_FILE and notice.StudyInstanceUID == ct_dataset.StudyInstanceUID
    assert notice.PatientID == PATIENT_ID
    assert notice.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
    assert (notice.ManufacturerModelName, notice.SoftwareVersions) == ("bundle", "2.0")

    ct_file = sorted(ct_folder.glob("*.dcm"))[0]
    (study / "1-ct.dcm").write_bytes(ct_file.read_bytes())
    with_ct = pydicom.dcmread(writer(study, tmp_path / "out2", ["no seeds"], "run"))
    assert with_ct.SourceInstanceSequence[0].ReferencedSOPInstanceUID == ct_dataset.SOPInstanceUID

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(ValueError, match="no readable DICOM instance"):
        writer(empty, tmp_path / "out3", ["x"], "run")


def test_the_writer_reads_the_bundle_identity(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text('{"name": "nodule_bundle", "version": "1.2.3"}')
    assert FailureNoticeWriter(bundle).identity() == ("nodule_bundle", "1.2.3")
    assert FailureNoticeWriter(tmp_path / "nothing").identity() == ("unknown", "unknown")
