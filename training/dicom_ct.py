"""Write synthetic CT volumes as valid DICOM CT series (and NIfTI) with exact, known geometry.

Used by the CT phantoms, the demo and the tests. The geometry is an axial scan: rows run towards
the patient's posterior, columns towards the patient's left, slices towards superior (the usual
``ImageOrientationPatient`` 1\\0\\0\\0\\1\\0). Arrays are indexed ``(slice, row, column)``, the
order in which DICOM stores them; world coordinates are LPS millimetres.

Identifiers are synthetic. With ``uid_seed`` every UID is derived from the seed, so the same call
writes byte-identical files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scripts.atomic import atomic_path, process_umask

#: ``ImageOrientationPatient`` of an axial slice: rows along +x (left), columns along +y (posterior).
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Implementation identity written into the file meta information.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.10471893262271385612"
IMPLEMENTATION_VERSION = "LNSC_0_1"
_MANUFACTURER = "lung_nodule_ct_semantic_clip phantom"


@dataclass(frozen=True)
class CTGeometry:
    """Voxel grid of an axial CT series.

    Args:
        shape: ``(slices, rows, columns)``.
        pixel_spacing: ``(row spacing, column spacing)`` in mm, in DICOM ``PixelSpacing`` order
            (the distance between rows, i.e. along y, comes first).
        slice_spacing: distance between slice centres along z, mm.
        origin_lps: world LPS position of voxel (0, 0, 0), i.e. slice 0's ``ImagePositionPatient``.
    """

    shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes (slices, rows, columns), got {self.shape}")
        if min(*self.pixel_spacing, self.slice_spacing) <= 0:
            raise ValueError("pixel and slice spacings must be positive")

    @property
    def spacing_krc(self) -> np.ndarray:
        """Voxel size along (slice, row, column) = (z, y, x) in mm."""
        return np.array([self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1]])

    def index_to_lps(self, index_krc: Sequence[float] | np.ndarray) -> np.ndarray:
        """World LPS mm of (fractional) voxel indices ``(..., 3)`` in (slice, row, column) order."""
        index = np.asarray(index_krc, dtype=np.float64)
        xyz = index[..., ::-1] * self.spacing_krc[::-1]
        return xyz + np.asarray(self.origin_lps)

    def lps_to_index(self, lps: Sequence[float] | np.ndarray) -> np.ndarray:
        """Fractional (slice, row, column) indices of world LPS points ``(..., 3)``."""
        offset = np.asarray(lps, dtype=np.float64) - np.asarray(self.origin_lps)
        return (offset / self.spacing_krc[::-1])[..., ::-1]

    def ras_affine(self) -> np.ndarray:
        """NIfTI affine for the volume transposed to ``(column, row, slice)`` = (i, j, k), in RAS."""
        x0, y0, z0 = self.origin_lps
        affine = np.diag([-self.pixel_spacing[1], -self.pixel_spacing[0], self.slice_spacing, 1.0])
        affine[:3, 3] = [-x0, -y0, z0]
        return affine

    def slice_positions(self) -> np.ndarray:
        """``ImagePositionPatient`` of every slice, shape (slices, 3)."""
        k = np.arange(self.shape[0], dtype=np.float64)
        return self.index_to_lps(np.stack([k, np.zeros_like(k), np.zeros_like(k)], axis=-1))


@dataclass(frozen=True)
class SyntheticPatient:
    """Synthetic patient identity (never a real person)."""

    patient_id: str
    patient_name: str = "Phantom^Nodule"
    sex: str = "O"
    birth_date: str = ""


@dataclass(frozen=True)
class WrittenSeries:
    """What :func:`write_ct_series` wrote."""

    directory: Path
    files: tuple[Path, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...] = field(repr=False)


def _uid(uid_seed: str | None, *parts: object) -> str:
    if uid_seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[uid_seed, *map(str, parts)])


def _series_dataset(
    geometry: CTGeometry,
    patient: SyntheticPatient,
    *,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    series_description: str,
    slice_thickness: float,
    study_date: str,
    body_part: str,
    study_id: str,
    accession_number: str,
) -> pydicom.Dataset:
    """The attributes every slice of the series shares."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = study_id
    ds.AccessionNumber = accession_number
    ds.StudyDescription = "Synthetic chest CT (phantom)"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = study_date
    ds.SeriesTime = "120000"
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "FFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = _MANUFACTURER
    ds.ContentDate = study_date
    ds.ContentTime = "120000"
    ds.ImageOrientationPatient = [f"{v:g}" for v in AXIAL_ORIENTATION]
    ds.PixelSpacing = [f"{v:.6g}" for v in geometry.pixel_spacing]
    ds.SliceThickness = f"{slice_thickness:.6g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    return ds


