"""Preprocessing of the paper as MONAI transforms (array transform + dictionary twin with a ``d``).

Inference chain (one nodule)::

    LoadCTd -> SeedROICropd -> NinePlanesd -> CLIPNormalized
    path      (1,X,Y,Z) HU    (1,100,100,100) HU   (9,224,224) [0,1]   (9,3,224,224)

- :class:`LoadCT` reads a NIfTI file or a folder of DICOM files into a float32 HU
  :class:`~monai.data.MetaTensor` ``(1, X, Y, Z)`` whose ``affine`` is voxel -> world RAS.
- :class:`SeedROICrop` samples the paper's 100 mm cube at 1 mm around a world LPS seed, trilinear,
  air (-1000 HU) outside the scan. Only the voxels under the cube are read. The cube is indexed
  ``(z, y, x) = (superior, posterior, left)`` with the seed at index 50 on every axis: the
  authors' convention (see docs/method.md, "Plane geometry").
- :class:`NinePlanes` windows the cube to [0, 1] (as the authors do before rotating) and samples
  the nine 50 x 50 mm planes at 1 mm directly through the seed (no rotation of the volume), then
  upsamples each to 224 x 224 with corner-aligned bilinear interpolation (scipy ``zoom(order=1)``).
- :class:`CLIPNormalize` repeats the planes to 3 channels and applies the CLIP mean/std.

Training augmentation lives in :mod:`scripts.augmentation` and the resampling both use in
:mod:`scripts.resampling`.

Every transform is usable from a bundle config, e.g. ``{"_target_": "scripts.transforms.SeedROICropd"}``.
Coordinates: see :mod:`scripts.geometry` (the one place where LPS meets RAS).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import ITKReader, NibabelReader
from monai.transforms import (
    LoadImage,
    MapTransform,
    Transform,
)

from scripts.errors import UserInputError
from scripts.geometry import format_extent_lps, lps_to_voxel_matrix, seed_inside_scan
from scripts.resampling import normalising_matrix, sample_linear

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PLANE_DIRECTIONS",
    "CLIPNormalize",
    "CLIPNormalized",
    "LoadCT",
    "LoadCTd",
    "NinePlanes",
    "NinePlanesd",
    "SeedROICrop",
    "SeedROICropd",
    "nine_planes_for_seeds",
    "parse_seed",
    "plain_tensor",
    "windowed_planes_for_seeds",
    "window_hu",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_S2 = 1.0 / math.sqrt(2.0)
#: Row and column unit vectors of the nine planes in ROI array axes (z, y, x) = (S, P, L), in the
#: order of the table in docs/method.md ("Plane geometry").
PLANE_DIRECTIONS: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # 1 axial: rows y, columns x
    ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),  # 2 coronal: rows z, columns x
    ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # 3 sagittal: rows z, columns y
    ((0.0, 1.0, 0.0), (_S2, 0.0, _S2)),  # 4 rows y, columns (z + x)/sqrt2
    ((_S2, 0.0, -_S2), (0.0, 1.0, 0.0)),  # 5 rows (z - x)/sqrt2, columns y
    ((_S2, _S2, 0.0), (0.0, 0.0, 1.0)),  # 6 rows (z + y)/sqrt2, columns x
    ((_S2, -_S2, 0.0), (0.0, 0.0, 1.0)),  # 7 rows (z - y)/sqrt2, columns x
    ((1.0, 0.0, 0.0), (0.0, _S2, _S2)),  # 8 rows z, columns (y + x)/sqrt2
    ((1.0, 0.0, 0.0), (0.0, _S2, -_S2)),  # 9 rows z, columns (y - x)/sqrt2
)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def window_hu(image: torch.Tensor, hu_window: tuple[float, float] = (-1000.0, 500.0)) -> torch.Tensor:
    """Clip HU to ``hu_window`` and scale it linearly to [0, 1].

    Args:
        image: tensor in HU.
        hu_window: (low, high) HU.

    Returns:
        Float tensor in [0, 1].
    """
    low, high = float(hu_window[0]), float(hu_window[1])
    if not high > low:
        raise ValueError(f"hu_window must be (low, high) with high > low, got {hu_window}")
    return (image.clamp(low, high) - low) / (high - low)


def _who(pid: Any = None, nodule_id: Any = None, filename: Any = None) -> str:
    parts = []
    if pid is not None:
        parts.append(f"pid {pid}")
    if nodule_id is not None:
        parts.append(f"nodule {nodule_id}")
    text = " ".join(parts)
    if filename:
        text = f"{text} (image {filename})" if text else f"image {filename}"
    return text or "nodule"


def _filename(image: Any) -> str | None:
    if isinstance(image, MetaTensor):
        name = image.meta.get("filename_or_obj")
        return str(name) if name else None
    return None


def plain_tensor(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _image_kind(file: Path) -> str:
    if file.is_dir():
        return "a DICOM series"
    return "a NIfTI file" if file.name.lower().endswith(_NIFTI_SUFFIXES) else "an image"


def _root_cause(error: BaseException) -> str:
    """First line of the innermost error: MONAI folds every reader's traceback into its message."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class LoadCT(Transform):
    """Load a CT volume as float32 HU ``(1, X, Y, Z)`` MetaTensor with a voxel -> RAS affine.

    A ``.nii``/``.nii.gz`` file is read with :class:`~monai.data.NibabelReader`; a folder of DICOM
    files (one axial series) with :class:`~monai.data.ITKReader` (GDCM sorts the slices by position
    and applies RescaleSlope/Intercept); any other file (``.mha``, ``.nrrd``) with ITK as well.

    Args:
        base_dir: optional folder that relative paths are resolved against.
        series_name: DICOM SeriesInstanceUID to read when a folder holds several series.
    """

    def __init__(self, base_dir: str | Path | None = None, series_name: str = "") -> None:
        self.base_dir = Path(base_dir) if base_dir else None
        self.series_name = series_name
        self._common: dict[str, Any] = {"image_only": True, "ensure_channel_first": True, "dtype": np.float32}
        self._nifti = LoadImage(reader=NibabelReader(), **self._common)
        self._itk_loader: LoadImage | None = None

    @property
    def _itk(self) -> LoadImage:
        # built on first use: NIfTI-only pipelines work where ITK is not installed
        if self._itk_loader is None:
            self._itk_loader = LoadImage(reader=ITKReader(series_name=self.series_name), **self._common)
        return self._itk_loader

    def __call__(self, path: str | Path) -> MetaTensor:  # type: ignore[override]
        """Read ``path``.

        Args:
            path: a NIfTI file or a folder of DICOM files.

        Returns:
            MetaTensor (1, X, Y, Z) float32 HU; ``.affine`` maps voxel indices to RAS mm.

        Raises:
            UserInputError: the path does not exist, cannot be read, or is not a 3-D image.
        """
        if not isinstance(path, (str, Path)):
            raise UserInputError(f"expected an image path (a NIfTI file or a DICOM folder), got {path!r}")
        file = Path(path).expanduser()
        if self.base_dir is not None and not file.is_absolute():
            file = self.base_dir / file
        if not file.exists():
            raise UserInputError(
                f"image {file}: no such file or folder; give a NIfTI file (.nii/.nii.gz) or a folder "
                "holding one DICOM CT series"
            )
        if file.is_dir():
            if not any(p.is_file() for p in file.iterdir()):
                raise UserInputError(f"image {file}: the folder is empty; it should hold one DICOM CT series")
            loader = self._itk
        elif file.name.lower().endswith(_NIFTI_SUFFIXES):
            loader = self._nifti
        else:
            loader = self._itk
        try:
            image = loader(str(file))
        except Exception as error:  # the readers raise many kinds; all mean "cannot read this"
            raise UserInputError(
                f"image {file}: cannot read it as {_image_kind(file)} ({_root_cause(error)})"
            ) from error
        shape = tuple(image.shape)
        if len(shape) != 4 or shape[0] != 1 or min(shape[1:]) < 2:
            raise UserInputError(
                f"image {file}: expected one 3-D CT volume with at least 2 voxels along each axis, got "
                f"an image of shape {shape[1:] if len(shape) > 1 else shape} "
                f"(channels {shape[0] if len(shape) > 1 else 1}); give a single 3-D series"
            )
        if not isinstance(image, MetaTensor):  # LoadImage always gives one; keep the contract explicit
            raise UserInputError(f"image {file}: the reader returned no geometry")
        return image


