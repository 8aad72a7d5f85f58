"""The outputs written per analysed CT series, each a :class:`ReportWriter`.

:class:`~deploy_app.operators.ReportWritersOperator` runs a sequence of writers into one staging
folder per series and moves it into place when all of them succeeded. The defaults
(:data:`DEFAULT_WRITERS`, in this order) are:

============================================  ==================================================
Writer                                        File(s)
============================================  ==================================================
:class:`StructuredReportWriter`               ``sr.dcm``: the TID 1500 SR (:mod:`deploy_app.sr`)
:class:`PdfFileWriter`                        ``report.pdf``: the readable report
:class:`EncapsulatedPdfWriter`                ``report_pdf.dcm``: the same PDF as Encapsulated PDF
:class:`SecondaryCaptureWriter`               ``nodule_<n>_sc.dcm``: one montage per nodule
============================================  ==================================================

A site adds an output (a JSON summary for its dashboard, a copy to a share) or drops one (no
Secondary Capture images) by passing its own sequence, e.g.
``process_folder(..., report_writers=(*DEFAULT_WRITERS, MyWriter()))``, without editing the operator.
A writer takes its words and numbers from :mod:`deploy_app.report.rows` so that it shows what the PDF
shows. The PDF is rendered once per series, on first use (:attr:`ReportInput.pdf`), however many
writers use it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import pydicom

from deploy_app.dicom_io import write_dataset
from deploy_app.findings import SeriesResult
from deploy_app.report.dicom import encapsulated_pdf, secondary_capture
from deploy_app.report.pdf import ReportHeader, render_report_pdf
from deploy_app.sr import build_measurement_report

ENCAPSULATED_PDF_TITLE = "Semantic CLIP nodule report"
"""DocumentTitle of ``report_pdf.dcm``."""


@dataclass(frozen=True, eq=False)
class ReportInput:
    """One analysed CT series, as every writer gets it.

    Attributes:
        ct_datasets: every CT header of the series, in slice order (no pixel data needed).
        result: the nodules, the skipped seeds and the model identity.
    """

    ct_datasets: Sequence[pydicom.Dataset]
    result: SeriesResult

    @property
    def reference(self) -> pydicom.Dataset:
        """The CT instance whose patient, study and descriptions the outputs copy (the first)."""
        return self.ct_datasets[0]

    @functools.cached_property
    def pdf(self) -> bytes:
        """The readable report of :func:`~deploy_app.report.pdf.render_report_pdf`, rendered once."""
        reference = self.reference
        return render_report_pdf(
            self.result,
            study_description=str(reference.get("StudyDescription", "")) or None,
            series_description=str(reference.get("SeriesDescription", "")) or None,
            study_date=str(reference.get("StudyDate", "")) or None,
            header=ReportHeader.from_dataset(reference),
        )


@runtime_checkable
class ReportWriter(Protocol):
    """One output of the app: a name for messages and a writer.

    ``write`` puts this output's files into ``folder`` (the series' staging folder, which holds only
    what the writers before it wrote) and nothing outside it. When it cannot, it raises: the operator
    removes the staging folder, so nothing of the series is written, and the error propagates out of
    :func:`deploy_app.app.process_folder` (a :class:`~scripts.errors.UserInputError` for what the
    user can fix, which the command line reports as such; anything else is a bug).
    """

    name: str

    def write(self, report: ReportInput, folder: Path) -> None:
        """Write this output of ``report`` into ``folder``."""
        ...


class StructuredReportWriter:
    """``sr.dcm``: the TID 1500 Comprehensive 3D SR of :func:`deploy_app.sr.build_measurement_report`."""

    name = "TID 1500 structured report (sr.dcm)"

    def write(self, report: ReportInput, folder: Path) -> None:
        """Build the SR from every CT header and the results, and write it."""
        write_dataset(build_measurement_report(report.ct_datasets, report.result), folder / "sr.dcm")


class PdfFileWriter:
    """``report.pdf``: the readable report as a plain PDF file."""

    name = "PDF report (report.pdf)"

    def write(self, report: ReportInput, folder: Path) -> None:
        """Write the PDF's bytes."""
        (folder / "report.pdf").write_bytes(report.pdf)


class EncapsulatedPdfWriter:
    """``report_pdf.dcm``: the readable report as Encapsulated PDF Storage in the CT's study."""

    name = "encapsulated PDF report (report_pdf.dcm)"

    def write(self, report: ReportInput, folder: Path) -> None:
        """Wrap the PDF (referencing every CT instance) and write it."""
        document = encapsulated_pdf(
            report.pdf,
            report.reference,
            title=ENCAPSULATED_PDF_TITLE,
            source_datasets=report.ct_datasets,
            model_name=report.result.model.name,
            software_versions=report.result.model.version,
        )
        write_dataset(document, folder / "report_pdf.dcm")


class SecondaryCaptureWriter:
    """``nodule_<n>_sc.dcm``: one Secondary Capture montage per analysed nodule (n from 1)."""

    name = "Secondary Capture montages (nodule_<n>_sc.dcm)"

    def write(self, report: ReportInput, folder: Path) -> None:
        """Render and write one image per nodule (each referencing the CT slice nearest its seed)."""
        images = secondary_capture(report.result, report.reference, source_datasets=report.ct_datasets)
        for number, image in enumerate(images, start=1):
            write_dataset(image, folder / f"nodule_{number}_sc.dcm")


DEFAULT_WRITERS: tuple[ReportWriter, ...] = (
    StructuredReportWriter(),
    PdfFileWriter(),
    EncapsulatedPdfWriter(),
    SecondaryCaptureWriter(),
)
"""The app's outputs per series, in the order they are written."""
