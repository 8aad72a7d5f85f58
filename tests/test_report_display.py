"""The report's display orientation of the nine planes, checked end to end on phantoms with markers.

A synthetic CT (NIfTI, loaded by the bundle's own LoadCT) holds bright markers at known world
directions from a seed; the bundle's preprocessing (``windowed_planes_for_seeds``) makes the nine
planes and the report's display transform turns them: each marker must appear on the side of the
displayed image that the radiological convention (and the edge letters) say.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from deploy_app import report
from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed, SeriesResult
from scripts.transforms import PLANE_DIRECTIONS, LoadCT, windowed_planes_for_seeds

#: RAS voxel axes (3 x 3) and shapes of the phantom volumes: a CT as usually stored (i towards the
#: patient's left, j posterior, k superior), one with two axes reversed, one with permuted axes.
AFFINES = {
    "ct_like": (np.diag([-1.5, -1.25, 2.0]), (40, 44, 26)),
    "flipped": (np.diag([1.5, -1.25, -2.0]), (40, 44, 26)),
    "permuted": (np.array([[0, -1.5, 0], [0, 0, -1.25], [2.0, 0, 0]]), (26, 40, 44)),
}
SEED_LPS = np.array([-20.3, 31.6, -105.2])
MARKER_MM = 12.0
#: Pixels per mm of the 224-pixel planes (50 samples 1 mm apart, corner-aligned upsampling).
PIXELS_PER_MM = 223 / 49
#: World LPS unit vector of each patient-direction letter.
LETTER_LPS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}
#: The display convention of the module docstring of deploy_app.report.montage, per plane:
#: (top, bottom, left, right) letters of the displayed image.
EXPECTED_EDGES = (
    ("A", "P", "R", "L"),  # 1 axial: seen from the feet
    ("S", "I", "R", "L"),  # 2 coronal: seen from the front
    ("S", "I", "A", "P"),  # 3 sagittal: seen from the patient's left
    ("SL", "IR", "A", "P"),
    ("SR", "IL", "A", "P"),
    ("SP", "IA", "R", "L"),
    ("SA", "IP", "R", "L"),
    ("S", "I", "AR", "PL"),
    ("S", "I", "PR", "AL"),
)


def _letters_lps(letters: str) -> np.ndarray:
    vector = np.sum([LETTER_LPS[letter] for letter in letters], axis=0)
    return vector / np.linalg.norm(vector)


def _phantom(
    folder: Path, case: str, markers: list[tuple[np.ndarray, float]], name: str = "phantom"
) -> np.ndarray:
    """Air with Gaussian markers (sigma 2.5 mm, peak HU given) around SEED_LPS: the loaded planes.

    Returns:
        the nine windowed planes (9, 224, 224) as the model sees them.
    """
    axes, shape = AFFINES[case]
    affine = np.eye(4)
    affine[:3, :3] = axes
    centre_ras = SEED_LPS * np.array([-1.0, -1.0, 1.0])
    affine[:3, 3] = centre_ras - axes @ ((np.asarray(shape) - 1) / 2)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    lps = (ijk @ axes.T + affine[:3, 3]) * np.array([-1.0, -1.0, 1.0])
    hu = np.full(shape, -1000.0)
    for centre, peak in markers:
        hu += (peak + 1000.0) * np.exp(-np.sum((lps - centre) ** 2, axis=-1) / (2 * 2.5**2))
    path = folder / f"{name}_{case}.nii.gz"
    nib.save(nib.Nifti1Image(np.round(hu).astype(np.int16), affine), str(path))
    volume = LoadCT()(path)
    return windowed_planes_for_seeds(volume, [SEED_LPS])[0].numpy()


def _blobs(image: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(peak value, intensity-weighted centroid (row, column)) of each bright blob, brightest first."""
    labels, count = ndimage.label(image > 0.1)
    blobs = []
    for index in range(1, count + 1):
        mask = labels == index
        weights = np.where(mask, image, 0.0)
        rows, columns = np.nonzero(mask)
        centroid = np.array([np.sum(rows * weights[mask]), np.sum(columns * weights[mask])]) / np.sum(
            weights[mask]
        )
        blobs.append((float(image[mask].max()), centroid))
    return sorted(blobs, key=lambda blob: -blob[0])