def _atomic_directory(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))


def write_ct_series(
    volume_hu: np.ndarray,
    geometry: CTGeometry,
    out_dir: str | Path,
    *,
    patient: SyntheticPatient,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_seed: str | None = None,
    series_number: int = 1,
    series_description: str = "Phantom chest CT",
    slice_thickness: float | None = None,
    study_date: str = "20250101",
    body_part: str = "CHEST",
    study_id: str = "1",
    accession_number: str = "",
) -> WrittenSeries:
    """Write ``volume_hu`` as one CT Image Storage file per slice into ``out_dir``.

    The folder is filled under a temporary name and renamed when complete, so a failure leaves
    nothing behind; an existing ``out_dir`` is an error.

    Args:
        volume_hu: HU values indexed (slice, row, column); rounded to int16.
        geometry: the voxel grid; its shape must equal ``volume_hu.shape``.
        out_dir: the series folder to create (files ``CT000000.dcm`` ...).
        patient: synthetic patient identity.
        study_uid: StudyInstanceUID (default: generated; deterministic with ``uid_seed``).
        series_uid: SeriesInstanceUID (same defaults).
        frame_of_reference_uid: FrameOfReferenceUID (same defaults).
        uid_seed: seed for every generated UID (same seed, same UIDs).
        series_number: SeriesNumber.
        series_description: SeriesDescription.
        slice_thickness: SliceThickness in mm (default: the slice spacing).
        study_date: StudyDate (YYYYMMDD).
        body_part: BodyPartExamined.
        study_id: StudyID.
        accession_number: AccessionNumber (may be empty).

    Returns:
        the written files and UIDs.
    """
    if tuple(volume_hu.shape) != tuple(geometry.shape):
        raise ValueError(f"volume shape {volume_hu.shape} differs from the geometry's {geometry.shape}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"'{out_dir}' already exists; choose a new series folder")
    study_uid = study_uid or _uid(uid_seed, "study")
    series_uid = series_uid or _uid(uid_seed, "series", series_number)
    frame_uid = frame_of_reference_uid or _uid(uid_seed, "frame")
    shared = _series_dataset(
        geometry,
        patient,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        series_number=series_number,
        series_description=series_description,
        slice_thickness=slice_thickness or geometry.slice_spacing,
        study_date=study_date,
        body_part=body_part,
        study_id=study_id,
        accession_number=accession_number,
    )
    pixels = np.clip(np.rint(volume_hu), -32768, 32767).astype("<i2")
    positions = geometry.slice_positions()
    staging = _atomic_directory(out_dir)
    names: list[str] = []
    sop_uids: list[str] = []
    try:
        for k in range(geometry.shape[0]):
            sop_uid = _uid(uid_seed, "instance", series_uid, k)
            ds = pydicom.Dataset()
            ds.update(shared)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION
            ds.file_meta = meta
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.6f}".rstrip("0").rstrip(".") for v in positions[k]]
            ds.SliceLocation = f"{positions[k][2]:.6f}".rstrip("0").rstrip(".")
            ds.PixelData = pixels[k].tobytes()
            name = f"CT{k:06d}.dcm"
            ds.save_as(staging / name, enforce_file_format=True)
            names.append(name)
            sop_uids.append(sop_uid)
        staging.chmod(0o777 & ~process_umask())  # mkdtemp makes an owner-only folder
        os.replace(staging, out_dir)
    except BaseException:
        for leftover in staging.glob("*"):
            leftover.unlink()
        staging.rmdir()
        raise
    return WrittenSeries(
        directory=out_dir,
        files=tuple(out_dir / n for n in names),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        sop_instance_uids=tuple(sop_uids),
    )


def write_nifti(volume_hu: np.ndarray, geometry: CTGeometry, path: str | Path) -> Path:
    """Write ``volume_hu`` (slice, row, column) as an int16 NIfTI with the matching RAS affine, atomically."""
    if tuple(volume_hu.shape) != tuple(geometry.shape):
        raise ValueError(f"volume shape {volume_hu.shape} differs from the geometry's {geometry.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.clip(np.rint(volume_hu), -32768, 32767).astype(np.int16).transpose(2, 1, 0)
    image = nib.Nifti1Image(data, geometry.ras_affine())
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as temporary:  # nibabel picks the format from the name
        nib.save(image, temporary)
    return path
