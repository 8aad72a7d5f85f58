"""The "analysis not performed" notice: a one-page Encapsulated PDF for a study the app could not analyse.

When the PACS listener gives up on a study (no usable CT series, no nodule seeds, every seed outside
the scan, repeated internal errors), it sends this notice to the destination instead of results, so
that the reader of the PACS learns that the study was received and why it has no results, rather
than waiting for results that will never come. It joins the study it is about (a new DOC series,
:data:`NOTICE_SERIES_DESCRIPTION`), like the report of :func:`deploy_app.report.dicom.encapsulated_pdf`,
which wraps it.

The page carries the research-use banner, the patient and study header of the main report
(:class:`~deploy_app.report.pdf.ReportHeader`: name, ID, birth date, accession number, study date),
the title "Analysis not performed", the reason of each failing series in plain words, what to do
next and the software version. Long or many reasons are shortened (:data:`MAX_REASONS`,
:data:`MAX_REASON_CHARACTERS`) and the body is shrunk to fit if it must, so the notice is always one
page and its rendering never raises a reportlab ``LayoutError``.

Pure functions: :func:`render_failure_notice_pdf` returns the PDF's bytes, :func:`failure_notice`
the dataset; writing it is the caller's job (:func:`deploy_app.dicom_io.write_dataset`).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
from collections.abc import Sequence
from xml.sax.saxutils import escape

import pydicom
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Flowable, KeepInFrame, Paragraph, SimpleDocTemplate, Spacer

from deploy_app.report.dicom import encapsulated_pdf

# the main report's page geometry, so that both documents' banners and headers sit alike
from deploy_app.report.pdf import _BANNER_HEIGHT, _HEADER_LINE, _MARGIN, ReportHeader, page_decorator
from deploy_app.report.rows import MANUFACTURER, RESEARCH_BANNER

__all__ = [
    "MAX_REASONS",
    "MAX_REASON_CHARACTERS",
    "NOTICE_SERIES_DESCRIPTION",
    "NOTICE_SERIES_NUMBER",
    "NOTICE_TITLE",
    "failure_notice",
    "notice_paragraphs",
    "render_failure_notice_pdf",
]

NOTICE_TITLE = "Analysis not performed"
"""The PDF's title and the instance's Document Title."""

NOTICE_SERIES_DESCRIPTION = "Semantic CLIP: analysis not performed"
"""SeriesDescription of the notice's series (the results use 900-903; the notice 904)."""

NOTICE_SERIES_NUMBER = 904

MAX_REASONS = 6
"""Reasons listed one by one; further ones are counted ("... and 3 more")."""

MAX_REASON_CHARACTERS = 1000
"""A longer reason is cut there and ends with an ellipsis."""

_SUMMARY = (
    "The lung nodule analysis (Semantic CLIP, research use only) received this study but produced "
    "no results for it: no structured report, report or images with findings were made. This "
    "notice is not a finding; it says nothing about the images."
)

_NEXT_STEPS = (
    "Read the study as usual; the analysis gives no result for it.",
    "To have it analysed, check what the reason says is missing or wrong: the analysis needs an "
    "axial CT series of the chest and nodule seeds (a DICOM SR or SEG that marks each nodule), "
    "with every seed inside the scanned volume.",
    "Complete or correct the study and send it to the analysis again: the new results arrive as "
    "new series in this study.",
    "If the reason does not explain the failure, ask the administrator of the analysis service, "
    "quoting the reference below.",
)


def _plain(text: object) -> str:
    """Text the PDF's standard fonts can draw: control characters become spaces, characters outside
    Windows-1252 become "?", runs of white space one space."""
    shown = "".join(c if c.isprintable() else " " for c in str(text))
    shown = shown.encode("cp1252", errors="replace").decode("cp1252")
    return " ".join(shown.split())


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def _reason_lines(reasons: Sequence[str]) -> list[str]:
    shown = [_shortened(_plain(reason), MAX_REASON_CHARACTERS) for reason in reasons]
    shown = [reason for reason in shown if reason] or ["no reason was given"]
    if len(shown) > MAX_REASONS:
        more = len(shown) - (MAX_REASONS - 1)
        shown = [*shown[: MAX_REASONS - 1], f"\u2026 and {more} more (see the log of the analysis service)"]
    return shown


