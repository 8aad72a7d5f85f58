"""LPS <-> RAS in one place: functions, and an asymmetric phantom through LoadCT + SeedROICrop.

The phantom is defined in world LPS mm and written independently of ``scripts.geometry`` (the
voxel positions below are computed from the DICOM / NIfTI definitions directly), as NIfTI with
several affines and as a DICOM CT series.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.geometry import (
    format_extent_lps,
    lps_to_ras,
    ras_to_lps,
    volume_extent_lps,
    voxel_to_world_lps,
    world_lps_to_voxel,
)
from scripts.transforms import LoadCT, SeedROICrop

BACKGROUND_HU = -800.0
BLOB_1 = np.array([5.3, -7.1, 3.7])  # LPS mm
BLOB_OFFSET = np.array([12.0, -9.0, 15.0])  # second blob = BLOB_1 + this (L, P, S mm)
BLOB_2 = BLOB_1 + BLOB_OFFSET


def phantom_hu(points_lps: np.ndarray) -> np.ndarray:
    """Background plus two Gaussian blobs (sigma 3 mm) of different height at BLOB_1 and BLOB_2."""
    d1 = np.sum((points_lps - BLOB_1) ** 2, axis=-1)
    d2 = np.sum((points_lps - BLOB_2) ** 2, axis=-1)
    return BACKGROUND_HU + 1000.0 * np.exp(-d1 / 18.0) + 600.0 * np.exp(-d2 / 18.0)


def write_nifti(path: Path, affine_ras: np.ndarray, shape: tuple[int, int, int]) -> Path:
    """Sample the phantom on the voxel grid of ``affine_ras`` (RAS, as NIfTI stores it)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    ras = ijk @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])
    nib.save(nib.Nifti1Image(np.round(phantom_hu(lps)).astype(np.int16), affine_ras), str(path))
    return path


