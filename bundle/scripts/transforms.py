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

Training augmentation (the paper's values are the defaults); the order ``configs/train.json`` uses,
so that the deterministic crop can be cached::

    LoadCTd -> SeedROICropd -> RandROIShiftd (+-5 voxels = mm, the crop jitter, exact)
      -> RandROIRotated (+-10 deg about the seed, one resample, air padding)
      -> RandROIFlipd (each ROI axis independently, p=0.5)
      -> NinePlanesd -> RandPlaneGaussianNoised (std 0.02) -> RandPlaneGammad (gamma 0.8..1.2)
      -> CLIPNormalized

(:class:`RandSeedJitter` jitters the seed before the crop instead, for pipelines that do not cache.)

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
    RandAdjustContrast,
    RandAdjustContrastd,
    RandGaussianNoise,
    RandGaussianNoised,
    RandomizableTransform,
    Transform,
)

from scripts.errors import UserInputError
from scripts.geometry import format_extent_lps, lps_to_voxel_matrix, seed_inside_scan

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
    "RandPlaneGammad",
    "RandPlaneGamma",
    "RandPlaneGaussianNoise",
    "RandPlaneGaussianNoised",
    "RandROIFlip",
    "RandROIFlipd",
    "RandROIRotate",
    "RandROIRotated",
    "RandROIShift",
    "RandROIShiftd",
    "RandSeedJitter",
    "RandSeedJitterd",
    "SeedROICrop",
    "SeedROICropd",
    "nine_planes_for_seeds",
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


# --------------------------------------------------------------------------------------------------
# sampling helpers (shared by the crop, the rotation augmentation and the planes)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _homogeneous_index_grid(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """All integer indices of an array of ``shape`` as float32 ``(prod(shape), len(shape) + 1)``."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    ones = torch.ones_like(mesh[0])
    return torch.stack([*mesh, ones], dim=-1).reshape(-1, len(shape) + 1)


def _normalising_matrix(block_shape: Sequence[int]) -> np.ndarray:
    """4x4 map from array indices (d, h, w) of ``block_shape`` to grid_sample coordinates (x, y, z).

    ``grid_sample(..., align_corners=True)`` reads index ``(n - 1) * (g + 1) / 2`` for a normalised
    coordinate ``g``; its last grid dimension is ordered (w, h, d).
    """
    matrix = np.zeros((4, 4))
    for out_row, axis in enumerate((2, 1, 0)):
        matrix[out_row, axis] = 2.0 / (block_shape[axis] - 1)
        matrix[out_row, 3] = -1.0
    matrix[3, 3] = 1.0
    return matrix


#: Off-axis terms of an index map that move a sample by less than this (in voxels, over the whole
#: output) are treated as zero, so the separable path serves "almost axis-aligned" scans too.
_AXIS_ALIGNED_TOLERANCE = 1e-3


def _axis_permutation(index_map: np.ndarray, out_shape: Sequence[int]) -> list[int] | None:
    """For an axis-aligned map, the output axis read by each input axis; else None."""
    linear = np.abs(index_map[:3, :3]) * (np.asarray(out_shape, dtype=np.float64) - 1.0)[None, :]
    out_axes = [int(np.argmax(row)) for row in linear]
    if sorted(out_axes) != [0, 1, 2]:
        return None
    off_axis = linear.copy()
    off_axis[range(3), out_axes] = 0.0
    return out_axes if off_axis.sum(axis=1).max() < _AXIS_ALIGNED_TOLERANCE else None


