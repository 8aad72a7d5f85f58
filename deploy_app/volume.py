"""CT series geometry: check that a series is a usable axial volume and describe it for the bundle.

The SDK's series-to-volume step sorts the slices and stacks their pixels; this module checks what it
does not (orientation, slice count, missing/duplicate slices, even spacing, consistent headers) and
builds the voxel-to-world matrix from the headers. Every problem is a :class:`UserInputError` that
names the series and the DICOM tag, so a bad series is reported and the others still run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deploy_app.uids import PATH_UID_KEYWORDS, check_uid, is_valid_uid, short_text, shown_value
from scripts.errors import UserInputError

#: The SOP class of the single-frame CT slices the app reads.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Enhanced CT and Legacy Converted Enhanced CT Image Storage: one instance holds every frame.
MULTI_FRAME_CT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"})

#: Largest angle (degrees) between the slice normal and the patient's z axis for an "axial" series.
MAX_AXIAL_TILT_DEG = 10.0
#: Relative tolerance on slice spacing before a series counts as unevenly spaced.
SPACING_TOLERANCE = 0.05
#: Tolerance on the unit length and orthogonality of the ImageOrientationPatient direction cosines.
ORIENTATION_TOLERANCE = 1e-3
#: Largest |RescaleSlope| and |RescaleIntercept| a CT could use; beyond them the header is corrupt.
MAX_RESCALE_SLOPE = 100.0
MAX_RESCALE_INTERCEPT = 32768.0
#: Range of a CT volume's median HU; outside it the stored values are misread (e.g. a wrong
#: PixelRepresentation turns -1000 HU into +64,000).
PLAUSIBLE_MEDIAN_HU = (-1100.0, 3000.0)


@dataclass(frozen=True)
class SeriesGeometry:
    """Voxel grid of a checked series, slices sorted from inferior to superior along the normal.

    Args:
        voxel_to_lps: 4x4 matrix from (column, row, slice) indices to world LPS mm.
        shape: (slices, rows, columns).
        datasets: the slice headers in volume order.
    """

    voxel_to_lps: np.ndarray
    shape: tuple[int, int, int]
    datasets: tuple[pydicom.Dataset, ...]

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))

    @property
    def voxel_to_ras(self) -> np.ndarray:
        """The same matrix in RAS, as MONAI affines are."""
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.voxel_to_lps


def _value_or(dataset: pydicom.Dataset, keyword: str, default: object) -> object:
    """``dataset.get(keyword, default)``, or ``default`` when pydicom cannot convert the value's
    bytes (for naming a series or an instance; :func:`check_series_geometry` refuses such a value)."""
    try:
        return dataset.get(keyword, default)
    except Exception:  # pydicom's conversion of hostile bytes; _check_readable reports it
        return default


def _convert_all(element: pydicom.DataElement) -> None:
    """Convert the items of a sequence, to the last nested element."""
    if element.VR == "SQ":
        for item in element.value:
            for nested in item:
                _convert_all(nested)


def _check_readable(dataset: pydicom.Dataset, who: str) -> None:
    """Convert every element of a slice from its bytes now, so that a value pydicom cannot read (a
    wrong VR, a length that is no multiple of the value size, a sequence of garbage) is refused
    naming the tag."""
    for tag in list(dataset.keys()):
        try:
            _convert_all(dataset[tag])
        except Exception as error:
            keyword = pydicom.datadict.keyword_for_tag(tag) or str(tag)
            raise UserInputError(
                f"{who}: instance {_value_or(dataset, 'InstanceNumber', '?')}: {keyword} cannot be read "
                f"({type(error).__name__}: {shown_value(error)}); the header is corrupt"
            ) from error


def describe_series(dataset: pydicom.Dataset) -> str:
    """How messages name a series (no patient data): number, description and UID."""
    number = _value_or(dataset, "SeriesNumber", "?")
    description = short_text(_value_or(dataset, "SeriesDescription", "") or "no description")
    uid = _value_or(dataset, "SeriesInstanceUID", None)
    shown_uid = str(uid) if is_valid_uid(uid) else f"invalid UID {shown_value(uid)}"
    return f"series {number} '{description}' ({shown_uid})"


def _vector(dataset: pydicom.Dataset, keyword: str, size: int, who: str) -> np.ndarray:
    value = dataset.get(keyword)
    try:
        if any(isinstance(v, (str, bytes)) for v in value):  # type: ignore[union-attr]
            raise TypeError("text, not numbers (a text VR): the SDK's slice sorting needs numbers")
        vector = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        vector = np.empty(0)
    if vector.shape != (size,) or not np.isfinite(vector).all():
        raise UserInputError(
            f"{who}: instance {dataset.get('InstanceNumber', '?')} has no valid {keyword} "
            f"({size} numbers expected, got {shown_value(value)}); the series cannot be placed in the patient"
        )
    return vector


def _instance(who: str, dataset: pydicom.Dataset) -> str:
    return f"{who}: instance {dataset.get('InstanceNumber', '?')}"


def _check_orientation(orientation: np.ndarray, where: str) -> None:
    row, column = orientation[:3], orientation[3:]
    lengths = np.linalg.norm(row), np.linalg.norm(column)
    if max(abs(length - 1.0) for length in lengths) > ORIENTATION_TOLERANCE:
        raise UserInputError(
            f"{where}: ImageOrientationPatient {orientation.round(4).tolist()} is not two unit vectors "
            f"(lengths {lengths[0]:.4f}, {lengths[1]:.4f}); the header is corrupt"
        )
    if abs(float(row @ column)) > ORIENTATION_TOLERANCE:
        raise UserInputError(
            f"{where}: ImageOrientationPatient {orientation.round(4).tolist()} has a row and a column "
            f"direction that are not orthogonal (cosine {float(row @ column):.4f}); the header is corrupt"
        )


def _check_pixel_spacing(spacing: np.ndarray, where: str) -> None:
    if not (spacing > 0).all():
        raise UserInputError(
            f"{where}: PixelSpacing {spacing.tolist()} must be two positive distances in mm; the header "
            "is corrupt"
        )


def check_rescale(dataset: pydicom.Dataset, who: str) -> tuple[float, float]:
    """A slice's (RescaleSlope, RescaleIntercept), 1 and 0 when absent.

    Raises:
        UserInputError: not numbers, not finite, a zero slope or a magnitude no CT uses.
    """
    values = []
    for keyword, default, limit in (
        ("RescaleSlope", 1.0, MAX_RESCALE_SLOPE),
        ("RescaleIntercept", 0.0, MAX_RESCALE_INTERCEPT),
    ):
        raw = dataset.get(keyword)
        try:
            value = default if raw is None or raw == "" else float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or abs(value) > limit:
            raise UserInputError(
                f"{_instance(who, dataset)} has {keyword} {shown_value(raw)}; a CT needs a finite value of "
                f"at most {limit:g} in magnitude"
            )
        values.append(value)
    if values[0] == 0:
        raise UserInputError(f"{_instance(who, dataset)} has RescaleSlope 0: every voxel would be one value")
    return values[0], values[1]


def check_plausible_hu(voxels: np.ndarray, who: str) -> None:
    """Refuse a volume whose median HU no CT has (pixel values misread); sampled, so it is cheap.

    Raises:
        UserInputError: the median of the voxels lies outside :data:`PLAUSIBLE_MEDIAN_HU`.
    """
    sample = voxels[:, ::4, ::4]
    median = float(np.median(sample))
    low, high = PLAUSIBLE_MEDIAN_HU
    if not low <= median <= high:
        raise UserInputError(
            f"{who}: the median voxel is {median:.0f} HU after RescaleSlope/RescaleIntercept, outside "
            f"[{low:.0f}, {high:.0f}] for any CT; PixelRepresentation, BitsStored or the rescale are "
            "probably wrong in the headers"
        )


def is_localizer(dataset: pydicom.Dataset) -> bool:
    """Whether an image is a localizer (topogram, scout): ImageType holds ``LOCALIZER``."""
    image_type = _value_or(dataset, "ImageType", None)
    values = list(image_type) if isinstance(image_type, (MultiValue, list, tuple)) else [image_type]
    return any(isinstance(value, str) and value.strip().upper() == "LOCALIZER" for value in values)


def _frame_count(dataset: pydicom.Dataset) -> int:
    try:
        return int(dataset.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1  # unreadable: leave it to the pixel decoder, which names the instance


def _check_single_frame_ct(dataset: pydicom.Dataset, who: str) -> None:
    """One CT Image Storage slice: not multi-frame (named as such), not another SOP class."""
    frames = _frame_count(dataset)
    sop_class = str(dataset.get("SOPClassUID", ""))
    if frames > 1 or sop_class in MULTI_FRAME_CT_CLASSES:
        raise UserInputError(
            f"{_instance(who, dataset)} is a multi-frame (Enhanced) CT image with {frames} frame(s) "
            "(NumberOfFrames); multi-frame CT is not supported: export the series as single-frame "
            "CT Image Storage slices"
        )
    if sop_class != CT_IMAGE_STORAGE:
        raise UserInputError(
            f"{_instance(who, dataset)} has SOPClassUID {shown_value(sop_class)}; the app reads CT Image "
            f"Storage ({CT_IMAGE_STORAGE}) slices only"
        )


def _matrix_size(dataset: pydicom.Dataset, who: str) -> tuple[int, int]:
    """(Rows, Columns) of a slice, refused unless both are positive whole numbers."""
    size = []
    for keyword in ("Rows", "Columns"):
        value = dataset.get(keyword)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number >= 1 and number == int(number)):
            raise UserInputError(
                f"{_instance(who, dataset)} has {keyword} {shown_value(value)}; a CT slice needs a "
                "positive whole number of pixels"
            )
        size.append(int(number))
    return size[0], size[1]


def check_series_geometry(datasets: Sequence[pydicom.Dataset], *, min_slices: int = 16) -> SeriesGeometry:
    """Check a CT series' slice headers and return its voxel grid.

    Args:
        datasets: one header per slice, in any order.
        min_slices: fewest slices accepted (a nodule ROI spans 100 mm).

    Returns:
        the geometry, slices sorted along the slice normal.

    Raises:
        UserInputError: a multi-frame image, a Study, Series or SOP Instance UID that is not a
            valid UID (they name output folders) or a SOP Instance UID used twice, an orientation
            that is not two orthogonal unit vectors, a pixel spacing that is not positive, an
            impossible rescale, not axial, too few slices, duplicate or missing slices, uneven
            spacing, or inconsistent orientation, pixel spacing or matrix size across slices.
    """
    if not datasets:
        raise UserInputError("the CT series has no slices")
    who = describe_series(datasets[0])
    first_holder: dict[str, pydicom.Dataset] = {}
    for dataset in datasets:
        _check_readable(dataset, who)
        _check_single_frame_ct(dataset, who)
        for keyword in PATH_UID_KEYWORDS:
            check_uid(dataset.get(keyword), keyword, _instance(who, dataset))
        check_rescale(dataset, who)
        earlier = first_holder.setdefault(str(dataset.SOPInstanceUID), dataset)
        if earlier is not dataset:
            raise UserInputError(
                f"{who}: instances {earlier.get('InstanceNumber', '?')} and "
                f"{dataset.get('InstanceNumber', '?')} share the SOPInstanceUID {dataset.SOPInstanceUID}; "
                "every slice needs its own UID, so the series cannot be trusted"
            )
    if len(datasets) < min_slices:
        raise UserInputError(
            f"{who} has {len(datasets)} slice(s); at least {min_slices} contiguous axial slices are needed"
        )
    orientation = _vector(datasets[0], "ImageOrientationPatient", 6, who)
    _check_orientation(orientation, _instance(who, datasets[0]))
    spacing = _vector(datasets[0], "PixelSpacing", 2, who)
    _check_pixel_spacing(spacing, _instance(who, datasets[0]))
    size = _matrix_size(datasets[0], who)
    for dataset in datasets[1:]:
        for keyword, reference in (("ImageOrientationPatient", orientation), ("PixelSpacing", spacing)):
            if not np.allclose(_vector(dataset, keyword, len(reference), who), reference, atol=1e-4):
                raise UserInputError(
                    f"{who}: {keyword} differs between slices "
                    f"(instance {dataset.get('InstanceNumber', '?')}); "
                    "a volume needs one orientation and one pixel spacing"
                )
        if _matrix_size(dataset, who) != size:
            raise UserInputError(f"{who}: Rows/Columns differ between slices; a volume needs one matrix size")
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    tilt = np.degrees(np.arccos(min(1.0, abs(normal[2]) / max(np.linalg.norm(normal), 1e-12))))
    if tilt > MAX_AXIAL_TILT_DEG:
        raise UserInputError(
            f"{who} is not axial: ImageOrientationPatient {orientation.round(3).tolist()} tilts the slices "
            f"{tilt:.0f} degrees from axial (at most {MAX_AXIAL_TILT_DEG:.0f}); send the axial reconstruction"
        )
    positions = np.stack([_vector(d, "ImagePositionPatient", 3, who) for d in datasets])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance, positions = distance[order], positions[order]
    ordered = tuple(datasets[i] for i in order)
    steps = np.diff(distance)
    duplicates = np.flatnonzero(steps < 1e-3)
    if duplicates.size:
        instance = ordered[int(duplicates[0]) + 1].get("InstanceNumber", "?")
        raise UserInputError(
            f"{who}: duplicate slices at {distance[duplicates[0]]:.2f} mm along the slice normal "
            f"(ImagePositionPatient; e.g. instance {instance}); "
            "remove the duplicates or send the series again"
        )
    step = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - step) > SPACING_TOLERANCE * step)
    if uneven.size:
        gap = steps[uneven[0]]
        kind = "missing slice(s)" if gap > 1.5 * step else "uneven slice spacing"
        raise UserInputError(
            f"{who}: {kind}: ImagePositionPatient jumps {gap:.2f} mm after {distance[uneven[0]]:.2f} mm "
            f"while the series spacing is {step:.2f} mm; send the complete series"
        )
    slice_vector = (positions[-1] - positions[0]) / (len(positions) - 1)
    matrix = np.eye(4)
    # DICOM PixelSpacing is (between rows, between columns): a column index steps along the row direction.
    matrix[:3, 0] = row_direction * spacing[1]
    matrix[:3, 1] = column_direction * spacing[0]
    matrix[:3, 2] = slice_vector
    matrix[:3, 3] = positions[0]
    return SeriesGeometry(voxel_to_lps=matrix, shape=(len(ordered), *size), datasets=ordered)


def rescale_to_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored pixel values -> HU, exactly as ``stored * slope + intercept`` in float64 would give.

    int16 when the rescale is integral and the result fits (CT's usual case: half the memory of
    float32, and the ROI crop converts only what it reads), else float32. ``stored`` may be reused.
    """
    if slope == 1 and intercept == int(intercept):
        shift = int(intercept)
        low, high = int(stored.min()) + shift, int(stored.max()) + shift
        if np.iinfo(np.int16).min <= low and high <= np.iinfo(np.int16).max:
            volume = stored.astype(np.int16, copy=False)
            if shift:
                volume += np.int16(shift)
            return volume
        return stored.astype(np.float32) + np.float32(shift)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