def write_dicom_series(
    folder: Path,
    origin_lps: tuple[float, float, float] = (-60.0, -55.0, -40.0),
    spacing: tuple[float, float, float] = (1.5, 1.25, 2.0),  # (x: column, y: row, z: slice) mm
    shape: tuple[int, int, int] = (72, 80, 40),  # (columns, rows, slices)
    hu=phantom_hu,
    reverse_files: bool = True,
) -> Path:
    """Write an axial CT Image Storage series (uint16 stored values, intercept -1024).

    Pixel ``[r, c]`` of slice ``k`` sits at LPS ``origin + (c dx, r dy, k dz)`` (ImageOrientation
    1/0/0/0/1/0). Files are written in reverse slice order so the reader has to sort them.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    dx, dy, dz = spacing
    cols, rows, slices = shape
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.meshgrid(np.arange(rows) * dy, np.arange(cols) * dx, indexing="ij")
    for k in range(slices):
        z = origin_lps[2] + k * dz
        points = np.stack([origin_lps[0] + xx, origin_lps[1] + yy, np.full_like(xx, z)], axis=-1)
        stored = np.clip(np.round(hu(points)) + 1024, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = folder / f"slice_{(slices - 1 - k) if reverse_files else k:03d}.dcm"
        ds = FileDataset(str(name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = "PHANTOM"
        ds.PatientName = "Phantom^Geometry"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin_lps[0]), float(origin_lps[1]), float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(dy), float(dx)]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(dz)
        ds.SliceLocation = float(z)
        ds.RescaleSlope = 1.0
        ds.RescaleIntercept = -1024.0
        ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(str(name), ds, enforce_file_format=True)
    return folder


def blob_centroid(roi: np.ndarray, centre: np.ndarray, radius: int = 6) -> np.ndarray:
    """Intensity-weighted centroid (z, y, x) of ``roi - background`` in a box around ``centre``."""
    lo = np.maximum(np.round(centre).astype(int) - radius, 0)
    hi = np.round(centre).astype(int) + radius + 1
    box = np.clip(roi[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] - BACKGROUND_HU - 50.0, 0, None)
    idx = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), axis=-1
    )
    return (idx * box[..., None]).reshape(-1, 3).sum(0) / box.sum()


# -------------------------------------------------------------------------------------------------


def test_lps_ras_round_trip_numpy_and_torch():
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, -6.0]])
    np.testing.assert_allclose(lps_to_ras(points), [[-1.0, -2.0, 3.0], [4.0, -5.5, -6.0]])
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(points)), points)
    tensor = torch.tensor(points, dtype=torch.float32)
    out = lps_to_ras(tensor)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), lps_to_ras(points))
    assert lps_to_ras([1.0, 2.0, 3.0]).shape == (3,)
    with pytest.raises(ValueError):
        lps_to_ras(np.zeros((2, 2)))


def test_world_voxel_round_trip_oblique_free_affines():
    affine = np.array([[-0.7, 0, 0, 97.35], [0, -0.7, 0, 112.15], [0, 0, 1.25, -331.5], [0, 0, 0, 1]])
    # voxel (0, 0, 0) of the authors' fixture sits at LPS (-97.35, -112.15, -331.5)
    np.testing.assert_allclose(voxel_to_world_lps(affine, [0, 0, 0]), [-97.35, -112.15, -331.5])
    np.testing.assert_allclose(voxel_to_world_lps(affine, [1, 2, 4]), [-97.35 + 0.7, -112.15 + 1.4, -326.5])
    points = np.random.default_rng(0).uniform(-100, 100, size=(5, 3))
    np.testing.assert_allclose(
        voxel_to_world_lps(affine, world_lps_to_voxel(affine, points)), points, atol=1e-9
    )
    permuted = np.array([[0, -1.0, 0, 10], [0, 0, 2.0, -5], [1.5, 0, 0, 3], [0, 0, 0, 1]])
    np.testing.assert_allclose(
        voxel_to_world_lps(permuted, world_lps_to_voxel(permuted, points)), points, atol=1e-9
    )
    low, high = volume_extent_lps(affine, (256, 256, 160))
    np.testing.assert_allclose(low, [-97.35, -112.15, -331.5])
    np.testing.assert_allclose(high, [-97.35 + 0.7 * 255, -112.15 + 0.7 * 255, -331.5 + 1.25 * 159])
    assert format_extent_lps(affine, (256, 256, 160)) == "(-97.3..81.2, -112.2..66.3, -331.5..-132.8)"


# Affines (RAS) of the NIfTI phantoms: like real CT (i -> L, j -> P, k -> S), axis-flipped
# (i -> R, k -> I), and permuted (i -> S, j -> L, k -> P, as a sagittal acquisition).
NIFTI_CASES = {
    "ct_like": (
        np.array([[-1.5, 0, 0, 60.0], [0, -1.25, 0, 55.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]]),
        (72, 80, 40),
    ),
    "flipped": (
        np.array([[1.5, 0, 0, -50.0], [0, -1.25, 0, 55.0], [0, 0, -2.0, 40.0], [0, 0, 0, 1]]),
        (72, 80, 40),
    ),
    "permuted": (
        np.array([[0, -1.5, 0, 60.0], [0, 0, -1.25, 55.0], [2.0, 0, 0, -40.0], [0, 0, 0, 1]]),
        (40, 72, 80),
    ),
}


def _oblique_affine() -> np.ndarray:
    """CT-like, rotated 20 degrees about the z axis and 10 degrees about x (takes the grid_sample path)."""
    c, s, c2, s2 = np.cos(0.35), np.sin(0.35), np.cos(0.17), np.sin(0.17)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c2, -s2], [0, s2, c2]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.5, -1.25, 2.0])
    centre_ras = (BLOB_1 + BLOB_OFFSET / 2) * np.array([-1.0, -1.0, 1.0])  # between the blobs
    affine[:3, 3] = centre_ras - affine[:3, :3] @ np.array([40.0, 40.0, 22.0])
    return affine


NIFTI_CASES["oblique"] = (_oblique_affine(), (80, 80, 45))


@pytest.mark.parametrize("case", sorted(NIFTI_CASES))
def test_nifti_phantom_blob_at_roi_centre(tmp_path, case):
    affine, shape = NIFTI_CASES[case]
    image = LoadCT()(write_nifti(tmp_path / f"{case}.nii.gz", affine, shape))
    assert image.shape == (1, *shape) and image.dtype == torch.float32
    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-5)
    roi = SeedROICrop()(image, BLOB_1)
    assert roi.shape == (1, 100, 100, 100) and roi.dtype == torch.float32
    roi = roi[0].numpy()
    np.testing.assert_allclose(blob_centroid(roi, np.array([50, 50, 50])), [50, 50, 50], atol=0.3)
    expected = 50 + BLOB_OFFSET[::-1]  # (z, y, x) = (S, P, L)
    np.testing.assert_allclose(blob_centroid(roi, expected), expected, atol=0.3)
    assert roi[0, 0, 0] == pytest.approx(-1000.0)  # the corner is outside the scan: air


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> Path:
    return write_dicom_series(tmp_path_factory.mktemp("dicom") / "series")


def test_dicom_series_geometry_and_hu(dicom_series):
    image = LoadCT()(dicom_series)
    assert image.shape == (1, 72, 80, 40) and image.dtype == torch.float32
    # voxel (i, j, k) = (column, row, slice) sits at LPS origin + (1.5 i, 1.25 j, 2 k); RAS affine
    expected = np.array([[-1.5, 0, 0, 60.0], [0, -1.25, 0, 55.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(voxel_to_world_lps(image.affine, [0, 0, 0]), [-60.0, -55.0, -40.0], atol=1e-4)
    assert float(image.min()) == pytest.approx(BACKGROUND_HU, abs=1)  # rescale intercept applied
    voxel = np.round(world_lps_to_voxel(image.affine, BLOB_1)).astype(int)
    assert float(image[0, voxel[0], voxel[1], voxel[2]]) > 0  # the bright blob is where LPS says


def test_dicom_phantom_blob_at_roi_centre(dicom_series):
    roi = SeedROICrop()(LoadCT()(dicom_series), BLOB_1)[0].numpy()
    np.testing.assert_allclose(blob_centroid(roi, np.array([50, 50, 50])), [50, 50, 50], atol=0.3)
    expected = 50 + BLOB_OFFSET[::-1]
    np.testing.assert_allclose(blob_centroid(roi, expected), expected, atol=0.3)


def test_nifti_and_dicom_give_the_same_roi(tmp_path, dicom_series):
    affine, shape = NIFTI_CASES["ct_like"]
    from_nifti = SeedROICrop()(LoadCT()(write_nifti(tmp_path / "a.nii.gz", affine, shape)), BLOB_2)
    from_dicom = SeedROICrop()(LoadCT()(dicom_series), BLOB_2)
    assert float((from_nifti - from_dicom).abs().max()) <= 1.0  # rounding of the stored values only