class LoadCTd(MapTransform):
    """Dictionary twin of :class:`LoadCT`: replaces each path under ``keys`` with the loaded volume.

    Args:
        keys: keys holding image paths.
        base_dir: optional folder that relative paths are resolved against.
        series_name: DICOM SeriesInstanceUID when a folder holds several series.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        base_dir: str | Path | None = None,
        series_name: str = "",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCT(base_dir=base_dir, series_name=series_name)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


# --------------------------------------------------------------------------------------------------
# ROI crop around the seed
# --------------------------------------------------------------------------------------------------


def parse_seed(seed: Any, who: str) -> np.ndarray:
    try:
        array = np.asarray(seed.detach().cpu() if isinstance(seed, torch.Tensor) else seed, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.array([np.nan])
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise UserInputError(
            f"{who}: the seed must be 3 finite numbers (coordX, coordY, coordZ in world LPS mm), got {seed!r}"
        )
    return array


class SeedROICrop(Transform):
    """Sample a cube around a world LPS seed, 1 mm isotropic, trilinear, air outside the scan.

    The output is indexed ``(z, y, x)`` = (superior, posterior, left): element ``[a, b, c]`` is the
    volume at LPS ``seed + spacing * (c - C, b - C, a - C)`` with ``C = roi_size // 2`` (50), so the
    seed is at index ``(C, C, C)``. Only the block of voxels under the cube (+1 voxel) is read.

    Args:
        roi_size: number of samples per axis (100 in the paper).
        spacing: sample spacing in mm (1.0 in the paper).
        pad_value: value outside the scan (air, -1000 HU; the authors used 0).
    """

    def __init__(self, roi_size: int = 100, spacing: float = 1.0, pad_value: float = -1000.0) -> None:
        if int(roi_size) < 2 or not spacing > 0:
            raise ValueError(f"roi_size must be >= 2 and spacing > 0, got {roi_size}, {spacing}")
        self.roi_size = int(roi_size)
        self.spacing = float(spacing)
        self.pad_value = float(pad_value)

    def roi_to_voxel(self, affine_ras: np.ndarray | torch.Tensor, seed_lps: np.ndarray) -> np.ndarray:
        """4x4 map from homogeneous ROI indices (a, b, c) to continuous voxel indices of the volume."""
        s, centre = self.spacing, self.roi_size // 2
        roi_to_lps = np.zeros((4, 4))
        roi_to_lps[0, 2] = roi_to_lps[1, 1] = roi_to_lps[2, 0] = s  # c -> x (L), b -> y (P), a -> z (S)
        roi_to_lps[:3, 3] = seed_lps - s * centre
        roi_to_lps[3, 3] = 1.0
        return lps_to_voxel_matrix(affine_ras) @ roi_to_lps

    def __call__(  # type: ignore[override]
        self,
        img: torch.Tensor,
        seed: Sequence[float] | np.ndarray | torch.Tensor,
        affine: np.ndarray | torch.Tensor | None = None,
        pid: Any = None,
        nodule_id: Any = None,
    ) -> torch.Tensor:
        """Crop.

        Args:
            img: volume (1, X, Y, Z) in HU; a MetaTensor (its ``affine`` is used) or a tensor with ``affine``.
            seed: world LPS seed (3,) in mm.
            affine: voxel -> RAS affine when ``img`` is not a MetaTensor.
            pid: patient id, only for error messages.
            nodule_id: nodule id, only for error messages.

        Returns:
            float32 tensor (1, roi_size, roi_size, roi_size), indexed (z, y, x) = (S, P, L).

        Raises:
            UserInputError: the seed is not 3 finite numbers or lies outside the scan.
        """
        filename = _filename(img)
        who = _who(pid, nodule_id)
        seed_lps = parse_seed(seed, _who(pid, nodule_id, filename))
        if affine is None:
            if not isinstance(img, MetaTensor):
                raise ValueError("SeedROICrop needs a MetaTensor or an explicit affine")
            affine = img.affine
        volume = plain_tensor(img)
        if volume.ndim != 4 or volume.shape[0] != 1 or min(volume.shape[1:]) < 2:
            raise UserInputError(
                f"{_who(pid, nodule_id, filename)}: expected a volume of shape (1, X, Y, Z), each >= 2, "
                f"got {tuple(volume.shape)}"
            )
        spatial = tuple(int(n) for n in volume.shape[1:])
        index_map = self.roi_to_voxel(affine, seed_lps)
        if not seed_inside_scan(affine, spatial, seed_lps):
            where = f"{who}: " if who != "nodule" else ""
            source = f" (image {filename})" if filename else ""
            raise UserInputError(
                f"{where}seed ({seed_lps[0]:.2f}, {seed_lps[1]:.2f}, {seed_lps[2]:.2f}) mm LPS lies outside "
                f"the scan, which spans {format_extent_lps(affine, spatial)} mm LPS; check coordX/Y/Z are "
                f"world LPS millimetres{source}"
            )
        # voxel block covering the cube (+1 voxel), at least 2 voxels per axis
        last = self.roi_size - 1
        corners = np.array([[a, b, c, 1.0] for a in (0, last) for b in (0, last) for c in (0, last)])
        voxels = corners @ index_map[:3].T
        low, high = [], []
        for axis, n in enumerate(spatial):
            lo = int(min(max(math.floor(voxels[:, axis].min()) - 1, 0), n - 2))
            hi = int(max(min(math.ceil(voxels[:, axis].max()) + 1, n - 1), lo + 1))
            low.append(lo)
            high.append(hi)
        block = volume[0, low[0] : high[0] + 1, low[1] : high[1] + 1, low[2] : high[2] + 1]  # a view
        shift = np.eye(4)
        shift[:3, 3] = -np.asarray(low, dtype=np.float64)
        size = (self.roi_size,) * 3
        roi = sample_linear(block, size, shift @ index_map, self.pad_value)
        return roi[None]


class SeedROICropd(MapTransform):
    """Dictionary twin of :class:`SeedROICrop`; the seed and optional ids come from the dictionary.

    Args:
        keys: keys of the volumes to crop (replaced by their ROI).
        seed_key: key of the world LPS seed (3,) in mm.
        pid_key: key of the patient id (optional, for messages).
        nodule_key: key of the nodule id (optional, for messages).
        roi_size: samples per axis.
        spacing: sample spacing in mm.
        pad_value: value outside the scan (HU).
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        seed_key: str = "seed",
        pid_key: str = "pid",
        nodule_key: str = "nodule_id",
        roi_size: int = 100,
        spacing: float = 1.0,
        pad_value: float = -1000.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.seed_key, self.pid_key, self.nodule_key = seed_key, pid_key, nodule_key
        self.cropper = SeedROICrop(roi_size=roi_size, spacing=spacing, pad_value=pad_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pid, nodule_id = d.get(self.pid_key), d.get(self.nodule_key)
        if self.seed_key not in d:
            raise UserInputError(f"{_who(pid, nodule_id)}: no seed (key {self.seed_key!r}) given")
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], d[self.seed_key], pid=pid, nodule_id=nodule_id)
        return d


