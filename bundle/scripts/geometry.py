"""World coordinates: the ONE place where LPS (files, APIs, DICOM) meets RAS (MONAI affines).

Conventions used throughout the project:

- Seeds and every coordinate in a file or an API are world **LPS** millimetres (the DICOM patient
  coordinate system: +x towards the patient's left, +y posterior, +z superior).
- MONAI readers return a :class:`~monai.data.MetaTensor` whose ``affine`` maps voxel indices
  ``(i, j, k, 1)`` to world **RAS** millimetres (``affine_lps_to_ras=True``, the readers' default).
  RAS and LPS differ by the sign of the first two axes.

All functions accept numpy arrays or torch tensors of shape ``(..., 3)`` and return the same kind
(computations with a given affine are done in float64 for accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float] | Sequence[Sequence[float]]

#: Diagonal that flips LPS <-> RAS (the map is its own inverse).
_FLIP = np.array([-1.0, -1.0, 1.0])


def _as_points(points: ArrayLike) -> tuple[np.ndarray, torch.Tensor | None]:
    """Return ``points`` as a float64 numpy array of shape (..., 3) and the torch template, if any."""
    template = points if isinstance(points, torch.Tensor) else None
    array = points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    array = array.astype(np.float64, copy=False)
    if array.shape[-1:] != (3,):
        raise ValueError(f"expected points of shape (..., 3), got {tuple(array.shape)}")
    return array, template


def _like(array: np.ndarray, template: torch.Tensor | None) -> np.ndarray | torch.Tensor:
    if template is None:
        return array
    dtype = template.dtype if template.is_floating_point() else torch.float64
    return torch.as_tensor(array, dtype=dtype, device=template.device)


def _as_affine(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    matrix = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    matrix = matrix.astype(np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {matrix.shape}")
    return matrix


def lps_to_ras(points: ArrayLike) -> np.ndarray | torch.Tensor:
    """Convert world points from LPS to RAS millimetres.

    Args:
        points: array or tensor of shape (..., 3) in LPS mm.

    Returns:
        The same points in RAS mm (same type as the input; lists give numpy).
    """
    array, template = _as_points(points)
    return _like(array * _FLIP, template)


def ras_to_lps(points: ArrayLike) -> np.ndarray | torch.Tensor:
    """Convert world points from RAS to LPS millimetres (inverse of :func:`lps_to_ras`).

    Args:
        points: array or tensor of shape (..., 3) in RAS mm.

    Returns:
        The same points in LPS mm.
    """
    array, template = _as_points(points)
    return _like(array * _FLIP, template)


def lps_to_voxel_matrix(affine_ras: np.ndarray | torch.Tensor) -> np.ndarray:
    """The 4x4 float64 matrix mapping homogeneous world LPS mm to continuous voxel indices.

    Args:
        affine_ras: 4x4 voxel-to-RAS affine (``MetaTensor.affine``).

    Returns:
        ``inv(affine_ras) @ diag(-1, -1, 1, 1)``.
    """
    return np.linalg.inv(_as_affine(affine_ras)) @ np.diag([*_FLIP, 1.0])


def world_lps_to_voxel(
    affine_ras: np.ndarray | torch.Tensor, points_lps: ArrayLike
) -> np.ndarray | torch.Tensor:
    """Map world LPS points (mm) to continuous voxel indices ``(i, j, k)`` of an image.

    Args:
        affine_ras: 4x4 voxel-to-RAS affine of the image (``MetaTensor.affine``).
        points_lps: points of shape (..., 3) in world LPS mm.

    Returns:
        Continuous (float64) voxel indices of shape (..., 3); integers are voxel centres.
    """
    array, template = _as_points(points_lps)
    matrix = lps_to_voxel_matrix(affine_ras)
    return _like(array @ matrix[:3, :3].T + matrix[:3, 3], template)


def seed_inside_scan(
    affine_ras: np.ndarray | torch.Tensor, shape: Sequence[int], seed_lps: ArrayLike
) -> bool:
    """Whether a world LPS seed lies inside an image: within half a voxel of its voxel-centre grid.

    The one rule for "inside the scan", used by the ROI crop, cohort validation and the deploy app.

    Args:
        affine_ras: 4x4 voxel-to-RAS affine of the image.
        shape: spatial shape ``(X, Y, Z)``.
        seed_lps: one point (3,) in world LPS mm.
    """
    index = np.asarray(world_lps_to_voxel(affine_ras, np.asarray(seed_lps, dtype=np.float64)))
    return bool(np.all(index >= -0.5) and np.all(index <= np.asarray(shape, dtype=np.float64) - 0.5))


def voxel_to_world_lps(affine_ras: np.ndarray | torch.Tensor, voxels: ArrayLike) -> np.ndarray | torch.Tensor:
    """Map continuous voxel indices ``(i, j, k)`` to world LPS millimetres.

    Args:
        affine_ras: 4x4 voxel-to-RAS affine of the image (``MetaTensor.affine``).
        voxels: indices of shape (..., 3).

    Returns:
        World LPS points (mm) of shape (..., 3).
    """
    array, template = _as_points(voxels)
    matrix = _as_affine(affine_ras)
    ras = array @ matrix[:3, :3].T + matrix[:3, 3]
    return _like(ras * _FLIP, template)


def volume_extent_lps(
    affine_ras: np.ndarray | torch.Tensor, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The world LPS bounding box of the voxel centres of an image (for messages and checks).

    Args:
        affine_ras: 4x4 voxel-to-RAS affine.
        shape: spatial shape ``(X, Y, Z)`` (a leading channel dimension is not allowed).

    Returns:
        ``(min_xyz, max_xyz)``: two float64 arrays of shape (3,) in LPS mm.
    """
    if len(shape) != 3:
        raise ValueError(f"expected a spatial shape of length 3, got {tuple(shape)}")
    last = np.asarray(shape, dtype=np.float64) - 1.0
    corners = np.array([[a, b, c] for a in (0.0, last[0]) for b in (0.0, last[1]) for c in (0.0, last[2])])
    world = np.asarray(voxel_to_world_lps(affine_ras, corners))
    return world.min(axis=0), world.max(axis=0)


def format_extent_lps(affine_ras: np.ndarray | torch.Tensor, shape: Sequence[int]) -> str:
    """``"(x0..x1, y0..y1, z0..z1)"`` in LPS mm with one decimal, for user messages."""
    low, high = volume_extent_lps(affine_ras, shape)
    return "(" + ", ".join(f"{lo:.1f}..{hi:.1f}" for lo, hi in zip(low, high, strict=True)) + ")"
