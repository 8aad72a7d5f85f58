"""Resampling of a voxel block onto an output grid, shared by the crop, the rotation and the planes.

Each caller gives an affine ``index_map`` from output indices to input indices (4x4, homogeneous).
:func:`sample_linear` reads the block trilinearly there: an axis-aligned map (the usual crop of an
axial scan) is done axis by axis, which is exact and cheaper; any other map goes through
``torch.nn.functional.grid_sample``. Samples outside the block take ``pad_value``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AXIS_ALIGNED_TOLERANCE", "axis_permutation", "normalising_matrix", "sample_grid", "sample_linear"]


@functools.lru_cache(maxsize=8)
def homogeneous_index_grid(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """All integer indices of an array of ``shape`` as float32 ``(prod(shape), len(shape) + 1)``."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    ones = torch.ones_like(mesh[0])
    return torch.stack([*mesh, ones], dim=-1).reshape(-1, len(shape) + 1)


def normalising_matrix(block_shape: Sequence[int]) -> np.ndarray:
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
AXIS_ALIGNED_TOLERANCE = 1e-3


def axis_permutation(index_map: np.ndarray, out_shape: Sequence[int]) -> list[int] | None:
    """For an axis-aligned map, the output axis read by each input axis; else None."""
    linear = np.abs(index_map[:3, :3]) * (np.asarray(out_shape, dtype=np.float64) - 1.0)[None, :]
    out_axes = [int(np.argmax(row)) for row in linear]
    if sorted(out_axes) != [0, 1, 2]:
        return None
    off_axis = linear.copy()
    off_axis[range(3), out_axes] = 0.0
    return out_axes if off_axis.sum(axis=1).max() < AXIS_ALIGNED_TOLERANCE else None


def sample_separable(
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


def sample_linear(
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
    out_axes = axis_permutation(index_map, out_shape)
    if out_axes is not None:
        return sample_separable(block, out_shape, index_map, out_axes, pad_value)
    shifted = block.to(torch.float32) - pad_value
    return sample_grid(shifted, out_shape, index_map) + pad_value


def sample_grid(block: torch.Tensor, out_shape: tuple[int, int, int], index_map: np.ndarray) -> torch.Tensor:
    """``grid_sample`` (trilinear, zeros outside) of ``block`` at ``index_map`` applied to an index grid."""
    to_grid = normalising_matrix(block.shape) @ index_map
    theta = torch.as_tensor(to_grid[:3].T, dtype=torch.float32, device=block.device)
    grid = (homogeneous_index_grid(tuple(out_shape), str(block.device)) @ theta).reshape(1, *out_shape, 3)
    return F.grid_sample(block[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[
        0, 0
    ]