# --------------------------------------------------------------------------------------------------
# nine planes
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _plane_grid(
    roi_shape: tuple[int, int, int], plane_size: int, device: str
) -> tuple[tuple[slice, ...], torch.Tensor]:
    """The ROI block the nine planes read, and their grid_sample grid (1, 9, P, P, 3) in that block.

    The planes pass through index ``roi_shape // 2``; the block holds every voxel a trilinear
    sample needs (a 73^3 corner-free part of the 100^3 ROI), so only it is windowed.
    """
    directions = np.asarray(PLANE_DIRECTIONS, dtype=np.float64)  # (9, 2, 3)
    offsets = np.arange(plane_size, dtype=np.float64) - plane_size // 2  # -25 .. +24
    centre = np.asarray(roi_shape, dtype=np.float64) // 2
    rows, cols = directions[:, 0], directions[:, 1]
    points = (
        centre
        + offsets[None, :, None, None] * rows[:, None, None, :]
        + offsets[None, None, :, None] * cols[:, None, None, :]
    )  # (9, P, P, 3) indices (z, y, x)
    flat = points.reshape(-1, 3)
    last = np.asarray(roi_shape) - 1
    low = np.clip(np.floor(flat.min(axis=0)).astype(int), 0, last - 1)
    high = np.maximum(np.clip(np.floor(flat.max(axis=0)).astype(int) + 1, 0, last), low + 1)
    homogeneous = np.concatenate([points - low, np.ones((*points.shape[:-1], 1))], axis=-1)
    grid = homogeneous @ normalising_matrix(high - low + 1)[:3].T
    block = tuple(slice(int(a), int(b) + 1) for a, b in zip(low, high, strict=True))
    return block, torch.as_tensor(grid[None], dtype=torch.float32, device=device)