def notice_paragraphs(
    reasons: Sequence[str],
    *,
    model_name: str,
    model_version: str,
    reference: str | None = None,
    created: datetime.datetime | None = None,
) -> list[tuple[str, str]]:
    """The notice's body as (kind, plain text) in page order, below the banner and the header.

    Kinds: ``title``, ``text``, ``heading``, ``reason`` (one per failing series), ``step`` (what to
    do next, numbered on the page), ``small``. The texts are what the page shows (shortened as
    described in the module docstring), for the PDF and for tests.

    Args:
        reasons: why the study was not analysed, one message per failing series.
        model_name: the model bundle's name.
        model_version: the model bundle's version.
        reference: what an administrator looks the study up by (the listener's run name), if any.
        created: when the notice was made (shown to the minute), if given.

    Returns:
        the paragraphs.
    """
    body: list[tuple[str, str]] = [("title", NOTICE_TITLE), ("text", _SUMMARY), ("heading", "Reason")]
    body += [("reason", reason) for reason in _reason_lines(reasons)]
    body.append(("heading", "What to do next"))
    body += [("step", step) for step in _NEXT_STEPS]
    software = _plain(f"Software: model bundle {model_name}, version {model_version}")
    body.append(("small", _shortened(software, 300)))
    if reference:
        body.append(("small", _shortened(_plain(f"Reference: {reference}"), 300)))
    if created is not None:
        body.append(("small", f"Notice created: {created.strftime('%Y-%m-%d %H:%M')}"))
    return body


def _styles() -> dict[str, ParagraphStyle]:
    sheet = getSampleStyleSheet()
    body = ParagraphStyle("notice-body", parent=sheet["BodyText"], fontSize=10, leading=13, spaceAfter=2 * mm)
    return {
        "title": ParagraphStyle("notice-title", parent=sheet["Title"], fontSize=18, spaceAfter=5 * mm),
        "text": body,
        "heading": ParagraphStyle(
            "notice-heading", parent=sheet["Heading2"], spaceBefore=3 * mm, spaceAfter=2 * mm
        ),
        "reason": ParagraphStyle("notice-reason", parent=body, leftIndent=5 * mm, bulletIndent=0),
        "step": ParagraphStyle("notice-step", parent=body, leftIndent=5 * mm, bulletIndent=0),
        "small": ParagraphStyle(
            "notice-small", parent=sheet["BodyText"], fontSize=8, leading=10, textColor=colors.grey
        ),
    }


def _story(paragraphs: Sequence[tuple[str, str]]) -> list[Flowable]:
    styles = _styles()
    story: list[Flowable] = []
    step = 0
    for kind, text in paragraphs:
        if kind == "small" and story and not isinstance(story[-1], Spacer) and text.startswith("Software"):
            story.append(Spacer(1, 4 * mm))
        if kind == "reason":
            story.append(Paragraph(escape(text), styles[kind], bulletText="\u2022"))
        elif kind == "step":
            step += 1
            story.append(Paragraph(escape(text), styles[kind], bulletText=f"{step}."))
        else:
            story.append(Paragraph(escape(text), styles[kind]))
    return story


