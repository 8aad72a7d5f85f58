"""The report writers: the defaults write what the report functions give; a site adds or drops one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from demo.study import write_demo_study
from deploy_app.app import process_folder
from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed, SeriesResult, SkippedSeed
from deploy_app.inference import BundleModels
from deploy_app.report import (
    DEFAULT_WRITERS,
    ReportInput,
    ReportWriter,
    SecondaryCaptureWriter,
    encapsulated_document_bytes,
    finding_rows,
    render_montage,
    render_report_pdf,
)
from deploy_app.sr_reader import read_measurement_report
from training.demo_bundle import build_untrained_bundle
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DEFAULT_FILES = {"sr.dcm", "report.pdf", "report_pdf.dcm", "nodule_1_sc.dcm", "nodule_2_sc.dcm"}


class FindingsJsonWriter:
    """A site's own output: the finding rows of every nodule as JSON."""

    name = "findings JSON (findings.json)"

    def write(self, report: ReportInput, folder: Path) -> None:
        nodules = [
            {"label": nodule.seed.label, "findings": [list(row) for row in finding_rows(nodule.semantic)]}
            for nodule in report.result.nodules
        ]
        (folder / "findings.json").write_text(json.dumps({"nodules": nodules}))


class BrokenWriter:
    """A writer that fails after writing part of its output."""

    name = "broken output"

    def write(self, report: ReportInput, folder: Path) -> None:
        (folder / "half_written.txt").write_text("partial")
        raise OSError("disk full")


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
    assert findings["nodules"][0]["findings"] == [
        list(row) for row in finding_rows(result.nodules[0].semantic)
    ]


def test_a_failing_writer_fails_the_series_and_leaves_nothing(
    study: tuple[Path, str], models: BundleModels, tmp_path: Path
) -> None:
    """A file-system error in a writer fails that series (with the OS reason) and leaves no series or
    staging folder behind (a bug in a writer propagates: tests/test_faults.py)."""
    output = tmp_path / "out"
    outcome = process_folder(
        study[0], output, models=models, report_writers=(*DEFAULT_WRITERS, BrokenWriter())
    )
    assert not outcome.written and len(outcome.failures) == 1
    assert "disk full" in outcome.failures[0].message
    assert list(output.iterdir()) == []  # no series folder, no staging folder left behind