class NinePlanes(Transform):
    """The paper's nine planes through the seed, windowed to [0, 1] and upsampled.

    Plane ``p`` (order and in-plane orientation of docs/method.md, see :data:`PLANE_DIRECTIONS`) has
    ``plane[i, j] = window(roi)(C + (i - P/2) r_p + (j - P/2) c_p)`` with ``C`` the ROI centre index
    (50), ``P`` = ``plane_size``, trilinear, 0 outside; then corner-aligned bilinear resizing to
    ``out_size``. The window is applied before sampling, as the authors window the crop before
    rotating it.

    Args:
        plane_size: samples per plane side at the ROI spacing (50 = 50 mm).
        out_size: output side in pixels (224 for CLIP).
        hu_window: HU clip range mapped to [0, 1].
    """

    def __init__(
        self, plane_size: int = 50, out_size: int = 224, hu_window: tuple[float, float] = (-1000.0, 500.0)
    ) -> None:
        self.plane_size = int(plane_size)
        self.out_size = int(out_size)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))

    def sample_planes(self, roi: torch.Tensor) -> torch.Tensor:
        """The nine windowed planes at the ROI spacing, before resizing: (9, plane_size, plane_size)."""
        roi = plain_tensor(roi)
        if roi.ndim != 4 or roi.shape[0] != 1 or min(roi.shape[1:]) < 2:
            raise ValueError(f"NinePlanes expects an ROI of shape (1, D, H, W), got {tuple(roi.shape)}")
        block, grid = _plane_grid(tuple(int(n) for n in roi.shape[1:]), self.plane_size, str(roi.device))
        windowed = window_hu(roi[0][block].to(torch.float32), self.hu_window)
        planes = F.grid_sample(
            windowed[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        return planes[0, 0]

    def __call__(self, roi: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Planes of one ROI.

        Args:
            roi: (1, D, H, W) HU, indexed (z, y, x) with the seed at index ``D // 2`` etc.

        Returns:
            float32 tensor (9, out_size, out_size) in [0, 1].
        """
        planes = self.sample_planes(roi)
        if self.out_size != self.plane_size:
            size = (self.out_size, self.out_size)
            planes = F.interpolate(planes[None], size=size, mode="bilinear", align_corners=True)[0]
        return planes.clamp_(0.0, 1.0)  # interpolation weights can overshoot [0, 1] by a rounding error


class NinePlanesd(MapTransform):
    """Dictionary twin of :class:`NinePlanes`.

    Args:
        keys: keys of the ROIs (replaced by their planes).
        plane_size: samples per plane side.
        out_size: output side in pixels.
        hu_window: HU clip range mapped to [0, 1].
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        plane_size: int = 50,
        out_size: int = 224,
        hu_window: tuple[float, float] = (-1000.0, 500.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.planes = NinePlanes(plane_size=plane_size, out_size=out_size, hu_window=hu_window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.planes(d[key])
        return d


class CLIPNormalize(Transform):
    """(N, H, W) planes in [0, 1] -> (N, 3, H, W), channels repeated, CLIP mean/std applied (batches too).

    Args:
        mean: per-channel mean.
        std: per-channel standard deviation.
    """

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, planes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Normalise.

        Args:
            planes: (N, H, W) in [0, 1], or a batch (B, N, H, W).

        Returns:
            float32 tensor (N, 3, H, W), or (B, N, 3, H, W).
        """
        planes = plain_tensor(planes).to(torch.float32)
        if planes.ndim not in (3, 4):
            raise ValueError(
                f"CLIPNormalize expects planes (N, H, W) or (B, N, H, W), got {tuple(planes.shape)}"
            )
        mean, std = self.mean.to(planes.device), self.std.to(planes.device)
        return (planes.unsqueeze(-3) - mean) / std

    def inverse(self, normalised: torch.Tensor) -> torch.Tensor:
        """(..., N, 3, H, W) CLIP-normalised -> (..., N, H, W) in [0, 1] (first channel)."""
        normalised = plain_tensor(normalised).to(torch.float32)
        first = normalised[..., 0, :, :]
        return first * self.std[0, 0, 0, 0].item() + self.mean[0, 0, 0, 0].item()


class CLIPNormalized(MapTransform):
    """Dictionary twin of :class:`CLIPNormalize`.

    Args:
        keys: keys of the planes.
        mean: per-channel mean.
        std: per-channel standard deviation.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = CLIPNormalize(mean=mean, std=std)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d


# --------------------------------------------------------------------------------------------------
# convenience for the deploy app and the benchmarks
# --------------------------------------------------------------------------------------------------


def nine_planes_for_seeds(
    volume: MetaTensor,
    seeds_lps: Sequence[Sequence[float]],
    *,
    pid: Any = None,
    nodule_ids: Sequence[Any] | None = None,
    pad_value: float = -1000.0,
) -> torch.Tensor:
    """Model input for several nodules of one loaded volume: crop, nine planes, CLIP normalisation.

    The same arguments, returns and errors as :func:`windowed_planes_for_seeds`, normalised with
    :class:`CLIPNormalize`.
    """
    planes = windowed_planes_for_seeds(volume, seeds_lps, pid=pid, nodule_ids=nodule_ids, pad_value=pad_value)
    return CLIPNormalize()(planes) if len(planes) else planes


def windowed_planes_for_seeds(
    volume: MetaTensor,
    seeds_lps: Sequence[Sequence[float]],
    *,
    pid: Any = None,
    nodule_ids: Sequence[Any] | None = None,
    pad_value: float = -1000.0,
) -> torch.Tensor:
    """The nine windowed planes in [0, 1] of several nodules of one loaded volume (crop, planes).

    Args:
        volume: (1, X, Y, Z) HU MetaTensor from :class:`LoadCT`.
        seeds_lps: N world LPS seeds in mm.
        pid: patient id for error messages.
        nodule_ids: N nodule ids for error messages (default 0 .. N-1).
        pad_value: HU outside the scan (air; the authors used 0).

    Returns:
        float32 tensor (N, 9, 3, 224, 224) on the volume's device.

    Raises:
        UserInputError: a seed is malformed or lies outside the scan.
    """
    crop = SeedROICrop(pad_value=pad_value)
    planes = NinePlanes()
    ids = list(nodule_ids) if nodule_ids is not None else list(range(len(seeds_lps)))
    if len(ids) != len(seeds_lps):
        raise ValueError(f"{len(seeds_lps)} seeds but {len(ids)} nodule ids")
    if not ids:
        return torch.zeros((0, 9, 3, 224, 224), dtype=torch.float32, device=volume.device)
    out = [
        planes(crop(volume, seed, pid=pid, nodule_id=nid)) for seed, nid in zip(seeds_lps, ids, strict=True)
    ]
    return torch.stack(out)