def render_failure_notice_pdf(
    header: ReportHeader,
    reasons: Sequence[str],
    *,
    model_name: str,
    model_version: str,
    reference: str | None = None,
    created: datetime.datetime | None = None,
    compress: bool = True,
) -> bytes:
    """Draw the one-page "Analysis not performed" PDF.

    Args:
        header: the patient and study values of the page header (usually
            :meth:`ReportHeader.from_dataset` of a received instance).
        reasons: why the study was not analysed, one message per failing series.
        model_name: the model bundle's name.
        model_version: the model bundle's version.
        reference: the listener's reference of the study (its run name), if any.
        created: when the notice was made, if it is to be shown.
        compress: compress the page stream (False keeps the text operators readable, for tests).

    Returns:
        the PDF file's bytes (one page; byte-identical for the same input).
    """
    buffer = io.BytesIO()
    top_margin = _MARGIN / 2 + _BANNER_HEIGHT + len(header.lines()) * _HEADER_LINE + 4 * mm
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=top_margin,
        bottomMargin=_MARGIN,
        title=f"{NOTICE_TITLE} (lung nodule semantic CLIP, research use only)",
        author=MANUFACTURER,
        subject="The lung nodule analysis produced no results for this study",
        creator=_plain(f"{MANUFACTURER} {model_name} {model_version}"),
        invariant=1,
        pageCompression=1 if compress else 0,
    )
    paragraphs = notice_paragraphs(
        reasons, model_name=model_name, model_version=model_version, reference=reference, created=created
    )
    # One frame's worth at most: what does not fit is shrunk (never a second page, never a
    # LayoutError); the caps on the reasons keep that from happening in practice.
    body = KeepInFrame(doc.width, doc.height - 1, _story(paragraphs), mode="shrink")
    decorate = page_decorator(
        [RESEARCH_BANNER],
        header,
        "Lung nodule semantic CLIP: analysis not performed",
        "Page {} of 1".format,
    )
    doc.build([body], onFirstPage=decorate, onLaterPages=decorate)
    return buffer.getvalue()


def failure_notice(
    reference_dataset: pydicom.Dataset,
    reasons: Sequence[str],
    *,
    model_name: str,
    model_version: str,
    reference: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = NOTICE_SERIES_NUMBER,
    content_datetime: datetime.datetime | None = None,
) -> pydicom.Dataset:
    """The "Analysis not performed" notice of a study, as Encapsulated PDF Storage in that study.

    Args:
        reference_dataset: a received instance of the study (a CT header preferably; any instance
            with the patient and study attributes will do, e.g. the seeds SR). Pixel data is not
            needed. Patient and study attributes are copied from it and it is referenced as the
            source instance.
        reasons: why the study was not analysed, one message per failing series, in plain words.
        model_name: the model bundle's name (Manufacturer's Model Name).
        model_version: the model bundle's version (Software Versions).
        reference: the listener's reference of the study (its run name), shown on the page.
        series_instance_uid: SeriesInstanceUID of the notice (default: a new UID).
        sop_instance_uid: SOPInstanceUID of the notice (default: a new UID).
        series_number: SeriesNumber (default :data:`NOTICE_SERIES_NUMBER`).
        content_datetime: content, series and instance creation date/time (default: now).

    Returns:
        the dataset with its file meta information, ready to write.

    Raises:
        ValueError: ``reference_dataset`` has no StudyInstanceUID.
    """
    moment = content_datetime or datetime.datetime.now()
    # the header says whom and which study the page is about; the notice covers every series
    header = dataclasses.replace(
        ReportHeader.from_dataset(reference_dataset), series_description="all received series"
    )
    pdf = render_failure_notice_pdf(
        header,
        reasons,
        model_name=model_name,
        model_version=model_version,
        reference=reference,
        created=moment,
    )
    return encapsulated_pdf(
        pdf,
        reference_dataset,
        series_number=series_number,
        title=NOTICE_TITLE,
        series_description=NOTICE_SERIES_DESCRIPTION,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        source_datasets=(
            [reference_dataset]
            if "SOPClassUID" in reference_dataset and "SOPInstanceUID" in reference_dataset
            else []
        ),
        content_datetime=moment,
        model_name=model_name,
        software_versions=model_version,
    )