# --------------------------------------------------------------------------------------------------
# the pure display transform
# --------------------------------------------------------------------------------------------------


def test_edge_letters_of_every_plane_follow_the_convention() -> None:
    for plane in range(9):
        letters = report.plane_edge_letters(plane)
        assert tuple(letters[edge] for edge in ("top", "bottom", "left", "right")) == EXPECTED_EDGES[plane]


@pytest.mark.parametrize("plane", range(9))
def test_display_transform_moves_pixels_along_its_down_and_right_directions(plane: int) -> None:
    """A stored plane of a linear function of position: one pixel down (right) on screen changes it
    by ``down`` (``right``) dotted with the gradient; and ``pixel`` says where a stored pixel goes."""
    rows_dir, columns_dir = (np.asarray(d) for d in PLANE_DIRECTIONS[plane])
    transform = report.display_transform(rows_dir, columns_dir)
    assert transform == report.plane_display(plane)
    i, j = np.mgrid[:7, :5].astype(np.float64)  # not square: a transpose shows in the shape
    gradient = np.array([3.0, 5.0, 7.0])  # (z, y, x)
    stored = i[..., None] * rows_dir + j[..., None] * columns_dir
    shown = transform.apply(stored @ gradient)
    assert shown.shape == transform.displayed_shape(stored.shape[:2])
    np.testing.assert_allclose(np.diff(shown, axis=0), np.asarray(transform.down) @ gradient)
    np.testing.assert_allclose(np.diff(shown, axis=1), np.asarray(transform.right) @ gradient)
    spot = np.zeros((7, 5))
    spot[2, 3] = 1.0
    where = np.unravel_index(np.argmax(transform.apply(spot)), transform.displayed_shape((7, 5)))
    assert transform.pixel((2, 3), (7, 5)) == tuple(float(v) for v in where)


def test_display_transform_rule_on_its_own() -> None:
    s = 1 / np.sqrt(2)
    axial = report.display_transform((0, 1, 0), (0, 0, 1))
    assert (axial.transpose, axial.flip_rows, axial.flip_columns) == (False, False, False)
    # an axial plane stored upside down and mirrored is turned back
    turned = report.display_transform((0, -1, 0), (0, 0, -1))
    assert (turned.transpose, turned.flip_rows, turned.flip_columns) == (False, True, True)
    # a sagittal plane stored with rows along y is transposed: superior up, anterior on the left
    sagittal = report.display_transform((0, 1, 0), (1, 0, 0))
    assert sagittal.transpose and sagittal.down == (-1.0, 0.0, 0.0) and sagittal.right == (0.0, 1.0, 0.0)
    assert report.display_transform((s, 0, s), (0, 1, 0)).edge_letters["top"] == "SL"
    with pytest.raises(ValueError, match="not orthonormal"):
        report.display_transform((0, 1, 0), (0, 1, 0))
    with pytest.raises(ValueError, match="not orthonormal"):
        report.display_transform((0, 2, 0), (0, 0, 1))


