"""The readable report of one CT series as a PDF for radiologists (reportlab).

:func:`render_report_pdf` draws a research-use banner on every page, the model's identity, and per
nodule its label, world LPS seed, probability of cancer, the nine planes the model saw (3 x 3, seed
marked, attention weight in each title, in the radiological display orientation of
:func:`deploy_app.report.montage.plane_display`) and the zero-shot semantic findings; then the seeds
that were skipped and why. Every page's header shows the patient and study the report is about
(:class:`ReportHeader`, copied from the CT: name, ID, birth date, accession number, study date and
series description), so a printed page cannot be filed to the wrong patient; these identifiers are
drawn, never logged. The PDF is byte-identical for the same input. The words and numbers come
from :mod:`deploy_app.report.rows`, the plane image helpers from :mod:`deploy_app.report.montage`.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from deploy_app.findings import NoduleResult, SeriesResult, SkippedSeed
from deploy_app.report.montage import (
    BANNER_RED,
    EDGE_LETTER_COLOUR,
    MARKER_COLOUR,
    checked_planes,
    displayed_seed_position,
    grey_pixels,
    plane_display,
    plane_edge_letters,
)
from deploy_app.report.rows import (
    MANUFACTURER,
    banners,
    display_date,
    finding_text,
    model_line,
    percent,
    plane_attention,
    plane_title,
    position,
    probability_basis,
    reliability_note,
    threshold_text,
)
from scripts.transforms import PLANE_DIRECTIONS

_SEMANTIC_NOTE = (
    "Zero-shot findings: similarity of the image embedding to one text prompt per value; "
    "they explain the image, they are not a radiologist's reading. A finding whose most probable "
    "value stays below its confidence threshold is reported as indeterminate."
)
_PLANES_NOTE = (
    "The planes the model saw (50 x 50 mm at 1 mm, window -1000..500 HU), shown in radiological "
    "orientation: patient right on the image left, anterior up (axial), superior up (coronal, "
    "sagittal with anterior on the left; the oblique planes likewise). Edge letters give each edge's "
    "direction (S/I superior/inferior, A/P anterior/posterior, R/L right/left). The cross marks the "
    "seed; the plane with the highest attention is framed."
)

_PAGE_WIDTH, _PAGE_HEIGHT = A4
_MARGIN = 15 * mm
_BANNER_HEIGHT = 9 * mm
_HEADER_LINE = 4 * mm
_HEADER_FONT, _HEADER_SIZE, _HEADER_MIN_SIZE = "Helvetica", 8.0, 5.0

MISSING = "\u2014"
"""Shown in the page header for a value the CT does not have (an em dash)."""


def _header_text(value: str | None) -> str:
    """A header value as shown: one line of text the PDF's standard fonts can draw.

    Control characters become spaces; characters outside the fonts' Windows-1252 range become "?"
    (reportlab would otherwise draw another letter in their place); empty -> :data:`MISSING`.
    """
    if value is None:
        return MISSING
    text = "".join(character if character.isprintable() else " " for character in value).strip()
    text = text.encode("cp1252", errors="replace").decode("cp1252")
    return text or MISSING


def _person_name(value: str | None) -> str:
    """A DICOM person name (PN) as shown: "Family, Given Middle Prefix Suffix" of its first group.

    The alphabetic group is shown, or the ideographic or phonetic one when it is empty.
    """
    if value is None:
        return MISSING
    group = next((g for g in value.split("=") if g.strip("^ ")), "")
    family, given, middle, prefix, suffix = ([*group.split("^"), "", "", "", ""])[:5]
    first = " ".join(part.strip() for part in (given, middle, prefix, suffix) if part.strip())
    shown = ", ".join(part for part in (family.strip(), first) if part)
    return _header_text(shown)


@dataclass(frozen=True)
class ReportHeader:
    """Who and what the report is about: shown in the header of every page, copied from the CT.

    The values are identifiers: they are drawn into the PDF only, never logged.

    Attributes:
        patient_name: PatientName (as DICOM stores it, ``Family^Given^Middle^Prefix^Suffix``).
        patient_id: PatientID.
        birth_date: PatientBirthDate (YYYYMMDD).
        accession_number: AccessionNumber.
        study_date: StudyDate (YYYYMMDD).
        series_description: SeriesDescription.
    """

    patient_name: str | None = None
    patient_id: str | None = None
    birth_date: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    series_description: str | None = None

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset) -> ReportHeader:
        """The header values of a CT instance (missing or empty attributes: None).

        Args:
            ds: any instance of the CT series the report is about.

        Returns:
            the header.
        """

        def value(keyword: str) -> str | None:
            raw = ds.get(keyword)
            if raw is None or raw == "":
                return None
            return "\\".join(str(v) for v in raw) if isinstance(raw, MultiValue) else str(raw)

        return cls(
            patient_name=value("PatientName"),
            patient_id=value("PatientID"),
            birth_date=value("PatientBirthDate"),
            accession_number=value("AccessionNumber"),
            study_date=value("StudyDate"),
            series_description=value("SeriesDescription"),
        )

    def lines(self) -> list[list[tuple[str, float]]]:
        """The header as drawn: two lines of (text, share of the line width) fields.

        Returns:
            ``[[name, ID, birth date], [accession, study date, series]]``, each text
            ``"Label: value"`` with :data:`MISSING` for a missing value.
        """

        def date(value: str | None) -> str:
            return display_date(value) if (value or "").strip() else MISSING

        return [
            [
                (f"Patient: {_person_name(self.patient_name)}", 0.45),
                (f"Patient ID: {_header_text(self.patient_id)}", 0.33),
                (f"Birth date: {_header_text(date(self.birth_date))}", 0.22),
            ],
            [
                (f"Accession: {_header_text(self.accession_number)}", 0.33),
                (f"Study date: {_header_text(date(self.study_date))}", 0.22),
                (f"Series: {_header_text(self.series_description)}", 0.45),
            ],
        ]


def _fitted(text: str, width: float) -> tuple[str, float]:
    """``text`` and a font size that fits ``width``: smaller type first, then an ellipsis at 5 pt."""
    size = _HEADER_SIZE
    while size > _HEADER_MIN_SIZE and stringWidth(text, _HEADER_FONT, size) > width:
        size -= 0.5
    if stringWidth(text, _HEADER_FONT, size) <= width:
        return text, size
    while text and stringWidth(text + "\u2026", _HEADER_FONT, size) > width:
        text = text[:-1]
    return text + "\u2026", size


def page_decorator(
    banner_lines: Sequence[str],
    header: ReportHeader,
    footer: str = "Lung nodule semantic CLIP report",
    page_label: Callable[[int], str] = "Page {}".format,
) -> Callable[[Canvas, SimpleDocTemplate], None]:
    """onPage callback of every PDF the app writes: the banner(s) and the patient and study header
    at the top, ``footer`` and the page label at the bottom of every page.

    Args:
        banner_lines: the banners (the first on red, the others on black).
        header: the patient and study values.
        footer: the text at the bottom left.
        page_label: the page number -> the text at the bottom right.
    """
    header_lines = header.lines()
    line_width = _PAGE_WIDTH - 2 * _MARGIN

    def decorate(canvas: Canvas, doc: SimpleDocTemplate) -> None:
        canvas.saveState()
        top = _PAGE_HEIGHT - _MARGIN / 2
        for line, text in enumerate(banner_lines):
            y = top - (line + 1) * _BANNER_HEIGHT
            canvas.setFillColor(colors.HexColor(BANNER_RED) if line == 0 else colors.black)
            canvas.rect(_MARGIN, y, line_width, _BANNER_HEIGHT - 1 * mm, stroke=0, fill=1)
            canvas.setFillColor(colors.white)
            canvas.setFont("Helvetica-Bold", 12)
            canvas.drawCentredString(_PAGE_WIDTH / 2, y + 2.6 * mm, text)
        canvas.setFillColor(colors.black)
        header_top = top - len(banner_lines) * _BANNER_HEIGHT
        for line, fields in enumerate(header_lines):
            y, x = header_top - (line + 1) * _HEADER_LINE + 1 * mm, _MARGIN
            for text, share in fields:
                shown, size = _fitted(text, share * line_width - 2 * mm)
                canvas.setFont(_HEADER_FONT, size)
                canvas.drawString(x, y, shown)
                x += share * line_width
        canvas.setFillColor(colors.grey)
        canvas.setFont("Helvetica", 8)
        canvas.drawString(_MARGIN, _MARGIN / 2, footer)
        canvas.drawRightString(_PAGE_WIDTH - _MARGIN, _MARGIN / 2, page_label(doc.page))
        canvas.restoreState()

    return decorate


class _PlaneGrid(Flowable):
    """The nine planes in a 3 x 3 grid, each titled, with edge letters and the seed cross (vector)."""

    _TITLE = 4.5 * mm
    _GAP = 3 * mm

    def __init__(self, planes: np.ndarray, attention: Sequence[float | None], width: float) -> None:
        super().__init__()
        self.planes = planes
        self.attention = list(attention)
        self.cell = (width - 2 * self._GAP) / 3
        self.width = width
        self.height = 3 * (self.cell + self._TITLE) + 2 * self._GAP

    def wrap(self, available_width: float, available_height: float) -> tuple[float, float]:
        return self.width, self.height

    def draw(self) -> None:
        canvas = self.canv
        known = [w for w in self.attention if w is not None]
        focus = int(np.argmax(known)) if known else None
        for plane in range(len(PLANE_DIRECTIONS)):
            grid_row, grid_column = divmod(plane, 3)
            x0 = grid_column * (self.cell + self._GAP)
            top = self.height - grid_row * (self.cell + self._TITLE + self._GAP)
            y0 = top - self._TITLE - self.cell
            canvas.setFillColor(colors.black)
            canvas.setFont("Helvetica", 7.5)
            canvas.drawString(x0, top - self._TITLE + 1.3 * mm, plane_title(plane, self.attention[plane]))
            display = plane_display(plane)
            pixels = np.ascontiguousarray(display.apply(grey_pixels(self.planes[plane])))
            rows, columns = pixels.shape
            seed_row, seed_column = displayed_seed_position(plane, self.planes.shape)
            image = Image.fromarray(pixels, mode="L")
            canvas.drawImage(ImageReader(image), x0, y0, width=self.cell, height=self.cell)
            if plane == focus:
                canvas.setStrokeColor(colors.HexColor(BANNER_RED))
                canvas.setLineWidth(1.5)
                canvas.rect(x0, y0, self.cell, self.cell, stroke=1, fill=0)
            self._edge_letters(plane, x0, y0)
            # pixel (r, c) covers [c, c + 1) x [r, r + 1) of the image extent: its centre is + 0.5
            scale_x, scale_y = self.cell / columns, self.cell / rows
            self._cross(x0 + (seed_column + 0.5) * scale_x, y0 + self.cell - (seed_row + 0.5) * scale_y)

    def _edge_letters(self, plane: int, x0: float, y0: float) -> None:
        canvas, cell, inset = self.canv, self.cell, 1.2 * mm
        letters = plane_edge_letters(plane)
        canvas.setFillColor(colors.HexColor(EDGE_LETTER_COLOUR))
        canvas.setFont("Helvetica-Bold", 7)
        canvas.drawCentredString(x0 + cell / 2, y0 + cell - inset - 2.2 * mm, letters["top"])
        canvas.drawCentredString(x0 + cell / 2, y0 + inset, letters["bottom"])
        canvas.drawString(x0 + inset, y0 + cell / 2 - 1 * mm, letters["left"])
        canvas.drawRightString(x0 + cell - inset, y0 + cell / 2 - 1 * mm, letters["right"])

    def _cross(self, x: float, y: float) -> None:
        """A cross with an open centre, so the marker does not hide the nodule it points at."""
        canvas = self.canv
        gap, arm = 1.5 * mm, 4.0 * mm
        canvas.setStrokeColor(colors.HexColor(MARKER_COLOUR))
        canvas.setLineWidth(0.8)
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            canvas.line(x + dx * gap, y + dy * gap, x + dx * arm, y + dy * arm)


def _styles() -> dict[str, ParagraphStyle]:
    sheet = getSampleStyleSheet()
    return {
        "title": ParagraphStyle("title", parent=sheet["Title"], fontSize=16, spaceAfter=4 * mm),
        "h2": ParagraphStyle("h2", parent=sheet["Heading2"], spaceBefore=2 * mm, spaceAfter=2 * mm),
        "body": ParagraphStyle("body", parent=sheet["BodyText"], fontSize=9.5, leading=12),
        "small": ParagraphStyle("small", parent=sheet["BodyText"], fontSize=8, leading=10),
        "big": ParagraphStyle("big", parent=sheet["BodyText"], fontSize=13, leading=17, spaceAfter=2 * mm),
        "cell": ParagraphStyle("cell", parent=sheet["BodyText"], fontSize=8.5, leading=10),
    }


def _table(rows: list[list[object]], widths: Sequence[float]) -> Table:
    table = Table(rows, colWidths=list(widths), repeatRows=1, hAlign="LEFT")
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("FONTSIZE", (0, 0), (-1, -1), 8.5),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e6e6e6")),
                ("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#999999")),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    return table


def _header_story(
    result: SeriesResult,
    styles: dict[str, ParagraphStyle],
    study_description: str | None,
    series_description: str | None,
    study_date: str | None,
    width: float,
) -> list[Flowable]:
    story: list[Flowable] = [
        Paragraph("Lung nodule malignancy and semantic findings", styles["title"]),
        Paragraph(f"<b>Study:</b> {escape(study_description or 'not described')}", styles["body"]),
        Paragraph(f"<b>Series:</b> {escape(series_description or 'not described')}", styles["body"]),
        Paragraph(f"<b>Study date:</b> {escape(display_date(study_date))}", styles["body"]),
        Spacer(1, 2 * mm),
        Paragraph(escape(model_line(result)), styles["body"]),
        Paragraph(f"Probability of cancer: {escape(probability_basis(result))}.", styles["body"]),
        Spacer(1, 3 * mm),
        Paragraph("Summary", styles["h2"]),
    ]
    if result.nodules:
        rows: list[list[object]] = [["Nodule", "Seed (world LPS)", "Probability of cancer"]]
        rows += [
            [
                Paragraph(escape(nodule.seed.label), styles["cell"]),
                position(nodule.seed.position_lps),
                percent(nodule.malignancy),
            ]
            for nodule in result.nodules
        ]
        story.append(_table(rows, (0.35 * width, 0.4 * width, 0.25 * width)))
    else:
        story.append(Paragraph("No nodule was analysed.", styles["body"]))
    if result.skipped:
        story.append(Paragraph(f"{len(result.skipped)} seed(s) skipped: see the last page.", styles["body"]))
    return story


def _nodule_story(
    result: SeriesResult, nodule: NoduleResult, styles: dict[str, ParagraphStyle], width: float
) -> list[Flowable]:
    heading = [
        Paragraph(escape(nodule.seed.label), styles["h2"]),
        Paragraph(f"Seed: {escape(position(nodule.seed.position_lps))}", styles["body"]),
        Paragraph(f"<b>Probability of cancer: {percent(nodule.malignancy)}</b>", styles["big"]),
    ]
    if nodule.malignancy_per_fold:
        folds = ", ".join(percent(p) for p in nodule.malignancy_per_fold)
        heading.append(Paragraph(f"Per fold (before calibration): {folds}", styles["small"]))
    heading.append(Spacer(1, 2 * mm))
    story: list[Flowable] = []
    planes = checked_planes(nodule)
    if planes is None:
        story.append(KeepTogether([*heading, Paragraph("Planes not available.", styles["body"])]))
    else:
        grid = _PlaneGrid(planes, plane_attention(nodule), width)
        note = Paragraph(_PLANES_NOTE, styles["small"])
        story.append(KeepTogether([*heading, grid, Spacer(1, 1.5 * mm), note]))
    findings: list[Flowable] = [Paragraph("Semantic findings", styles["h2"])]
    rows = nodule.findings(result.model.reliability)
    if rows:
        table_rows: list[list[object]] = [
            ["Feature", "Reported value", "Probability", "Threshold", "Model separation"]
        ]
        table_rows += [
            [
                Paragraph(escape(f.title), styles["cell"]),
                Paragraph(escape(finding_text(f)), styles["cell"]),
                percent(f.probability),
                threshold_text(f),
                Paragraph(escape(f.reliability.separation()), styles["cell"]),
            ]
            for f in rows
        ]
        widths = (0.27 * width, 0.25 * width, 0.13 * width, 0.11 * width, 0.24 * width)
        findings.append(_table(table_rows, widths))
        findings.append(Spacer(1, 1.5 * mm))
        findings.append(Paragraph(f"{_SEMANTIC_NOTE} {reliability_note(result)}", styles["small"]))
    else:
        findings.append(Paragraph("No semantic findings.", styles["body"]))
    story.append(KeepTogether(findings))  # the heading never stays behind on the planes' page
    return story


def _skipped_story(
    skipped: Sequence[SkippedSeed], styles: dict[str, ParagraphStyle], width: float
) -> list[Flowable]:
    rows: list[list[object]] = [["Seed", "Position", "Reason"]]
    rows += [
        [
            Paragraph(escape(s.seed.label), styles["cell"]),
            Paragraph(escape(position(s.seed.position_lps)), styles["cell"]),
            Paragraph(escape(s.reason), styles["cell"]),
        ]
        for s in skipped
    ]
    return [Paragraph("Skipped seeds", styles["h2"]), _table(rows, (0.2 * width, 0.3 * width, 0.5 * width))]


_RL_CONFIG_LOCK = threading.Lock()


@contextlib.contextmanager
def _binary_streams() -> Iterator[None]:
    """Let reportlab write its streams Flate-compressed only, not also ASCII85-encoded.

    ASCII85 (reportlab's default, a process-wide setting) makes a PDF 7-bit clean at 25 % more size,
    and without reportlab's optional C accelerator its pure-Python encoder took most of the PDF's
    time (``bench/bench_writers.py`` times the PDF with ASCII85 too). A DICOM or file transfer is
    binary anyway. The setting is restored afterwards; the lock keeps concurrent renders from
    restoring it under each other (which would make their bytes depend on timing).
    """
    with _RL_CONFIG_LOCK:
        saved = rl_config.useA85
        rl_config.useA85 = 0
        try:
            yield
        finally:
            rl_config.useA85 = saved


def render_report_pdf(
    result: SeriesResult,
    *,
    study_description: str | None,
    series_description: str | None,
    study_date: str | None,
    header: ReportHeader | None = None,
    compress: bool = True,
) -> bytes:
    """Draw the readable report of one CT series as a PDF.

    Page 1: banner(s), study and series description, study date, model identity, a summary table
    of the nodules. Then per nodule (new page): label, seed, probability of cancer (and each
    fold's), the nine planes with the seed marked and each plane's attention weight, and the
    semantic findings in vocabulary order. Last: the skipped seeds and why. Every page starts with
    the banner(s) and the ``header`` lines (patient name, patient ID, birth date, accession number,
    study date, series description; an em dash for each missing value). Output is byte-identical
    for the same input (reportlab ``invariant``). Streams are Flate-compressed binary (no ASCII85
    layer); the planes are 8-bit grey images.

    Args:
        result: the series' results (nodule planes may be None: the grid is then left out).
        study_description: StudyDescription of the CT (None: "not described").
        series_description: SeriesDescription of the CT.
        study_date: StudyDate of the CT (DICOM YYYYMMDD, shown as YYYY-MM-DD).
        header: the patient and study values of every page's header, usually
            :meth:`ReportHeader.from_dataset` of the CT (None: every value shown as missing).
        compress: compress the page streams (False keeps the text operators readable, for tests).

    Returns:
        the PDF file's bytes.

    Raises:
        ValueError: a nodule's planes are not (9, H, W).
    """
    buffer = io.BytesIO()
    header = header if header is not None else ReportHeader()
    top_margin = (
        _MARGIN / 2 + len(banners(result)) * _BANNER_HEIGHT + len(header.lines()) * _HEADER_LINE + 4 * mm
    )
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=top_margin,
        bottomMargin=_MARGIN,
        title="Lung nodule semantic CLIP report (research use only)",
        author=MANUFACTURER,
        subject="Lung nodule malignancy probability and zero-shot semantic findings",
        creator=f"{MANUFACTURER} {result.model.name} {result.model.version}",
        invariant=1,
        pageCompression=1 if compress else 0,
    )
    width = doc.width
    styles = _styles()
    story = _header_story(result, styles, study_description, series_description, study_date, width)
    for nodule in result.nodules:
        story.append(PageBreak())
        story += _nodule_story(result, nodule, styles, width)
    if result.skipped:
        story.append(PageBreak())
        story += _skipped_story(result.skipped, styles, width)
    decorate = page_decorator(banners(result), header)
    with _binary_streams():
        doc.build(story, onFirstPage=decorate, onLaterPages=decorate)
    return buffer.getvalue()