def _sample_separable(
    block: torch.Tensor,
    out_shape: Sequence[int],
    index_map: np.ndarray,
    out_axes: list[int],
    pad_value: float,
) -> torch.Tensor:
    """Trilinear sampling of an axis-aligned grid as three 1-D linear interpolations.

    Identical to ``grid_sample(block - pad, ..., padding_mode="zeros", align_corners=True) + pad``:
    a neighbour outside the block has weight 0, and as trilinear weights are products of 1-D
    weights, the total weight inside the block is the product of the per-axis sums, so the pad
    term is ``pad * (1 - s0 s1 s2)`` (skipped when the cube lies inside the scan). ``block`` may be
    a strided view of any dtype: the first pass reads only the planes it needs.
    """
    # Work in the block's memory order (a CT volume is usually a transposed view of its slices):
    # each index_select then copies contiguous rows instead of gathering strided ones.
    memory_order = sorted(range(3), key=lambda axis: -block.stride(axis))
    if memory_order != [0, 1, 2]:
        block = block.permute(memory_order)
        index_map = index_map[[*memory_order, 3]]
        out_axes = [out_axes[axis] for axis in memory_order]
    out = block
    inside: list[np.ndarray] = [np.ones(1)] * 3  # per output axis: weight inside the block
    # passes that shrink the array most go first
    order = sorted(range(3), key=lambda a: out_shape[out_axes[a]] / block.shape[a])
    for in_axis in order:
        out_axis = out_axes[in_axis]
        n = block.shape[in_axis]
        coords = index_map[in_axis, out_axis] * np.arange(out_shape[out_axis]) + index_map[in_axis, 3]
        low = np.floor(coords).astype(np.int64)
        upper = coords - low
        lower = 1.0 - upper
        valid_low, valid_high = (low >= 0) & (low < n), (low + 1 >= 0) & (low + 1 < n)
        view = [1, 1, 1]
        view[in_axis] = -1
        device = block.device
        first = out.index_select(in_axis, torch.as_tensor(np.clip(low, 0, n - 1), device=device))
        second = out.index_select(in_axis, torch.as_tensor(np.clip(low + 1, 0, n - 1), device=device))
        first, second = first.to(torch.float32), second.to(torch.float32)
        if valid_low.all() and valid_high.all():
            out = torch.lerp(
                first, second, torch.as_tensor(upper, dtype=torch.float32, device=device).view(view)
            )
        else:
            lower, upper = np.where(valid_low, lower, 0.0), np.where(valid_high, upper, 0.0)
            w_low = torch.as_tensor(lower, dtype=torch.float32, device=device).view(view)
            w_high = torch.as_tensor(upper, dtype=torch.float32, device=device).view(view)
            out = first * w_low + second * w_high
            inside[out_axis] = lower + upper
    # input axis a now holds output axis out_axes[a]: put the output axes in order
    out = out.permute([out_axes.index(axis) for axis in range(3)]).contiguous()
    if pad_value != 0 and any(np.any(w < 1.0) for w in inside):
        total = inside[0][:, None, None] * inside[1][None, :, None] * inside[2][None, None, :]
        out += pad_value * (1.0 - torch.as_tensor(total, dtype=torch.float32, device=out.device))
    return out


def _sample_linear(
    block: torch.Tensor, out_shape: tuple[int, int, int], index_map: np.ndarray, pad_value: float
) -> torch.Tensor:
    """Trilinear samples of ``block`` (D, H, W) on a grid that is a linear image of an index grid.

    Axis-aligned maps (every CT without obliquity, any flips or axis order) take an exact separable
    path (three 1-D interpolations, faster on CPU: ``bench/bench_preprocessing.py`` times both);
    others use ``grid_sample``. Both equal ``grid_sample(block - pad_value, zeros padding,
    align_corners=True) + pad_value``.

    Args:
        block: tensor (D, H, W) of any real dtype (may be a view), each dimension >= 2.
        out_shape: output shape (d, h, w).
        index_map: 4x4 (float64) map from homogeneous output indices to block indices.
        pad_value: value outside the block.

    Returns:
        float32 tensor ``out_shape`` on the block's device.
    """
    out_axes = _axis_permutation(index_map, out_shape)
    if out_axes is not None:
        return _sample_separable(block, out_shape, index_map, out_axes, pad_value)
    shifted = block.to(torch.float32) - pad_value
    return _sample_grid(shifted, out_shape, index_map) + pad_value