# --------------------------------------------------------------------------------------------------
# end to end: phantom -> LoadCT -> windowed_planes_for_seeds -> display
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(AFFINES))
def test_standard_planes_show_left_anterior_superior_where_radiologists_expect(
    tmp_path: Path, case: str
) -> None:
    """Markers 12 mm to the patient's Left (brightest), Anterior and Superior (dimmest) of the seed.

    Axial: Left on the image right, Anterior on top. Coronal: Superior on top, Left on the image
    right. Sagittal: Superior on top, Anterior on the image left. Whatever the voxel order on disk.
    """
    left = (SEED_LPS + MARKER_MM * _letters_lps("L"), 400.0)
    anterior = (SEED_LPS + MARKER_MM * _letters_lps("A"), -100.0)
    superior = (SEED_LPS + MARKER_MM * _letters_lps("S"), -500.0)
    planes = _phantom(tmp_path, case, [left, anterior, superior])
    offset = MARKER_MM * PIXELS_PER_MM
    # per plane: the two markers in it, brighter first, and where they must show (rows, columns
    # from the displayed seed: negative rows are up, negative columns left)
    expected = {
        0: ((0.0, offset), (-offset, 0.0)),  # axial: Left right, Anterior up
        1: ((0.0, offset), (-offset, 0.0)),  # coronal: Left right, Superior up
        2: ((0.0, -offset), (-offset, 0.0)),  # sagittal: Anterior left, Superior up
    }
    for plane, places in expected.items():
        shown = report.plane_display(plane).apply(planes[plane])
        seed = np.asarray(report.displayed_seed_position(plane, planes.shape))
        blobs = _blobs(shown)
        assert len(blobs) == 2, f"plane {plane + 1}: {len(blobs)} markers"
        for (_, centroid), place in zip(blobs, places, strict=True):
            np.testing.assert_allclose(centroid - seed, place, atol=2.0, err_msg=f"plane {plane + 1}")


@pytest.mark.parametrize("plane", range(9))
def test_every_displayed_edge_letter_is_where_its_marker_shows(tmp_path: Path, plane: int) -> None:
    """For each plane (the six oblique ones too): a marker 12 mm from the seed in the world direction
    the top letters name shows straight above the seed, one in the right letters' direction straight
    to its right."""
    top, _, _, right = EXPECTED_EDGES[plane]
    markers = [
        (SEED_LPS + MARKER_MM * _letters_lps(top), 400.0),
        (SEED_LPS + MARKER_MM * _letters_lps(right), -300.0),
    ]
    planes = _phantom(tmp_path, "ct_like", markers, name=f"plane{plane}")
    shown = report.plane_display(plane).apply(planes[plane])
    seed = np.asarray(report.displayed_seed_position(plane, planes.shape))
    blobs = _blobs(shown)
    assert len(blobs) == 2
    offset = MARKER_MM * PIXELS_PER_MM
    np.testing.assert_allclose(blobs[0][1] - seed, (-offset, 0.0), atol=2.0)  # top
    np.testing.assert_allclose(blobs[1][1] - seed, (0.0, offset), atol=2.0)  # right


def test_montage_shows_the_phantom_planes_in_display_orientation(tmp_path: Path) -> None:
    """The Secondary Capture montage shows the displayed planes (Left marker on the right of the axial
    panel), not the stored ones (the PDF: test_report.py::test_pdf_images_are_the_planes)."""
    left = (SEED_LPS + MARKER_MM * _letters_lps("L"), 400.0)
    superior = (SEED_LPS + MARKER_MM * _letters_lps("S"), -500.0)
    planes = _phantom(tmp_path, "ct_like", [left, superior])
    nodule = NoduleResult(
        seed=NoduleSeed(tuple(SEED_LPS), "Nodule 1", "test"),
        malignancy=0.5,
        malignancy_per_fold=(),
        semantic={},
        attention=(),
        planes=planes,
    )
    result = SeriesResult((nodule,), (), ModelInfo("m", "1", 1, calibrated=False, untrained_demo=True))
    pixels = report.render_montage(result, nodule)
    for plane in (1, 2):  # coronal and sagittal are stored upside down
        top, left_edge = report.montage_panel_origin(plane)
        panel = pixels[top : top + report.MONTAGE_PANEL, left_edge : left_edge + report.MONTAGE_PANEL, 2]
        shown = np.rint(report.plane_display(plane).apply(planes[plane]) * 255)
        stored = np.rint(planes[plane] * 255)
        inner = (slice(30, 90), slice(30, 190))  # the upper part: the Superior marker, no letters
        np.testing.assert_array_equal(panel[inner], shown[inner])
        assert not np.array_equal(panel[inner], stored[inner])
