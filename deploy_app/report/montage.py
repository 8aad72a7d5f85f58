"""The plane images: the nine planes in display orientation, and the Secondary Capture montage.

- Plane image helpers shared with the PDF (:mod:`deploy_app.report.pdf`): how a stored plane is turned
  for display (:func:`display_transform`, :func:`plane_display`), where the seed lies in a plane image
  (:func:`seed_pixel_position`), which way the displayed edges face (:func:`plane_edge_letters`), the
  planes as 8-bit grey pixels, and the colours of banner, seed marker and edge letters.
- :func:`render_montage`: the picture of one nodule that :func:`deploy_app.report.dicom.secondary_capture`
  wraps, for viewers that do not open PDFs: banner(s), label, probability, main findings and the
  nine planes. Composed with numpy and Pillow, not a plotting library: with matplotlib the montages
  took most of the writers' time (``bench/bench_writers.py`` prints the SC writer's).

Display convention. The model sees each plane with rows and columns along
:data:`scripts.transforms.PLANE_DIRECTIONS`; the report shows it flipped and/or transposed into the
radiological convention. :func:`display_transform` computes the flips from the plane's row and
column direction vectors alone (no case per plane index), by two rules:

1. Vertical on screen is the in-plane axis with the larger superior-inferior component (then the
   larger anterior-posterior one). Down the screen points inferior; for a plane without a
   superior-inferior axis (axial) it points posterior, so anterior is up.
2. To the right on screen points towards the patient's left (patient right on the image left); for
   a plane without a left-right axis (sagittal) it points posterior, so anterior is on the image left
   (the patient seen from the left side).

Which gives, with the displayed edges as the edge letters name them (top / bottom / left / right):

=====  ========================  ===========================================================
plane  name                      displayed edges
=====  ========================  ===========================================================
1      axial                     A / P / R / L (seen from the feet)
2      coronal                   S / I / R / L (seen from the front)
3      sagittal                  S / I / A / P (seen from the patient's left)
4      axial/sagittal 45\u00b0    SL / IR / A / P
5      axial/sagittal 45\u00b0    SR / IL / A / P
6      axial/coronal 45\u00b0     SP / IA / R / L
7      axial/coronal 45\u00b0     SA / IP / R / L
8      coronal/sagittal 45\u00b0  S / I / AR / PL
9      coronal/sagittal 45\u00b0  S / I / PR / AL
=====  ========================  ===========================================================

The letters (S/I superior/inferior, A/P anterior/posterior, R/L right/left, two letters for a
direction 45 degrees between two axes) are drawn inside each edge of every plane image, so that the
oblique planes are labelled with their orientation too; they are derived from the same direction
vectors as the flips, so pixels and letters cannot disagree. The seed cross is moved with the
pixels.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deploy_app.findings import NoduleResult, SeriesResult
from deploy_app.report.rows import (
    banners,
    model_line,
    percent,
    plane_attention,
    plane_title,
    position,
    top_findings,
)
from scripts.transforms import PLANE_DIRECTIONS, NinePlanes

BANNER_RED = "#b00020"
"""Colour of the research-use banner and of the frame around the plane with the most attention."""
MARKER_COLOUR = "#ffd400"
"""Colour of the seed cross (and of the montage's probability line)."""
EDGE_LETTER_COLOUR = "#7fe3ff"
"""Colour of the edge letters of the plane images."""

#: Letters of the +/- direction of each ROI array axis (z, y, x) = (superior, posterior, left).
_AXIS_LETTERS = (("S", "I"), ("P", "A"), ("L", "R"))
#: Components below this are zero (the 45 degree planes have components 1/sqrt2).
_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------------
# plane images (shared with the PDF)
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
        if abs(component) > _TOLERANCE:
            letters += plus if component > 0 else minus
    return letters


#: Which way "down" on screen points, by ROI axis (z, y, x) in order of preference: inferior, else
#: posterior (anterior up), else left.
_DOWN_PREFERENCE = ((0, -1.0), (1, 1.0), (2, 1.0))
#: Which way "right" on screen points: the patient's left, else posterior (anterior on the left),
#: else superior.
_RIGHT_PREFERENCE = ((2, 1.0), (1, 1.0), (0, 1.0))


def _oriented(direction: np.ndarray, preference: Sequence[tuple[int, float]]) -> np.ndarray:
    """``direction`` or its opposite: the one whose first non-zero preferred component has the sign."""
    for axis, sign in preference:
        if abs(direction[axis]) > _TOLERANCE:
            return direction if direction[axis] * sign > 0 else -direction
    raise ValueError(f"direction {tuple(direction)} is zero")


@dataclass(frozen=True)
class DisplayTransform:
    """How a stored plane image is turned for display: transpose first, then the flips.

    Attributes:
        transpose: swap rows and columns (the stored columns run down the screen).
        flip_rows: reverse the rows after the transpose (top and bottom swapped).
        flip_columns: reverse the columns after the transpose (left and right swapped).
        down: the patient direction down the screen, a unit vector in ROI axes (z, y, x) = (S, P, L).
        right: the patient direction to the right on screen, in the same axes.
    """

    transpose: bool
    flip_rows: bool
    flip_columns: bool
    down: tuple[float, float, float]
    right: tuple[float, float, float]

    @property
    def edge_letters(self) -> dict[str, str]:
        """Letters of the direction each displayed edge faces (keys top, bottom, left, right)."""
        down, right = np.asarray(self.down), np.asarray(self.right)
        return {
            "top": _direction_letters(-down),
            "bottom": _direction_letters(down),
            "left": _direction_letters(-right),
            "right": _direction_letters(right),
        }

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The displayed image of a stored plane (its last two axes are rows and columns).

        Args:
            image: ``(..., H, W)`` as the model saw it.

        Returns:
            a view, ``(..., W, H)`` when transposed.
        """
        shown = np.swapaxes(image, -1, -2) if self.transpose else image
        if self.flip_rows:
            shown = shown[..., ::-1, :]
        if self.flip_columns:
            shown = shown[..., :, ::-1]
        return shown

    def displayed_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """(rows, columns) on screen of a stored plane of ``shape`` (or any shape ending with them)."""
        rows, columns = (int(n) for n in tuple(shape)[-2:])
        return (columns, rows) if self.transpose else (rows, columns)

    def pixel(self, position: tuple[float, float], shape: Sequence[int]) -> tuple[float, float]:
        """Where a stored continuous (row, column) position lands in the displayed image.

        Args:
            position: (row, column) in the stored plane, pixel centres at integer indices.
            shape: the stored plane's (rows, columns), or any shape ending with them.

        Returns:
            (row, column) in the displayed image.
        """
        row, column = (float(v) for v in position)
        if self.transpose:
            row, column = column, row
        rows, columns = self.displayed_shape(shape)
        if self.flip_rows:
            row = rows - 1 - row
        if self.flip_columns:
            column = columns - 1 - column
        return row, column


def display_transform(row_direction: Sequence[float], column_direction: Sequence[float]) -> DisplayTransform:
    """The flips and transpose that show a plane in the report's radiological convention.

    Vertical on screen is the in-plane axis with the larger superior-inferior component (then the
    larger anterior-posterior one; ties keep the stored rows vertical), pointing inferior down the
    screen (posterior when it has no superior-inferior component: anterior up). The other axis
    points towards the patient's left to the right (posterior when it has no left-right component:
    anterior on the image left). See the module docstring for the result per plane.

    Args:
        row_direction: unit vector (ROI axes (z, y, x) = (S, P, L)) along which the stored rows run
            (row index growing), as in :data:`~scripts.transforms.PLANE_DIRECTIONS`.
        column_direction: unit vector along which the stored columns run.

    Returns:
        the transform, with the displayed down and right directions.

    Raises:
        ValueError: the directions are not unit length and orthogonal (1e-6).
    """
    rows = np.asarray(row_direction, dtype=np.float64)
    columns = np.asarray(column_direction, dtype=np.float64)
    if rows.shape != (3,) or columns.shape != (3,):
        raise ValueError("plane directions must be 3-vectors in ROI axes (z, y, x)")
    if (
        abs(rows @ rows - 1) > _TOLERANCE
        or abs(columns @ columns - 1) > _TOLERANCE
        or abs(rows @ columns) > _TOLERANCE
    ):
        raise ValueError(f"plane directions {tuple(rows)} and {tuple(columns)} are not orthonormal")

    def verticality(direction: np.ndarray) -> tuple[float, float]:
        return round(abs(direction[0]), 6), round(abs(direction[1]), 6)

    transpose = verticality(columns) > verticality(rows)
    screen_rows, screen_columns = (columns, rows) if transpose else (rows, columns)
    down = _oriented(screen_rows, _DOWN_PREFERENCE)
    right = _oriented(screen_columns, _RIGHT_PREFERENCE)
    return DisplayTransform(
        transpose=bool(transpose),
        flip_rows=bool(down @ screen_rows < 0),
        flip_columns=bool(right @ screen_columns < 0),
        down=tuple(float(v) for v in down),
        right=tuple(float(v) for v in right),
    )


@functools.cache
def plane_display(plane: int) -> DisplayTransform:
    """The display transform of one of the nine planes (:func:`display_transform` of its directions).

    Args:
        plane: plane index 0 .. 8 in :data:`~scripts.transforms.PLANE_DIRECTIONS` order.

    Returns:
        the transform.
    """
    rows, columns = PLANE_DIRECTIONS[int(plane)]
    return display_transform(rows, columns)


def plane_edge_letters(plane: int) -> dict[str, str]:
    """Which patient direction each edge of a displayed plane image faces.

    Args:
        plane: plane index 0 .. 8 in :data:`~scripts.transforms.PLANE_DIRECTIONS` order.

    Returns:
        letters for the keys ``"top"``, ``"bottom"``, ``"left"`` and ``"right"`` of the image as
        shown (after :func:`plane_display`).
    """
    return plane_display(plane).edge_letters


def displayed_seed_position(plane: int, plane_shape: Sequence[int]) -> tuple[float, float]:
    """Where the seed lies in a displayed plane image: :func:`seed_pixel_position` moved with the pixels.

    Args:
        plane: plane index 0 .. 8.
        plane_shape: the stored plane's (rows, columns), or any shape ending with them.

    Returns:
        (row, column) in the displayed image, pixel centres at integer indices.
    """
    return plane_display(plane).pixel(seed_pixel_position(plane_shape), plane_shape)


def grey_pixels(plane: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 0..255 (values outside are clipped)."""
    return np.rint(np.clip(np.nan_to_num(plane, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def checked_planes(nodule: NoduleResult) -> np.ndarray | None:
    """The nodule's nine planes as float32 ``(9, H, W)``, or None when it has none.

    Raises:
        ValueError: the planes are not ``(9, H, W)`` with ``H, W >= 2``.
    """
    if nodule.planes is None:
        return None
    planes = np.asarray(nodule.planes, dtype=np.float32)
    if planes.ndim != 3 or planes.shape[0] != len(PLANE_DIRECTIONS) or min(planes.shape[1:]) < 2:
        raise ValueError(f"{nodule.seed.label}: planes must have shape (9, H, W), got {tuple(planes.shape)}")
    return planes


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


def _plane_panel(plane_index: int, plane: np.ndarray) -> np.ndarray:
    """The (MONTAGE_PANEL, MONTAGE_PANEL, 3) grey panel of one plane, in display orientation
    (:func:`plane_display`), with the seed cross blended in."""
    grey = np.ascontiguousarray(plane_display(plane_index).apply(grey_pixels(plane)))
    rows, columns = grey.shape
    if (rows, columns) != (MONTAGE_PANEL, MONTAGE_PANEL):
        image = Image.fromarray(grey).resize((MONTAGE_PANEL, MONTAGE_PANEL), Image.Resampling.NEAREST)
        grey = np.asarray(image)
    seed_row, seed_column = displayed_seed_position(plane_index, plane.shape)
    # plane pixel centre p lies at panel coordinate (p + 0.5) * panel / plane - 0.5
    centre_row = (seed_row + 0.5) * MONTAGE_PANEL / rows - 0.5
    centre_column = (seed_column + 0.5) * MONTAGE_PANEL / columns - 0.5
    alpha = _cross_coverage(centre_row, centre_column, MONTAGE_PANEL)[..., None]
    marker = np.asarray(_hex_rgb(MARKER_COLOUR), dtype=np.float64)
    panel = grey[..., None].astype(np.float64) * (1.0 - alpha) + marker * alpha
    return np.rint(panel).astype(np.uint8)


def _draw_banners(draw: ImageDraw.ImageDraw, banner_lines: Sequence[str], width: int) -> None:
    font = _font(_BANNER_TEXT, bold=True)
    for line, banner in enumerate(banner_lines):
        top = _BANNER_TOP + line * _BANNER_STEP
        left, upper, right, lower = draw.textbbox((width / 2, top), banner, font=font, anchor="mt")
        colour = BANNER_RED if line == 0 else "#444444"
        pad = _BANNER_PAD
        draw.rectangle((left - pad, upper - pad, right + pad, lower + pad), fill=colour)
        draw.text((width / 2, top), banner, font=font, fill="white", anchor="mt")


def _draw_panel_text(
    draw: ImageDraw.ImageDraw, plane: int, weight: float | None, focus: bool, available: bool
) -> None:
    """Title above the panel, the red frame around the focused one, edge letters inside it."""
    top, left = montage_panel_origin(plane)
    side = MONTAGE_PANEL
    title = plane_title(plane, weight)
    draw.text((left + side / 2, top - 7), title, font=_font(_TITLE_TEXT), fill="white", anchor="ms")
    if focus:  # outside the panel: no plane pixel is hidden
        frame = _FRAME_WIDTH
        box = (left - frame, top - frame, left + side + frame - 1, top + side + frame - 1)
        draw.rectangle(box, outline=BANNER_RED, width=frame)
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
        draw.text((left + x, top + y), letters[edge], font=font, fill=EDGE_LETTER_COLOUR, anchor=anchor)


def render_montage(result: SeriesResult, nodule: NoduleResult) -> np.ndarray:
    """The Secondary Capture picture of one nodule: banner(s), label, probability, main findings
    and the nine planes with the seed marked.

    Drawn with numpy and Pillow (DejaVu fonts from matplotlib's data): the planes are shown in the
    radiological display orientation of :func:`plane_display`, pixel for pixel when they are
    :data:`MONTAGE_PANEL` pixels square, with an anti-aliased seed cross centred exactly on
    :func:`displayed_seed_position`, the displayed edges' direction letters inside each panel, the title and
    attention weight above it and a red frame around the plane with the highest attention. The
    same input always gives the same pixels.

    Args:
        result: the series' results (for the banners and the model identity).
        nodule: the nodule to draw (planes None: grey panels reading "not available").

    Returns:
        uint8 RGB array (960, 768, 3).
    """
    planes = checked_planes(nodule)
    attention = plane_attention(nodule)
    height, width = MONTAGE_SIZE
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    unavailable = np.full((MONTAGE_PANEL, MONTAGE_PANEL, 3), 64, dtype=np.uint8)  # 0.25 grey
    for plane in range(len(PLANE_DIRECTIONS)):
        top, left = montage_panel_origin(plane)
        panel = unavailable if planes is None else _plane_panel(plane, planes[plane])
        pixels[top : top + MONTAGE_PANEL, left : left + MONTAGE_PANEL] = panel
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    banner_lines = banners(result)
    _draw_banners(draw, banner_lines, width)
    text_top = _BANNER_TOP + len(banner_lines) * _BANNER_STEP + 16
    label = f"{nodule.seed.label}   {position(nodule.seed.position_lps)}"
    draw.text((_TEXT_LEFT, text_top), label, font=_font(_LABEL_TEXT), fill="white", anchor="la")
    probability = f"Probability of cancer: {percent(nodule.malignancy)}"
    font = _font(_PROBABILITY_TEXT, bold=True)
    draw.text((_TEXT_LEFT, text_top + 27), probability, font=font, fill=MARKER_COLOUR, anchor="la")
    lines = [f"{f.title}: {f.value} ({percent(f.probability)})" for f in top_findings(result, nodule)]
    if not lines:
        lines = ["No finding reaches its confidence threshold"]
    half = (len(lines) + 1) // 2
    for column, chunk in enumerate((lines[:half], lines[half:])):  # two columns, most certain first
        for row, line in enumerate(chunk):
            place = (_TEXT_LEFT + column * width * 0.49, text_top + 63 + row * _FINDING_STEP)
            draw.text(place, line, font=_font(_FINDING_TEXT), fill="white", anchor="la")
    known = [w for w in attention if w is not None]
    focus = int(np.argmax(known)) if known else None
    for plane in range(len(PLANE_DIRECTIONS)):
        _draw_panel_text(draw, plane, attention[plane], plane == focus, planes is not None)
    footer = f"{model_line(result)}. Cross: seed. Zero-shot findings, not a reading."
    draw.text((_TEXT_LEFT, height - 5), footer, font=_font(_FOOTER_TEXT), fill="#aaaaaa", anchor="ld")
    return np.array(image, dtype=np.uint8)