def _sample_grid(block: torch.Tensor, out_shape: tuple[int, int, int], index_map: np.ndarray) -> torch.Tensor:
    """``grid_sample`` (trilinear, zeros outside) of ``block`` at ``index_map`` applied to an index grid."""
    to_grid = _normalising_matrix(block.shape) @ index_map
    theta = torch.as_tensor(to_grid[:3].T, dtype=torch.float32, device=block.device)
    grid = (_homogeneous_index_grid(tuple(out_shape), str(block.device)) @ theta).reshape(1, *out_shape, 3)
    return F.grid_sample(block[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[
        0, 0
    ]


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


def _plain(image: torch.Tensor) -> torch.Tensor:
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


def _parse_seed(seed: Any, who: str) -> np.ndarray:
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
        seed_lps = _parse_seed(seed, _who(pid, nodule_id, filename))
        if affine is None:
            if not isinstance(img, MetaTensor):
                raise ValueError("SeedROICrop needs a MetaTensor or an explicit affine")
            affine = img.affine
        volume = _plain(img)
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
        roi = _sample_linear(block, size, shift @ index_map, self.pad_value)
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
    grid = homogeneous @ _normalising_matrix(high - low + 1)[:3].T
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
        roi = _plain(roi)
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
        planes = _plain(planes).to(torch.float32)
        if planes.ndim not in (3, 4):
            raise ValueError(
                f"CLIPNormalize expects planes (N, H, W) or (B, N, H, W), got {tuple(planes.shape)}"
            )
        mean, std = self.mean.to(planes.device), self.std.to(planes.device)
        return (planes.unsqueeze(-3) - mean) / std

    def inverse(self, normalised: torch.Tensor) -> torch.Tensor:
        """(..., N, 3, H, W) CLIP-normalised -> (..., N, H, W) in [0, 1] (first channel)."""
        normalised = _plain(normalised).to(torch.float32)
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
# training augmentation
# --------------------------------------------------------------------------------------------------


class _RandDictTwin(RandomizableTransform, MapTransform):
    """Dictionary twin that draws once with its array transform and applies it to every key."""

    def __init__(self, keys: KeysCollection, transform: Any, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.transform = transform

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> _RandDictTwin:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.transform.randomize()
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandSeedJitter(RandomizableTransform):
    """Shift a world seed by a uniform random offset in [-max_shift, +max_shift] mm per axis.

    Applied before :class:`SeedROICrop`, this is the paper's in-plane crop jitter (+-5 px at 1 mm).

    Args:
        max_shift: largest shift per axis in mm (5.0).
        prob: probability of shifting.
    """

    def __init__(self, max_shift: float = 5.0, prob: float = 1.0) -> None:
        super().__init__(prob)
        self.max_shift = float(max_shift)
        self._shift = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._shift = (
            self.R.uniform(-self.max_shift, self.max_shift, size=3) if self._do_transform else np.zeros(3)
        )

    def __call__(self, seed: Any, randomize: bool = True) -> np.ndarray:  # type: ignore[override]
        """Jitter ``seed`` (3,) mm; returns a float64 numpy array."""
        if randomize:
            self.randomize()
        return _parse_seed(seed, "seed jitter") + self._shift


class RandSeedJitterd(_RandDictTwin):
    """Dictionary twin of :class:`RandSeedJitter` (same shift for every key).

    Args:
        keys: keys of the seeds.
        max_shift: largest shift per axis in mm.
        prob: probability of shifting.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "seed",
        max_shift: float = 5.0,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandSeedJitter(max_shift=max_shift, prob=prob), allow_missing_keys)


class RandROIFlip(RandomizableTransform):
    """Flip each spatial axis of a (C, D, H, W) ROI independently with probability ``prob``.

    Unlike :class:`monai.transforms.RandFlip` (one draw for all listed axes), every axis gets its
    own draw, as in the paper ("flips on all axes, p=0.5").

    Args:
        prob: probability per axis.
    """

    def __init__(self, prob: float = 0.5) -> None:
        super().__init__(prob=1.0)
        self.axis_prob = float(prob)
        self._flips: tuple[int, ...] = ()

    def randomize(self, data: Any = None) -> None:
        draws = self.R.random_sample(3)
        self._flips = tuple(axis + 1 for axis in range(3) if draws[axis] < self.axis_prob)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:  # type: ignore[override]
        """Flip ``img`` (C, D, H, W) along the drawn axes."""
        if randomize:
            self.randomize()
        img = _plain(img)
        return torch.flip(img, self._flips) if self._flips else img


class RandROIFlipd(_RandDictTwin):
    """Dictionary twin of :class:`RandROIFlip` (same flips for every key).

    Args:
        keys: keys of the ROIs.
        prob: probability per axis.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self, keys: KeysCollection = "image", prob: float = 0.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, RandROIFlip(prob=prob), allow_missing_keys)


def _rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation about array axes 0, 1, 2 (in this order of composition), 3x3 float64."""
    rotation = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        a, b = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[a, a] = step[b, b] = math.cos(angle)
        step[a, b], step[b, a] = -math.sin(angle), math.sin(angle)
        rotation = step @ rotation
    return rotation


class RandROIRotate(RandomizableTransform):
    """Rotate a (C, D, H, W) ROI about its centre index (the seed) by random angles, one resample.

    Angles about each of the three axes are uniform in [-max_angle, +max_angle] degrees; sampling is
    trilinear with ``pad_value`` (air) where the rotated cube leaves the ROI.

    Args:
        max_angle: largest angle per axis in degrees (10).
        prob: probability of rotating.
        pad_value: value outside the ROI (HU).
    """

    def __init__(self, max_angle: float = 10.0, prob: float = 0.5, pad_value: float = -1000.0) -> None:
        super().__init__(prob)
        self.max_angle = float(max_angle)
        self.pad_value = float(pad_value)
        self._angles = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        angles = self.R.uniform(-self.max_angle, self.max_angle, size=3)
        self._angles = np.deg2rad(angles) if self._do_transform else np.zeros(3)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:  # type: ignore[override]
        """Rotate ``img`` (C, D, H, W) with the drawn angles (unchanged when not drawn)."""
        if randomize:
            self.randomize()
        img = _plain(img)
        if not np.any(self._angles):
            return img
        shape = tuple(int(n) for n in img.shape[1:])
        centre = np.asarray(shape, dtype=np.float64) // 2
        index_map = np.eye(4)
        rotation = _rotation_matrix(self._angles)
        index_map[:3, :3] = rotation
        index_map[:3, 3] = centre - rotation @ centre
        channels = [_sample_linear(channel, shape, index_map, self.pad_value) for channel in img]
        return torch.stack(channels)


class RandROIRotated(_RandDictTwin):
    """Dictionary twin of :class:`RandROIRotate` (same rotation for every key).

    Args:
        keys: keys of the ROIs.
        max_angle: largest angle per axis in degrees.
        prob: probability of rotating.
        pad_value: value outside the ROI (HU).
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        max_angle: float = 10.0,
        prob: float = 0.5,
        pad_value: float = -1000.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, RandROIRotate(max_angle=max_angle, prob=prob, pad_value=pad_value), allow_missing_keys
        )


class RandROIShift(RandomizableTransform):
    """Shift a (C, D, H, W) ROI by whole voxels, uniform in [-max_shift, +max_shift] per axis.

    The crop jitter of the paper (+-5 px at 1 mm) applied to an already cropped ROI, so the crop can
    be cached: integer shifts are exact (no resampling); the uncovered border gets ``pad_value``.
    The planes then pass up to ``max_shift`` mm from the seed, as in the authors' jittered crops.

    Args:
        max_shift: largest shift per axis in voxels (= mm for the 1 mm ROI).
        prob: probability of shifting.
        pad_value: value of the uncovered border (HU).
    """

    def __init__(self, max_shift: int = 5, prob: float = 1.0, pad_value: float = -1000.0) -> None:
        super().__init__(prob)
        self.max_shift = int(max_shift)
        self.pad_value = float(pad_value)
        self._shift = (0, 0, 0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        draw = self.R.randint(-self.max_shift, self.max_shift + 1, size=3)
        self._shift = tuple(int(v) for v in draw) if self._do_transform else (0, 0, 0)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:  # type: ignore[override]
        """Shift ``img`` (C, D, H, W) by the drawn voxels: output[i] = input[i - shift]."""
        if randomize:
            self.randomize()
        img = _plain(img)
        if not any(self._shift):
            return img
        shifted = torch.full_like(img, self.pad_value)
        target, source = [slice(None)], [slice(None)]
        for shift, size in zip(self._shift, img.shape[1:], strict=True):
            target.append(slice(max(shift, 0), size + min(shift, 0)))
            source.append(slice(max(-shift, 0), size - max(shift, 0)))
        shifted[tuple(target)] = img[tuple(source)]
        return shifted


class RandROIShiftd(_RandDictTwin):
    """Dictionary twin of :class:`RandROIShift` (same shift for every key).

    Args:
        keys: keys of the ROIs.
        max_shift: largest shift per axis in voxels.
        prob: probability of shifting.
        pad_value: value of the uncovered border (HU).
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        max_shift: int = 5,
        prob: float = 1.0,
        pad_value: float = -1000.0,
        allow_missing_keys: bool = False,
    ) -> None:
        shift = RandROIShift(max_shift=max_shift, prob=prob, pad_value=pad_value)
        super().__init__(keys, shift, allow_missing_keys)


class RandPlaneGaussianNoise(RandGaussianNoise):
    """:class:`monai.transforms.RandGaussianNoise` with the paper's default: std 0.02 (fixed).

    Args:
        prob: probability of adding noise.
        std: noise standard deviation on the [0, 1] scale.
    """

    def __init__(self, prob: float = 0.5, std: float = 0.02) -> None:
        super().__init__(prob=prob, mean=0.0, std=std, sample_std=False)


class RandPlaneGaussianNoised(RandGaussianNoised):
    """:class:`monai.transforms.RandGaussianNoised` with the paper's default: std 0.02 (fixed).

    Args:
        keys: keys of the planes.
        prob: probability of adding noise.
        std: noise standard deviation on the [0, 1] scale.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        std: float = 0.02,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, prob=prob, mean=0.0, std=std, sample_std=False, allow_missing_keys=allow_missing_keys
        )


class RandPlaneGamma(RandAdjustContrast):
    """:class:`monai.transforms.RandAdjustContrast` with the paper's default gamma range 0.8 .. 1.2.

    Args:
        prob: probability of adjusting.
        gamma: (low, high) range of the gamma exponent.
    """

    def __init__(self, prob: float = 0.5, gamma: tuple[float, float] = (0.8, 1.2)) -> None:
        super().__init__(prob=prob, gamma=gamma)


class RandPlaneGammad(RandAdjustContrastd):
    """:class:`monai.transforms.RandAdjustContrastd` with the paper's default gamma range 0.8 .. 1.2.

    Args:
        keys: keys of the planes.
        prob: probability of adjusting.
        gamma: (low, high) range of the gamma exponent.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        gamma: tuple[float, float] = (0.8, 1.2),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, gamma=gamma, allow_missing_keys=allow_missing_keys)


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
