"""The readable report of the deploy app: a PDF for radiologists and its DICOM wrappers.

- :func:`render_report_pdf` draws the PDF (reportlab): a research-use banner on every page, the
  model's identity, and per nodule its label, world LPS seed, probability of cancer, the nine planes
  the model saw (3 x 3, seed marked, attention weight in each title) and the zero-shot semantic
  findings; then the seeds that were skipped and why. It holds no patient name or ID (the DICOM
  wrapper carries the patient module) and is byte-identical for the same input.
- :func:`encapsulated_pdf` wraps the PDF as Encapsulated PDF Storage in the CT's study.
- :func:`secondary_capture` renders one RGB Secondary Capture image per nodule (the montage with the
  probability and the main findings burned in), for viewers that do not open PDFs. The montage
  (:func:`render_montage`) is composed with numpy and Pillow, not a plotting library: ~14 ms per
  nodule instead of ~0.2-0.3 s with matplotlib.

The functions return bytes and datasets; writing them (atomically) is the caller's job
(:func:`deploy_app.dicom_io.write_dataset`).

The planes are shown as the model sees them, not re-oriented to radiological convention: rows and
columns follow :data:`scripts.transforms.PLANE_DIRECTIONS`, and letters on the image edges (S/I,
A/P, L/R, combined for the 45 degree planes) say which way each edge faces.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib.util
import io
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import highdicom
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid
from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
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
from scripts.transforms import PLANE_DIRECTIONS, NinePlanes
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES, Code

__all__ = [
    "DEMO_BANNER",
    "DOCUMENT_TITLE_CODE",
    "MANUFACTURER",
    "MONTAGE_PANEL",
    "MONTAGE_SIZE",
    "PLANE_NAMES",
    "RESEARCH_BANNER",
    "encapsulated_document_bytes",
    "encapsulated_pdf",
    "finding_rows",
    "montage_panel_origin",
    "plane_edge_letters",
    "render_montage",
    "render_report_pdf",
    "secondary_capture",
    "seed_pixel_position",
]

RESEARCH_BANNER = "RESEARCH USE ONLY \u2014 not for clinical decisions"
"""Shown at the top of every PDF page and every Secondary Capture image."""

DEMO_BANNER = "UNTRAINED DEMO MODEL \u2014 the numbers carry no diagnostic meaning"
"""Added below :data:`RESEARCH_BANNER` when the model is the untrained demo."""

MANUFACTURER = "lung_nodule_ct_semantic_clip"
"""Manufacturer of the generated instances (General Equipment and SC Equipment modules)."""

DOCUMENT_TITLE_CODE = Code("18748-4", "LN", "Diagnostic Imaging Report")
"""Concept name of the encapsulated PDF (CID 7000 Diagnostic Imaging Report Document Titles)."""

PLANE_NAMES: tuple[str, ...] = (
    "Axial",
    "Coronal",
    "Sagittal",
    "Axial/sagittal 45\u00b0",  # normal (S - L)/sqrt2
    "Axial/sagittal 45\u00b0",  # normal (S + L)/sqrt2
    "Axial/coronal 45\u00b0",  # normal (S - P)/sqrt2
    "Axial/coronal 45\u00b0",  # normal (S + P)/sqrt2
    "Coronal/sagittal 45\u00b0",  # normal (P - L)/sqrt2
    "Coronal/sagittal 45\u00b0",  # normal (P + L)/sqrt2
)
"""Display name of each plane, in :data:`~scripts.transforms.PLANE_DIRECTIONS` order: the standard
planes its normal lies between (tests check this against the directions)."""

#: Letters of the +/- direction of each ROI array axis (z, y, x) = (superior, posterior, left).
_AXIS_LETTERS = (("S", "I"), ("P", "A"), ("L", "R"))

_SEMANTIC_NOTE = (
    "Zero-shot findings: similarity of the image embedding to one text prompt per value; "
    "they explain the image, they are not a radiologist's reading."
)
_PLANES_NOTE = (
    "Planes as the model sees them (50 x 50 mm at 1 mm, window -1000..500 HU). Edge letters give "
    "each edge's direction (S/I superior/inferior, A/P anterior/posterior, R/L right/left). "
    "The cross marks the seed; the plane with the highest attention is framed."
)

# colours shared by the PDF and the SC montage
_BANNER_RED = "#b00020"
_MARKER = "#ffd400"
_LETTER = "#7fe3ff"


# --------------------------------------------------------------------------------------------------
# geometry and text helpers (pure, tested)
# --------------------------------------------------------------------------------------------------


def seed_pixel_position(plane_shape: Sequence[int], plane_size: int | None = None) -> tuple[float, float]:
    """Where the seed lies in a plane image, as continuous (row, column) pixel indices.

    :class:`~scripts.transforms.NinePlanes` samples plane point ``(i, j)`` at offsets
    ``(i - P // 2, j - P // 2)`` mm from the seed (``P`` = ``plane_size``, 50), so the seed is
    sample ``P // 2``; upsampling to ``n`` pixels is corner-aligned (output ``o`` reads input
    ``o * (P - 1) / (n - 1)``), so the seed lands at ``(P // 2) * (n - 1) / (P - 1)``: 113.78 for
    224 pixels, between pixels 113 and 114.

    Args:
        plane_shape: (rows, columns) of the plane image, or any shape ending with them.
        plane_size: samples per plane side before upsampling (default: NinePlanes' default, 50).

    Returns:
        (row, column) with pixel centres at integer indices.
    """
    size = NinePlanes().plane_size if plane_size is None else int(plane_size)
    seed_sample = size // 2

    def along(pixels: int) -> float:
        if pixels == size:
            return float(seed_sample)
        return seed_sample * (pixels - 1) / (size - 1)

    rows, columns = (int(n) for n in tuple(plane_shape)[-2:])
    return along(rows), along(columns)


def _direction_letters(direction: Sequence[float]) -> str:
    """Patient-direction letters of a unit vector in ROI axes (z, y, x), e.g. (s, 0, s) -> "SL"."""
    letters = ""
    for component, (plus, minus) in zip(direction, _AXIS_LETTERS, strict=True):
        if abs(component) > 1e-6:
            letters += plus if component > 0 else minus
    return letters


def plane_edge_letters(plane: int) -> dict[str, str]:
    """Which patient direction each edge of a plane image faces.

    Rows run along the plane's row direction (downwards on screen), columns along its column
    direction (to the right).

    Args:
        plane: plane index 0 .. 8 in :data:`~scripts.transforms.PLANE_DIRECTIONS` order.

    Returns:
        letters for the keys ``"top"``, ``"bottom"``, ``"left"`` and ``"right"``.
    """
    rows, columns = (np.asarray(d, dtype=np.float64) for d in PLANE_DIRECTIONS[plane])
    return {
        "top": _direction_letters(-rows),
        "bottom": _direction_letters(rows),
        "left": _direction_letters(-columns),
        "right": _direction_letters(columns),
    }


def finding_rows(semantic: Mapping[str, Mapping[str, float]]) -> list[tuple[str, str, float]]:
    """The semantic findings as (feature title, predicted value, probability), in vocabulary order.

    Features missing from ``semantic`` are left out; columns the vocabulary does not know follow
    in their given order under their column name.

    Args:
        semantic: feature column -> value -> probability.

    Returns:
        one row per feature present.
    """
    known = [feature.column for feature in FEATURES if feature.column in semantic]
    unknown = [column for column in semantic if column not in FEATURE_BY_COLUMN]
    rows = []
    for column in (*known, *unknown):
        values = semantic[column]
        if not values:
            continue
        value = max(values, key=values.__getitem__)
        title = FEATURE_BY_COLUMN[column].title if column in FEATURE_BY_COLUMN else column
        rows.append((title, value, float(values[value])))
    return rows


def _top_findings(nodule: NoduleResult, limit: int = 6) -> list[tuple[str, str, float]]:
    """The findings worth burning into a montage: predicted values other than "Absent", most
    probable first (the PDF lists every feature)."""
    rows = [row for row in finding_rows(nodule.semantic) if row[1] != "Absent"]
    return sorted(rows, key=lambda row: -row[2])[:limit]


def _percent(probability: float) -> str:
    return f"{100.0 * float(probability):.1f} %"


def _position(position_lps: Sequence[float]) -> str:
    x, y, z = (float(v) for v in position_lps)
    return f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS"


def _display_date(dicom_date: str | None) -> str:
    """YYYYMMDD -> YYYY-MM-DD; anything else as given."""
    text = (dicom_date or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "unknown"


def _grey_pixels(plane: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 0..255 (values outside are clipped)."""
    return np.rint(np.clip(np.nan_to_num(plane, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_planes(nodule: NoduleResult) -> np.ndarray | None:
    if nodule.planes is None:
        return None
    planes = np.asarray(nodule.planes, dtype=np.float32)
    if planes.ndim != 3 or planes.shape[0] != len(PLANE_DIRECTIONS) or min(planes.shape[1:]) < 2:
        raise ValueError(f"{nodule.seed.label}: planes must have shape (9, H, W), got {tuple(planes.shape)}")
    return planes


def _attention(nodule: NoduleResult) -> list[float | None]:
    weights = [float(w) for w in nodule.attention]
    return weights if len(weights) == len(PLANE_DIRECTIONS) else [None] * len(PLANE_DIRECTIONS)


def _plane_title(plane: int, weight: float | None) -> str:
    text = f"{plane + 1} {PLANE_NAMES[plane]}"
    return f"{text} | attention {weight:.3f}" if weight is not None else text


def _model_line(result: SeriesResult) -> str:
    model = result.model
    calibrated = "yes" if model.calibrated else "no"
    return f"Model {model.name} version {model.version}; folds: {model.folds}; calibrated: {calibrated}"


def _probability_basis(result: SeriesResult) -> str:
    model = result.model
    if model.calibrated:
        return f"calibrated ensemble of {model.folds} fold model(s)"
    return f"mean of {model.folds} fold model(s), not calibrated"


# --------------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------------

_PAGE_WIDTH, _PAGE_HEIGHT = A4
_MARGIN = 15 * mm
_BANNER_HEIGHT = 9 * mm


def _banners(result: SeriesResult) -> list[str]:
    return [RESEARCH_BANNER, DEMO_BANNER] if result.model.untrained_demo else [RESEARCH_BANNER]


def _page_decorator(result: SeriesResult) -> Callable[[Canvas, SimpleDocTemplate], None]:
    """onPage callback: the banner(s) at the top and a page number at the bottom of every page."""
    banners = _banners(result)

    def decorate(canvas: Canvas, doc: SimpleDocTemplate) -> None:
        canvas.saveState()
        top = _PAGE_HEIGHT - _MARGIN / 2
        for line, text in enumerate(banners):
            y = top - (line + 1) * _BANNER_HEIGHT
            canvas.setFillColor(colors.HexColor(_BANNER_RED) if line == 0 else colors.black)
            canvas.rect(_MARGIN, y, _PAGE_WIDTH - 2 * _MARGIN, _BANNER_HEIGHT - 1 * mm, stroke=0, fill=1)
            canvas.setFillColor(colors.white)
            canvas.setFont("Helvetica-Bold", 12)
            canvas.drawCentredString(_PAGE_WIDTH / 2, y + 2.6 * mm, text)
        canvas.setFillColor(colors.grey)
        canvas.setFont("Helvetica", 8)
        canvas.drawString(_MARGIN, _MARGIN / 2, "Lung nodule semantic CLIP report")
        canvas.drawRightString(_PAGE_WIDTH - _MARGIN, _MARGIN / 2, f"Page {doc.page}")
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
        rows, columns = self.planes.shape[1:]
        seed_row, seed_column = seed_pixel_position((rows, columns))
        known = [w for w in self.attention if w is not None]
        focus = int(np.argmax(known)) if known else None
        for plane in range(len(PLANE_DIRECTIONS)):
            grid_row, grid_column = divmod(plane, 3)
            x0 = grid_column * (self.cell + self._GAP)
            top = self.height - grid_row * (self.cell + self._TITLE + self._GAP)
            y0 = top - self._TITLE - self.cell
            canvas.setFillColor(colors.black)
            canvas.setFont("Helvetica", 7.5)
            canvas.drawString(x0, top - self._TITLE + 1.3 * mm, _plane_title(plane, self.attention[plane]))
            image = Image.fromarray(_grey_pixels(self.planes[plane]), mode="L")
            canvas.drawImage(ImageReader(image), x0, y0, width=self.cell, height=self.cell)
            if plane == focus:
                canvas.setStrokeColor(colors.HexColor(_BANNER_RED))
                canvas.setLineWidth(1.5)
                canvas.rect(x0, y0, self.cell, self.cell, stroke=1, fill=0)
            self._edge_letters(plane, x0, y0)
            # pixel (r, c) covers [c, c + 1) x [r, r + 1) of the image extent: its centre is + 0.5
            scale_x, scale_y = self.cell / columns, self.cell / rows
            self._cross(x0 + (seed_column + 0.5) * scale_x, y0 + self.cell - (seed_row + 0.5) * scale_y)

    def _edge_letters(self, plane: int, x0: float, y0: float) -> None:
        canvas, cell, inset = self.canv, self.cell, 1.2 * mm
        letters = plane_edge_letters(plane)
        canvas.setFillColor(colors.HexColor(_LETTER))
        canvas.setFont("Helvetica-Bold", 7)
        canvas.drawCentredString(x0 + cell / 2, y0 + cell - inset - 2.2 * mm, letters["top"])
        canvas.drawCentredString(x0 + cell / 2, y0 + inset, letters["bottom"])
        canvas.drawString(x0 + inset, y0 + cell / 2 - 1 * mm, letters["left"])
        canvas.drawRightString(x0 + cell - inset, y0 + cell / 2 - 1 * mm, letters["right"])

    def _cross(self, x: float, y: float) -> None:
        """A cross with an open centre, so the marker does not hide the nodule it points at."""
        canvas = self.canv
        gap, arm = 1.5 * mm, 4.0 * mm
        canvas.setStrokeColor(colors.HexColor(_MARKER))
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
        Paragraph(f"<b>Study date:</b> {escape(_display_date(study_date))}", styles["body"]),
        Spacer(1, 2 * mm),
        Paragraph(escape(_model_line(result)), styles["body"]),
        Paragraph(f"Probability of cancer: {escape(_probability_basis(result))}.", styles["body"]),
        Spacer(1, 3 * mm),
        Paragraph("Summary", styles["h2"]),
    ]
    if result.nodules:
        rows: list[list[object]] = [["Nodule", "Seed (world LPS)", "Probability of cancer"]]
        rows += [
            [
                Paragraph(escape(nodule.seed.label), styles["cell"]),
                _position(nodule.seed.position_lps),
                _percent(nodule.malignancy),
            ]
            for nodule in result.nodules
        ]
        story.append(_table(rows, (0.35 * width, 0.4 * width, 0.25 * width)))
    else:
        story.append(Paragraph("No nodule was analysed.", styles["body"]))
    if result.skipped:
        story.append(Paragraph(f"{len(result.skipped)} seed(s) skipped: see the last page.", styles["body"]))
    return story


def _nodule_story(nodule: NoduleResult, styles: dict[str, ParagraphStyle], width: float) -> list[Flowable]:
    heading = [
        Paragraph(escape(nodule.seed.label), styles["h2"]),
        Paragraph(f"Seed: {escape(_position(nodule.seed.position_lps))}", styles["body"]),
        Paragraph(f"<b>Probability of cancer: {_percent(nodule.malignancy)}</b>", styles["big"]),
    ]
    if nodule.malignancy_per_fold:
        folds = ", ".join(_percent(p) for p in nodule.malignancy_per_fold)
        heading.append(Paragraph(f"Per fold (before calibration): {folds}", styles["small"]))
    heading.append(Spacer(1, 2 * mm))
    story: list[Flowable] = []
    planes = _check_planes(nodule)
    if planes is None:
        story.append(KeepTogether([*heading, Paragraph("Planes not available.", styles["body"])]))
    else:
        grid = _PlaneGrid(planes, _attention(nodule), width)
        note = Paragraph(_PLANES_NOTE, styles["small"])
        story.append(KeepTogether([*heading, grid, Spacer(1, 1.5 * mm), note]))
    findings: list[Flowable] = [Paragraph("Semantic findings", styles["h2"])]
    rows = finding_rows(nodule.semantic)
    if rows:
        table_rows: list[list[object]] = [["Feature", "Predicted value", "Probability"]]
        table_rows += [
            [title, Paragraph(escape(value), styles["cell"]), _percent(probability)]
            for title, value, probability in rows
        ]
        findings.append(_table(table_rows, (0.42 * width, 0.38 * width, 0.2 * width)))
        findings.append(Spacer(1, 1.5 * mm))
        findings.append(Paragraph(_SEMANTIC_NOTE, styles["small"]))
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
            Paragraph(escape(_position(s.seed.position_lps)), styles["cell"]),
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
    time (~8 ms per 224 x 224 plane image: 0.35 s for five nodules). A DICOM or file transfer is
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
    compress: bool = True,
) -> bytes:
    """Draw the readable report of one CT series as a PDF.

    Page 1: banner(s), study and series description, study date, model identity, a summary table
    of the nodules. Then per nodule (new page): label, seed, probability of cancer (and each
    fold's), the nine planes with the seed marked and each plane's attention weight, and the
    semantic findings in vocabulary order. Last: the skipped seeds and why. No patient name or
    ID is written. Output is byte-identical for the same input (reportlab ``invariant``). Streams
    are Flate-compressed binary (no ASCII85 layer); the planes are 8-bit grey images.

    Args:
        result: the series' results (nodule planes may be None: the grid is then left out).
        study_description: StudyDescription of the CT (None: "not described").
        series_description: SeriesDescription of the CT.
        study_date: StudyDate of the CT (DICOM YYYYMMDD, shown as YYYY-MM-DD).
        compress: compress the page streams (False keeps the text operators readable, for tests).

    Returns:
        the PDF file's bytes.

    Raises:
        ValueError: a nodule's planes are not (9, H, W).
    """
    buffer = io.BytesIO()
    top_margin = _MARGIN / 2 + len(_banners(result)) * _BANNER_HEIGHT + 4 * mm
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
        story += _nodule_story(nodule, styles, width)
    if result.skipped:
        story.append(PageBreak())
        story += _skipped_story(result.skipped, styles, width)
    decorate = _page_decorator(result)
    with _binary_streams():
        doc.build(story, onFirstPage=decorate, onLaterPages=decorate)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

#: Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study attributes
#: copied from the CT, so that the new series joins the same patient and study.
_COPIED_KEYWORDS = (
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    # Clinical Trial Study
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "ConsentForClinicalTrialUseSequence",
)

#: Type 2 attributes of the Patient and General Study modules: present, empty when the CT lacks them.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _copy_patient_and_study(ct_dataset: pydicom.Dataset, target: pydicom.Dataset) -> None:
    if "StudyInstanceUID" not in ct_dataset:
        raise ValueError("the CT dataset has no StudyInstanceUID; cannot place the report in its study")
    if "SpecificCharacterSet" in ct_dataset:
        target.SpecificCharacterSet = ct_dataset.SpecificCharacterSet
    for keyword in _COPIED_KEYWORDS:
        if keyword in ct_dataset:
            element = ct_dataset[keyword]
            target[element.tag] = copy.deepcopy(element)  # sequences must not share items with the CT
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in target:
            setattr(target, keyword, None)


def _code_item(code: Code) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _dicom_date_time(moment: datetime.datetime) -> tuple[str, str]:
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def encapsulated_pdf(
    pdf: bytes,
    ct_dataset: pydicom.Dataset,
    *,
    series_number: int = 902,
    instance_number: int = 1,
    title: str,
    series_description: str = "Nodule CLIP report (research use only)",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    source_datasets: Sequence[pydicom.Dataset] | None = None,
    content_datetime: datetime.datetime | None = None,
    manufacturer: str = MANUFACTURER,
    model_name: str | None = None,
    software_versions: str | None = None,
) -> pydicom.Dataset:
    """Wrap a PDF as an Encapsulated PDF Storage instance in the CT's study (a new DOC series).

    Patient, clinical-trial and study attributes are copied from ``ct_dataset``; the instance
    references its source CT instances (Source Instance Sequence). Encapsulated Document Length
    holds the PDF's exact length, as the value itself is padded to an even length.

    Args:
        pdf: the PDF file's bytes.
        ct_dataset: any instance of the CT series the report is about.
        series_number: SeriesNumber of the new series.
        instance_number: InstanceNumber.
        title: DocumentTitle.
        series_description: SeriesDescription.
        series_instance_uid: SeriesInstanceUID (default: a new UID).
        sop_instance_uid: SOPInstanceUID (default: a new UID).
        source_datasets: the CT instances the report was derived from (default: ``ct_dataset``).
        content_datetime: content, series and instance creation date/time (default: now).
        manufacturer: Manufacturer and Secondary Capture Device Manufacturer.
        model_name: Manufacturer's Model Name (e.g. the bundle name), if any.
        software_versions: Software Versions (e.g. the bundle version), if any.

    Returns:
        the dataset with its file meta information, ready to save.

    Raises:
        ValueError: the PDF does not start with ``%PDF-`` or the CT has no StudyInstanceUID.
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the document is not a PDF (it does not start with %PDF-)")
    moment = content_datetime or datetime.datetime.now()
    date, time = _dicom_date_time(moment)
    sop_uid = sop_instance_uid or generate_uid()

    ds = pydicom.Dataset()
    _copy_patient_and_study(ct_dataset, ds)
    # SOP Common
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description
    # General Equipment + SC Equipment
    ds.Manufacturer = manufacturer
    if model_name:
        ds.ManufacturerModelName = model_name
    if software_versions:
        ds.SoftwareVersions = software_versions
    ds.ConversionType = "WSD"  # workstation: the document was generated, not scanned
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    if model_name:
        ds.SecondaryCaptureDeviceManufacturerModelName = model_name
    if software_versions:
        ds.SecondaryCaptureDeviceSoftwareVersions = software_versions
    # Encapsulated Document
    ds.InstanceNumber = int(instance_number)
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = f"{date}{time}"
    # Conservative: the report shows the study date and the CT's free-text descriptions, which a
    # de-identification tool must review (the PDF itself never holds the patient's name or ID).
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    sources = list(source_datasets) if source_datasets is not None else [ct_dataset]
    references = []
    for source in sources:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        references.append(item)
    if references:
        ds.SourceInstanceSequence = references
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = [_code_item(DOCUMENT_TITLE_CODE)]
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values are padded to an even length; the length attribute keeps the exact size
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)
    ds.EncapsulatedDocumentLength = len(pdf)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def encapsulated_document_bytes(ds: pydicom.Dataset) -> bytes:
    """The encapsulated document of a dataset without its even-length padding.

    Args:
        ds: an Encapsulated Document instance.

    Returns:
        the document's bytes (trimmed to Encapsulated Document Length when present).
    """
    value = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    return value[: int(length)] if length is not None else value


# --------------------------------------------------------------------------------------------------
# Secondary Capture montage
# --------------------------------------------------------------------------------------------------

MONTAGE_SIZE = (960, 768)
"""(rows, columns) of the Secondary Capture montage."""

MONTAGE_PANEL = 224
"""Side in pixels of each plane's panel in the montage: the model's plane size, so 224 x 224 planes
are shown pixel for pixel (other sizes are resized, nearest neighbour)."""

# Layout in pixels (text sizes are the former 100 dpi figure's points * 100 / 72).
_BANNER_TOP, _BANNER_STEP, _BANNER_PAD, _BANNER_TEXT = 5, 31, 4, 18
_TEXT_LEFT, _LABEL_TEXT, _PROBABILITY_TEXT, _FINDING_TEXT, _FINDING_STEP = 15, 15, 21, 12, 16
_GRID_TOP, _GRID_LEFT, _GRID_STEP_X, _GRID_STEP_Y = 226, 24, 248, 244
_TITLE_TEXT, _LETTER_TEXT, _FOOTER_TEXT, _UNAVAILABLE_TEXT = 11, 10, 10, 12
_FRAME_WIDTH, _CROSS_WIDTH = 3, 2.0
_CROSS_GAP, _CROSS_ARM = 0.03, 0.08  # of the panel side, from the seed


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _font_folder() -> Path:
    """matplotlib's bundled fonts (DejaVu): found without importing matplotlib, no system font needed."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("matplotlib is not installed; its DejaVu fonts draw the montage text")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"


@functools.cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` pixels, with Pillow's basic layout (the same glyphs wherever it runs)."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(_font_folder() / name), size, layout_engine=ImageFont.Layout.BASIC)


def montage_panel_origin(plane: int) -> tuple[int, int]:
    """(row, column) of the top-left pixel of a plane's panel in the montage.

    Args:
        plane: plane index 0 .. 8 in :data:`~scripts.transforms.PLANE_DIRECTIONS` order.

    Returns:
        pixel indices; the panel covers :data:`MONTAGE_PANEL` rows and columns from there.
    """
    grid_row, grid_column = divmod(int(plane), 3)
    return _GRID_TOP + grid_row * _GRID_STEP_Y, _GRID_LEFT + grid_column * _GRID_STEP_X


def _coverage_1d(start: float, stop: float, pixels: int) -> np.ndarray:
    """How much of each pixel [i - 0.5, i + 0.5) the interval [start, stop] covers (0 .. 1)."""
    centres = np.arange(pixels, dtype=np.float64)
    return np.clip(np.minimum(stop, centres + 0.5) - np.maximum(start, centres - 0.5), 0.0, 1.0)


def _cross_coverage(centre_row: float, centre_column: float, size: int) -> np.ndarray:
    """Anti-aliased coverage (size, size) of a cross with an open centre at a sub-pixel position.

    The four arms are axis-aligned rectangles, so each pixel's covered area is exact (a product of
    two 1-D overlaps): the coverage-weighted centre of the cross is the seed itself, not the pixel
    it rounds to.
    """
    half, gap, arm = _CROSS_WIDTH / 2, _CROSS_GAP * size, _CROSS_ARM * size
    across_rows = _coverage_1d(centre_row - half, centre_row + half, size)
    across_columns = _coverage_1d(centre_column - half, centre_column + half, size)
    coverage = np.zeros((size, size), dtype=np.float64)
    for sign in (1.0, -1.0):
        low, high = sorted((sign * gap, sign * arm))
        coverage += np.outer(across_rows, _coverage_1d(centre_column + low, centre_column + high, size))
        coverage += np.outer(_coverage_1d(centre_row + low, centre_row + high, size), across_columns)
    return np.minimum(coverage, 1.0)


def _plane_panel(plane: np.ndarray) -> np.ndarray:
    """The (MONTAGE_PANEL, MONTAGE_PANEL, 3) grey panel of one plane with the seed cross blended in."""
    grey = _grey_pixels(plane)
    rows, columns = grey.shape
    if (rows, columns) != (MONTAGE_PANEL, MONTAGE_PANEL):
        image = Image.fromarray(grey).resize((MONTAGE_PANEL, MONTAGE_PANEL), Image.Resampling.NEAREST)
        grey = np.asarray(image)
    seed_row, seed_column = seed_pixel_position((rows, columns))
    # plane pixel centre p lies at panel coordinate (p + 0.5) * panel / plane - 0.5
    centre_row = (seed_row + 0.5) * MONTAGE_PANEL / rows - 0.5
    centre_column = (seed_column + 0.5) * MONTAGE_PANEL / columns - 0.5
    alpha = _cross_coverage(centre_row, centre_column, MONTAGE_PANEL)[..., None]
    marker = np.asarray(_hex_rgb(_MARKER), dtype=np.float64)
    panel = grey[..., None].astype(np.float64) * (1.0 - alpha) + marker * alpha
    return np.rint(panel).astype(np.uint8)


def _draw_banners(draw: ImageDraw.ImageDraw, banners: Sequence[str], width: int) -> None:
    font = _font(_BANNER_TEXT, bold=True)
    for line, banner in enumerate(banners):
        top = _BANNER_TOP + line * _BANNER_STEP
        left, upper, right, lower = draw.textbbox((width / 2, top), banner, font=font, anchor="mt")
        colour = _BANNER_RED if line == 0 else "#444444"
        pad = _BANNER_PAD
        draw.rectangle((left - pad, upper - pad, right + pad, lower + pad), fill=colour)
        draw.text((width / 2, top), banner, font=font, fill="white", anchor="mt")


def _draw_panel_text(
    draw: ImageDraw.ImageDraw, plane: int, weight: float | None, focus: bool, available: bool
) -> None:
    """Title above the panel, the red frame around the focused one, edge letters inside it."""
    top, left = montage_panel_origin(plane)
    side = MONTAGE_PANEL
    title = _plane_title(plane, weight)
    draw.text((left + side / 2, top - 7), title, font=_font(_TITLE_TEXT), fill="white", anchor="ms")
    if focus:  # outside the panel: no plane pixel is hidden
        frame = _FRAME_WIDTH
        box = (left - frame, top - frame, left + side + frame - 1, top + side + frame - 1)
        draw.rectangle(box, outline=_BANNER_RED, width=frame)
    if not available:
        centre = (left + side / 2, top + side / 2)
        draw.text(centre, "not available", font=_font(_UNAVAILABLE_TEXT), fill="white", anchor="mm")
        return
    letters, font, inset = plane_edge_letters(plane), _font(_LETTER_TEXT, bold=True), 2
    first, last, middle = inset, side - 1 - inset, side / 2
    places = {
        "top": (middle, first, "mt"),
        "bottom": (middle, last, "mb"),
        "left": (first, middle, "lm"),
        "right": (last, middle, "rm"),
    }
    for edge, (x, y, anchor) in places.items():
        draw.text((left + x, top + y), letters[edge], font=font, fill=_LETTER, anchor=anchor)


def render_montage(result: SeriesResult, nodule: NoduleResult) -> np.ndarray:
    """The Secondary Capture picture of one nodule: banner(s), label, probability, main findings
    and the nine planes with the seed marked.

    Drawn with numpy and Pillow (DejaVu fonts from matplotlib's data): the planes are shown pixel
    for pixel when they are :data:`MONTAGE_PANEL` pixels square, with an anti-aliased seed cross
    centred exactly on :func:`seed_pixel_position`, edge letters inside each panel, the title and
    attention weight above it and a red frame around the plane with the highest attention. The
    same input always gives the same pixels.

    Args:
        result: the series' results (for the banners and the model identity).
        nodule: the nodule to draw (planes None: grey panels reading "not available").

    Returns:
        uint8 RGB array (960, 768, 3).
    """
    planes = _check_planes(nodule)
    attention = _attention(nodule)
    height, width = MONTAGE_SIZE
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    unavailable = np.full((MONTAGE_PANEL, MONTAGE_PANEL, 3), 64, dtype=np.uint8)  # 0.25 grey
    for plane in range(len(PLANE_DIRECTIONS)):
        top, left = montage_panel_origin(plane)
        panel = unavailable if planes is None else _plane_panel(planes[plane])
        pixels[top : top + MONTAGE_PANEL, left : left + MONTAGE_PANEL] = panel
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    banners = _banners(result)
    _draw_banners(draw, banners, width)
    text_top = _BANNER_TOP + len(banners) * _BANNER_STEP + 16
    label = f"{nodule.seed.label}   {_position(nodule.seed.position_lps)}"
    draw.text((_TEXT_LEFT, text_top), label, font=_font(_LABEL_TEXT), fill="white", anchor="la")
    probability = f"Probability of cancer: {_percent(nodule.malignancy)}"
    font = _font(_PROBABILITY_TEXT, bold=True)
    draw.text((_TEXT_LEFT, text_top + 27), probability, font=font, fill=_MARKER, anchor="la")
    lines = [f"{title}: {value} ({_percent(p)})" for title, value, p in _top_findings(nodule)]
    half = (len(lines) + 1) // 2
    for column, chunk in enumerate((lines[:half], lines[half:])):  # two columns, most probable first
        for row, line in enumerate(chunk):
            place = (_TEXT_LEFT + column * width * 0.49, text_top + 63 + row * _FINDING_STEP)
            draw.text(place, line, font=_font(_FINDING_TEXT), fill="white", anchor="la")
    known = [w for w in attention if w is not None]
    focus = int(np.argmax(known)) if known else None
    for plane in range(len(PLANE_DIRECTIONS)):
        _draw_panel_text(draw, plane, attention[plane], plane == focus, planes is not None)
    footer = f"{_model_line(result)}. Cross: seed. Zero-shot findings, not a reading."
    draw.text((_TEXT_LEFT, height - 5), footer, font=_font(_FOOTER_TEXT), fill="#aaaaaa", anchor="ld")
    return np.array(image, dtype=np.uint8)


def secondary_capture(
    result: SeriesResult,
    ct_dataset: pydicom.Dataset,
    *,
    series_number: int = 903,
    first_instance_number: int = 1,
    series_description: str = "Nodule CLIP montage (research use only)",
    series_instance_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
    content_datetime: datetime.datetime | None = None,
    manufacturer: str = MANUFACTURER,
) -> list[pydicom.Dataset]:
    """One RGB Secondary Capture image per nodule, in the CT's study (one new series).

    Args:
        result: the series' results.
        ct_dataset: any instance of the CT series (patient and study are copied from it).
        series_number: SeriesNumber of the new series.
        first_instance_number: InstanceNumber of the first image (the others follow).
        series_description: SeriesDescription.
        series_instance_uid: SeriesInstanceUID (default: a new UID).
        sop_instance_uids: one SOPInstanceUID per nodule (default: new UIDs).
        content_datetime: content, series and capture date/time (default: now).
        manufacturer: Manufacturer.

    Returns:
        the images, in nodule order (empty when no nodule was analysed).
    """
    if sop_instance_uids is not None and len(sop_instance_uids) != len(result.nodules):
        raise ValueError(f"{len(result.nodules)} nodules but {len(sop_instance_uids)} SOP instance UIDs")
    moment = content_datetime or datetime.datetime.now()
    date, time = _dicom_date_time(moment)
    series_uid = series_instance_uid or generate_uid()
    images = []
    for index, nodule in enumerate(result.nodules):
        pixels = render_montage(result, nodule)
        image = highdicom.sc.SCImage.from_ref_dataset(
            ref_dataset=ct_dataset,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_uid,
            series_number=int(series_number),
            sop_instance_uid=sop_instance_uids[index] if sop_instance_uids is not None else generate_uid(),
            instance_number=int(first_instance_number) + index,
            manufacturer=manufacturer,
            patient_orientation=("L", "P"),  # replaced below: a montage has no single orientation
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description,
            manufacturer_model_name=result.model.name,
            software_versions=result.model.version,
            content_date=date,
            content_time=time,
            series_date=date,
            series_time=time,
        )
        image.PatientOrientation = None  # type 2C: present and empty for a multi-orientation montage
        # Laterality (2C) is required for paired body parts only (e.g. LUNG): the montage shows the chest
        image.BodyPartExamined = "CHEST"
        image.DateOfSecondaryCapture, image.TimeOfSecondaryCapture = date, time
        image.InstanceCreationDate, image.InstanceCreationTime = date, time
        image.BurnedInAnnotation = "YES"  # text is burned in (no patient name or ID, though)
        image.RecognizableVisualFeatures = "NO"
        image.ImageComments = f"{nodule.seed.label}: probability of cancer {_percent(nodule.malignancy)}"
        images.append(image)
    return images
