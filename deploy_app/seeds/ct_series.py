"""The CT series seeds are placed in: its identity, voxel grid, extent and image planes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from highdicom.spatial import ImageToReferenceTransformer

from deploy_app.sr import (
    series_identity,
)
from deploy_app.uids import shown_value
from deploy_app.volume import SeriesGeometry, describe_series
from scripts.errors import UserInputError
from scripts.geometry import format_extent_lps, seed_inside_scan, volume_extent_lps


@dataclass(frozen=True)
class ImagePlane:
    """Geometry of one CT image.

    Attributes:
        position_lps: ImagePositionPatient (centre of the top-left pixel), mm.
        orientation: ImageOrientationPatient (row direction cosines, then column direction cosines).
        pixel_spacing: PixelSpacing (spacing between rows, spacing between columns), mm.
        rows: Rows.
        columns: Columns.
    """

    position_lps: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    def image_to_world(self, column_row: np.ndarray) -> np.ndarray:
        """World LPS mm of DICOM image coordinates ``(n, 2)`` = (column, row), (0.5, 0.5) = pixel centre."""
        transformer = ImageToReferenceTransformer(
            image_position=self.position_lps,
            image_orientation=self.orientation,
            pixel_spacing=self.pixel_spacing,
        )
        return transformer(np.asarray(column_row, dtype=np.float64).reshape(-1, 2))


def _floats(ds: pydicom.Dataset, keyword: str, count: int, where: str) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise UserInputError(f"{where}: {keyword} must be {count} numbers, got {value!r}")
    return numbers


def _file_name(ds: pydicom.Dataset) -> str | None:
    """The file a dataset was read from, if it was read from a named file."""
    name = getattr(ds, "filename", None)
    return str(name) if isinstance(name, (str, Path)) and str(name) else None


def _folders_of(datasets: Iterable[pydicom.Dataset]) -> tuple[Path, ...]:
    parents = {Path(name).parent for name in map(_file_name, datasets) if name}  # resolved once each
    return tuple(sorted({parent.resolve() for parent in parents}))


def _plane_of(ds: pydicom.Dataset) -> ImagePlane:
    name = _file_name(ds)
    where = f"CT image {ds.get('SOPInstanceUID', '?')}" + (f" ({name})" if name else "")
    position = _floats(ds, "ImagePositionPatient", 3, where)
    orientation = _floats(ds, "ImageOrientationPatient", 6, where)
    spacing = _floats(ds, "PixelSpacing", 2, where)
    if min(spacing) <= 0:
        raise UserInputError(f"{where}: PixelSpacing must be positive, got {spacing}")
    return ImagePlane(
        position_lps=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )


def _identity_error(datasets: Sequence[pydicom.Dataset]) -> UserInputError:
    """The first slice whose study, series or frame of reference UID is empty or not the first slice's."""
    first = datasets[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        expected = str(first.get(keyword, ""))
        for ds in datasets:
            value = str(ds.get(keyword, ""))
            if not value or value != expected:
                return UserInputError(
                    f"{describe_series(first)}: instance {ds.get('InstanceNumber', '?')} has {keyword} "
                    f"{shown_value(ds.get(keyword))}, not one shared by every slice of the series; the "
                    "seeds and results could not be placed in one frame of reference"
                )
    return UserInputError(f"{describe_series(first)}: the slices do not share one study, series and frame")


class _ImagePlanes(Mapping[str, ImagePlane]):
    """SOPInstanceUID -> :class:`ImagePlane`, each read from its header when first asked for.

    Only 2D SCOORD seeds need an image's plane, and they name a few images of hundreds.
    """

    def __init__(self, datasets: Sequence[pydicom.Dataset]) -> None:
        self._datasets = {str(ds.SOPInstanceUID): ds for ds in datasets}
        self._planes: dict[str, ImagePlane] = {}

    def __getitem__(self, uid: str) -> ImagePlane:
        if uid not in self._planes:
            self._planes[uid] = _plane_of(self._datasets[uid])
        return self._planes[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._datasets)

    def __len__(self) -> int:
        return len(self._datasets)


@dataclass(frozen=True, eq=False)
class CTSeriesInfo:
    """What the seed sources need to know about the CT series (see :meth:`from_geometry`).

    Attributes:
        study_instance_uid: StudyInstanceUID.
        series_instance_uid: SeriesInstanceUID.
        frame_of_reference_uid: FrameOfReferenceUID.
        planes: SOPInstanceUID -> geometry of that image.
        affine_ras: 4x4 map from voxel indices (column, row, slice) to world RAS mm, slices sorted
            along the slice normal: the geometry a DICOM reader (ITK) gives the volume.
        shape: (columns, rows, slices).
        folders: folders holding the series' files (empty when the datasets were not read from files).
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    planes: Mapping[str, ImagePlane]
    affine_ras: np.ndarray = field(repr=False)
    shape: tuple[int, int, int]
    folders: tuple[Path, ...] = ()

    @classmethod
    def from_geometry(cls, geometry: SeriesGeometry) -> CTSeriesInfo:
        """The info of a series checked by :func:`deploy_app.volume.check_series_geometry`.

        The voxel grid is the check's own (the one derivation of a series' geometry); image planes
        are read from their headers only when a 2D SCOORD seed asks for one.

        Raises:
            UserInputError: a slice lacks the series' StudyInstanceUID, SeriesInstanceUID or
                FrameOfReferenceUID, or has another one (names the tag and the instance).
        """
        try:
            identity = series_identity(geometry.datasets)
        except ValueError as error:
            raise _identity_error(geometry.datasets) from error
        slices, rows, columns = geometry.shape
        return cls(
            study_instance_uid=identity.study_instance_uid,
            series_instance_uid=identity.series_instance_uid,
            frame_of_reference_uid=identity.frame_of_reference_uid,
            planes=_ImagePlanes(geometry.datasets),
            affine_ras=geometry.voxel_to_ras,
            shape=(columns, rows, slices),
            folders=_folders_of(geometry.datasets),
        )

    @property
    def extent_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """World LPS bounding box (min, max) of the voxel centres."""
        return volume_extent_lps(self.affine_ras, self.shape)

    def describe_extent(self) -> str:
        """The extent as ``"(x0..x1, y0..y1, z0..z1)"`` mm, for messages."""
        return format_extent_lps(self.affine_ras, self.shape)

    def contains(self, position_lps: Sequence[float]) -> bool:
        """Whether a seed lies inside the scan, by the rule of the bundle's ``SeedROICrop``.

        The seed's continuous voxel index must lie within half a voxel of the voxel-centre grid on
        every axis, i.e. in ``[-0.5, n - 0.5]``.
        """
        return seed_inside_scan(self.affine_ras, self.shape, position_lps)

    def applies_to_folder(self, folder: Path) -> bool:
        """Whether a seeds file in ``folder`` applies to this series (its files lie there or below)."""
        if not self.folders:
            return True
        folder = folder.resolve()
        return any(f == folder or folder in f.parents for f in self.folders)
