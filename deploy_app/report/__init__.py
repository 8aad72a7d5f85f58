"""The readable report of the deploy app: a PDF for radiologists, its DICOM wrappers and the writers.

Split by concern, as highdicom splits ``sr/templates``:

- :mod:`~deploy_app.report.rows`: what every readable output shows (banners, model identity,
  finding rows, percentages, positions, plane titles): one home for the PDF, the montage and any
  JSON or text summary.
- :mod:`~deploy_app.report.montage`: the plane images (radiological display orientation, seed
  position, edge letters, colours) and the Secondary Capture montage of one nodule (numpy + Pillow).
- :mod:`~deploy_app.report.pdf`: the PDF (reportlab), byte-identical for the same input.
- :mod:`~deploy_app.report.dicom`: the Encapsulated PDF and Secondary Capture wrappers in the CT's
  study.
- :mod:`~deploy_app.report.writers`: the :class:`ReportWriter` protocol and the default outputs
  (``sr.dcm``, ``report.pdf``, ``report_pdf.dcm``, ``nodule_<n>_sc.dcm``) that
  :class:`~deploy_app.operators.ReportWritersOperator` runs.

The names below are re-exported so that callers import them from ``deploy_app.report``.
"""

from deploy_app.report.dicom import (
    DERIVATION_CODE,
    DOCUMENT_TITLE_CODE,
    SOURCE_PURPOSE_CODE,
    derivation_description,
    encapsulated_document_bytes,
    encapsulated_pdf,
    nearest_instance,
    secondary_capture,
)
from deploy_app.report.montage import (
    MONTAGE_PANEL,
    MONTAGE_SIZE,
    DisplayTransform,
    display_transform,
    displayed_seed_position,
    montage_panel_origin,
    plane_display,
    plane_edge_letters,
    render_montage,
    seed_pixel_position,
)
from deploy_app.report.pdf import ReportHeader, render_report_pdf
from deploy_app.report.rows import (
    DEMO_BANNER,
    MANUFACTURER,
    PLANE_NAMES,
    RESEARCH_BANNER,
    finding_text,
    top_findings,
)
from deploy_app.report.writers import (
    DEFAULT_WRITERS,
    EncapsulatedPdfWriter,
    PdfFileWriter,
    ReportInput,
    ReportWriter,
    SecondaryCaptureWriter,
    StructuredReportWriter,
)

__all__ = [
    "DEFAULT_WRITERS",
    "DEMO_BANNER",
    "DERIVATION_CODE",
    "DOCUMENT_TITLE_CODE",
    "MANUFACTURER",
    "MONTAGE_PANEL",
    "MONTAGE_SIZE",
    "PLANE_NAMES",
    "RESEARCH_BANNER",
    "SOURCE_PURPOSE_CODE",
    "DisplayTransform",
    "EncapsulatedPdfWriter",
    "PdfFileWriter",
    "ReportHeader",
    "ReportInput",
    "ReportWriter",
    "SecondaryCaptureWriter",
    "StructuredReportWriter",
    "derivation_description",
    "display_transform",
    "displayed_seed_position",
    "encapsulated_document_bytes",
    "encapsulated_pdf",
    "finding_text",
    "montage_panel_origin",
    "nearest_instance",
    "plane_display",
    "plane_edge_letters",
    "render_montage",
    "render_report_pdf",
    "secondary_capture",
    "seed_pixel_position",
    "top_findings",
]