class UndecodableSlice(Exception):
    """The pixel data of ``dataset`` could not be decoded (the decoder's error is the cause)."""

    def __init__(self, dataset: pydicom.Dataset) -> None:
        super().__init__(dataset.SOPInstanceUID)
        self.dataset = dataset


_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def _native_pixels(dataset: pydicom.Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed 16-bit single-frame grey image, read straight from its
    bytes; None for anything else (pydicom decodes it). With all 16 bits stored there is no sign
    extension or masking to do, so this is exactly what pydicom returns, without its per-slice cost."""
    transfer_syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    plain = (
        transfer_syntax in _NATIVE_LITTLE_ENDIAN
        and dataset.get("SamplesPerPixel", 1) == 1
        and dataset.get("BitsAllocated") == 16
        and dataset.get("BitsStored") == 16
        and dataset.get("PixelRepresentation") in (0, 1)
        and int(dataset.get("NumberOfFrames", 1) or 1) == 1
    )
    data = dataset.get("PixelData") if plain else None
    if not isinstance(data, bytes) or len(data) not in (2 * rows * columns, 2 * rows * columns + 1):
        return None
    dtype = np.dtype("<i2" if dataset.PixelRepresentation == 1 else "<u2")
    return np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)


def stored_values_releasing_pixel_data(datasets: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Stored values of same-format slices as one (slices, rows, columns) array.

    Each slice's PixelData is deleted as soon as it is in the array: the series' pixels are never
    in memory twice.

    Raises:
        UndecodableSlice: naming the first slice that cannot be decoded.
        ValueError: no slices.
    """
    if not datasets:
        raise ValueError("no slices to stack")
    stored: np.ndarray | None = None
    for index, dataset in enumerate(datasets):
        try:
            pixels = _native_pixels(dataset)
            if pixels is None:
                pixels = pixel_array(dataset)  # not Dataset.pixel_array, which keeps a decoded copy
            header_size = (int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0)))
            if pixels.shape != header_size:
                raise ValueError(f"it decodes to {pixels.shape} pixels, not Rows x Columns {header_size}")
            if stored is None:
                stored = np.empty((len(datasets), *pixels.shape), dtype=pixels.dtype)
            if pixels.shape != stored.shape[1:]:
                raise ValueError(f"it decodes to {pixels.shape} pixels, the first slice {stored.shape[1:]}")
        except Exception as error:
            raise UndecodableSlice(dataset) from error
        stored[index] = pixels
        del dataset.PixelData
    return stored


def to_meta_tensor(voxels_krc: np.ndarray, geometry: SeriesGeometry) -> MetaTensor:
    """HU as the bundle lays volumes out: a (1, columns, rows, slices) MetaTensor view, RAS affine."""
    if tuple(voxels_krc.shape) != geometry.shape:
        raise ValueError(
            f"voxel array {voxels_krc.shape} does not match the series geometry {geometry.shape}"
        )
    # A transposed view in the stored dtype: the ROI crop reads (and converts) only the voxels it needs.
    array = torch.from_numpy(voxels_krc).permute(2, 1, 0)
    return MetaTensor(array[None], affine=torch.as_tensor(geometry.voxel_to_ras, dtype=torch.float64))


@dataclass(frozen=True)
class SeriesVolume:
    """A checked CT series and its HU volume in the bundle's layout."""

    geometry: SeriesGeometry
    volume: MetaTensor
    selection: str

    @property
    def description(self) -> str:
        return describe_series(self.geometry.datasets[0])


@dataclass(frozen=True)
class SeriesFailure:
    """A series (or the whole input) that could not be analysed, and the message for the user."""

    series: str
    message: str
