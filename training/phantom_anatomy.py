"""The anatomy of a CT phantom: lung parenchyma texture, vessel trees and the chest wall.

Pure array work (numpy and scipy) in the conventions of :mod:`training.phantom_render`: arrays
indexed ``(slice, row, column)``, points in frame millimetres (z, y, x) = index * spacing. The
renderer calls these in order; nodules and noise are not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

HU_AIR = -1000.0


@dataclass(frozen=True)
class Pleura:
    """A spherical pleural surface: lung inside, chest wall outside.

    Attributes:
        centre_mm: sphere centre in frame millimetres (z, y, x) = index * spacing.
        radius_mm: sphere radius.
    """

    centre_mm: tuple[float, float, float]
    radius_mm: float

    def depth_mm(self, points_mm: np.ndarray) -> np.ndarray:
        """Signed distance of frame-mm points ``(..., 3)`` outside the surface (< 0 in the lung)."""
        return np.linalg.norm(np.asarray(points_mm) - np.asarray(self.centre_mm), axis=-1) - self.radius_mm


# --------------------------------------------------------------------------------------------------
# parenchyma
# --------------------------------------------------------------------------------------------------

_TEXTURE_GRID_MM = 2.5


def lung_texture(shape: Sequence[int], spacing_krc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance correlated texture (float32, ``shape``): two smoothed scales of coarse noise.

    The noise lives on a 2.5 mm grid (tens of times fewer voxels than the volume), is smoothed there
    and upsampled trilinearly (separably, so the full-size work is a few passes over the volume).
    """
    extent = np.asarray(shape) * spacing_krc
    coarse_shape = tuple(int(max(4, math.ceil(e / _TEXTURE_GRID_MM) + 1)) for e in extent)
    white = rng.standard_normal(coarse_shape, dtype=np.float32)
    fine = ndi.gaussian_filter(white, 0.7, mode="wrap")
    broad = ndi.gaussian_filter(white, 2.0, mode="wrap")
    field = 0.6 * fine / max(float(fine.std()), 1e-6) + 0.8 * broad / max(float(broad.std()), 1e-6)
    field /= max(float(field.std()), 1e-6)
    for axis in (2, 1, 0):  # separable linear interpolation, smallest arrays first
        field = _upsample_axis(field, int(shape[axis]), axis)
    return field


def _upsample_axis(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``array`` to ``size`` samples along ``axis`` (end points aligned)."""
    count = array.shape[axis]
    position = np.linspace(0.0, count - 1, size)
    low = np.minimum(position.astype(np.int64), count - 2)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = size
    weight = (position - low).astype(np.float32).reshape(weight_shape)
    result = np.take(array, low, axis=axis)
    step = np.take(array, low + 1, axis=axis)
    step -= result
    step *= weight
    result += step
    return result


# --------------------------------------------------------------------------------------------------
# vessels
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obstacle:
    """A region vessels keep away from: a sphere in frame millimetres."""

    centre_mm: np.ndarray
    radius_mm: float


def random_unit(rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """A random unit vector ``(3,)``, or ``size`` of them ``(size, 3)``, uniform on the sphere.

    Args:
        rng: The phantom's generator.
        size: How many vectors, or ``None`` for one.
    """
    vector = rng.standard_normal((3,) if size is None else (size, 3))
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


def _centreline(
    start: np.ndarray, direction: np.ndarray, length_mm: float, rng: np.random.Generator, step_mm: float
) -> np.ndarray:
    """Points of a smoothly curving line: the direction drifts by integrated (smoothed) noise."""
    n = max(2, int(length_mm / step_mm))
    drift = np.cumsum(rng.standard_normal((n, 3)) * 0.06, axis=0)
    drift = ndi.gaussian_filter1d(drift, 4.0, axis=0, mode="nearest")
    directions = direction + drift
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return start + np.cumsum(directions * step_mm, axis=0)


def vessel_tree_points(
    extent_mm: np.ndarray, rng: np.random.Generator, radius_mm: float, obstacles: Sequence[Obstacle]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Centreline points (frame mm) and radii of one vessel with an optional branch.

    Returns ``None`` when a few attempts all passed too close to an obstacle.
    """
    step = 0.8
    for _ in range(12):
        start = rng.uniform(0.0, 1.0, 3) * extent_mm
        direction = random_unit(rng)
        length = float(rng.uniform(0.5, 1.0)) * float(np.linalg.norm(extent_mm))
        trunk = _centreline(start - direction * length / 2, direction, length, rng, step)
        radii = np.linspace(radius_mm, max(0.5, 0.4 * radius_mm), len(trunk))
        points, all_radii = [trunk], [radii]
        if rng.uniform() < 0.6:
            at = int(rng.uniform(0.3, 0.7) * len(trunk))
            axis = np.cross(direction, random_unit(rng))
            axis /= max(np.linalg.norm(axis), 1e-9)
            angle = math.radians(rng.uniform(25.0, 50.0))
            branch_direction = direction * math.cos(angle) + axis * math.sin(angle)
            branch = _centreline(trunk[at], branch_direction, (len(trunk) - at) * step * 0.6, rng, step)
            points.append(branch)
            all_radii.append(np.linspace(0.7 * radii[at], max(0.5, 0.3 * radius_mm), len(branch)))
        centreline, radius = np.concatenate(points), np.concatenate(all_radii)
        inside = np.all((centreline > -5.0) & (centreline < extent_mm + 5.0), axis=1)
        centreline, radius = centreline[inside], radius[inside]
        if len(centreline) < 2:
            continue
        clear = all(
            np.all(np.linalg.norm(centreline - o.centre_mm, axis=1) - radius >= o.radius_mm)
            for o in obstacles
        )
        if clear:
            return centreline, radius
    return None


def _ball_offsets(radius_mm: float, spacing_krc: np.ndarray) -> np.ndarray:
    """Integer (k, r, c) offsets of the voxels whose centres lie within ``radius_mm`` of the origin."""
    half = np.ceil(radius_mm / spacing_krc).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    inside = np.sum((offsets * spacing_krc) ** 2, axis=1) <= radius_mm**2
    offsets = offsets[inside]
    return offsets if len(offsets) else np.zeros((1, 3), dtype=int)


def stamp_tubes(
    shape: Sequence[int], spacing_krc: np.ndarray, points_mm: np.ndarray, radii_mm: np.ndarray
) -> np.ndarray:
    """Flat indices of the voxels within ``radius`` of any centreline point (a union of balls)."""
    bins = np.round(radii_mm / 0.25) * 0.25
    centres = np.rint(points_mm / spacing_krc).astype(np.int64)
    flat: list[np.ndarray] = []
    shape_arr = np.asarray(shape)
    for radius in np.unique(bins):
        offsets = _ball_offsets(float(radius), spacing_krc)
        index = (centres[bins == radius][:, None, :] + offsets[None, :, :]).reshape(-1, 3)
        index = index[np.all((index >= 0) & (index < shape_arr), axis=1)]
        flat.append(np.ravel_multi_index(tuple(index.T), tuple(shape)))
    return np.unique(np.concatenate(flat)) if flat else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# chest wall
# --------------------------------------------------------------------------------------------------


def _axis_mm(n: int, spacing: float) -> np.ndarray:
    return np.arange(n, dtype=np.float32) * np.float32(spacing)


def pleural_depth(shape: Sequence[int], spacing_krc: np.ndarray, pleura: Pleura) -> np.ndarray | None:
    """Signed depth (mm, float32) of every voxel outside the pleura, or ``None`` if all are inside."""
    centre = np.asarray(pleura.centre_mm, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * (
        (np.asarray(shape) - 1) * spacing_krc
    )
    if np.linalg.norm(corners - centre, axis=1).max() < pleura.radius_mm:
        return None
    dz, dy, dx = (_axis_mm(n, s) - np.float32(c) for n, s, c in zip(shape, spacing_krc, centre, strict=True))
    plane = dy[:, None] ** 2 + dx[None, :] ** 2
    squared = plane[None, :, :] + (dz**2)[:, None, None]
    return np.sqrt(squared, out=squared) - np.float32(pleura.radius_mm)


_PROFILE_STEP_MM = 0.05


def chest_wall_profile(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """HU by depth outside the pleura (one value per 0.05 mm): muscle, fat, outer muscle/skin, air.

    Returns:
        the profile and the rib parameters drawn with it.
    """
    muscle_hu, fat_hu, skin_hu = rng.uniform(30, 60), rng.uniform(-120, -80), rng.uniform(20, 50)
    muscle_end = rng.uniform(15.0, 30.0)
    fat_end = muscle_end + rng.uniform(10.0, 30.0)
    body_end = fat_end + rng.uniform(2.0, 4.0)
    depth = np.arange(int((body_end + 1.0) / _PROFILE_STEP_MM) + 1) * _PROFILE_STEP_MM
    profile = np.select(
        [depth < muscle_end, depth < fat_end, depth < body_end], [muscle_hu, fat_hu, skin_hu], HU_AIR
    ).astype(np.float32)
    half_depth = rng.uniform(3.5, 5.0)
    ribs = {
        "period": rng.uniform(20.0, 28.0),
        "half_height": rng.uniform(4.0, 6.0),
        "half_depth": half_depth,
        "depth": rng.uniform(1.5, 3.0) + half_depth,
        "phase": rng.uniform(0.0, 28.0),
        # ribs run obliquely to the axial plane: a steeper slope gives shorter arcs per slice
        "slope": rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9),
        "azimuth": rng.uniform(0.0, 2.0 * np.pi),
        "cortex_hu": rng.uniform(550.0, 900.0),
        "marrow_hu": rng.uniform(150.0, 300.0),
    }
    return profile, ribs


def paint_chest_wall(
    volume: np.ndarray, depth: np.ndarray, spacing_krc: np.ndarray, rng: np.random.Generator
) -> None:
    """Overwrite the voxels outside the pleura (``depth >= 0``) with the chest wall, in place.

    Layers come from a depth profile (one table look-up per voxel); ribs are elliptical
    cross-sections repeating along z (slightly oblique) inside the muscle layer, evaluated only in
    their thin shell of depths.
    """
    profile, rib = chest_wall_profile(rng)
    index = depth * np.float32(1.0 / _PROFILE_STEP_MM)
    np.clip(index, 0, len(profile) - 1, out=index)
    wall = profile[index.astype(np.int32)]
    np.copyto(volume, wall, where=depth >= 0)
    del wall, index
    shell = np.flatnonzero(np.abs(depth.reshape(-1) - np.float32(rib["depth"])) <= rib["half_depth"])
    k, r, c = np.unravel_index(shell, depth.shape)
    tangential = math.sin(rib["azimuth"]) * r * spacing_krc[1] + math.cos(rib["azimuth"]) * c * spacing_krc[2]
    along = np.mod(k * spacing_krc[0] + rib["slope"] * tangential - rib["phase"], rib["period"])
    along -= rib["period"] / 2
    radial = (depth.reshape(-1)[shell] - rib["depth"]) / rib["half_depth"]
    ellipse = (along / rib["half_height"]) ** 2 + radial**2
    cortex_inner = (1.0 - 1.5 / rib["half_depth"]) ** 2
    flat = volume.reshape(-1)
    flat[shell[ellipse <= 1.0]] = rib["cortex_hu"]
    flat[shell[ellipse <= cortex_inner]] = rib["marrow_hu"]


def place_pleura(
    nodule_points_mm: np.ndarray, clearance_mm: float, radius_mm: float, direction: np.ndarray
) -> Pleura:
    """A pleural sphere beyond the nodule along ``direction`` at an exact clearance.

    The farthest nodule voxel ends ``clearance_mm`` inside the surface (a negative clearance makes
    the nodule reach into the wall: attached).

    Args:
        nodule_points_mm: frame-mm centres of the nodule's voxels ``(N, 3)``.
        clearance_mm: wanted gap between the nodule and the surface (negative: overlap).
        radius_mm: sphere radius.
        direction: unit vector from the nodule towards the chest wall.

    Returns:
        the pleura.
    """
    centroid = nodule_points_mm.mean(axis=0)
    target = radius_mm - clearance_mm
    distance = target  # centre = centroid - direction * distance; solve max |p - centre| = target
    for _ in range(30):
        reach = np.linalg.norm(nodule_points_mm - (centroid - direction * distance), axis=1).max()
        error = target - reach
        distance += error
        if abs(error) < 1e-6:
            break
    centre = centroid - direction * distance
    return Pleura(centre_mm=tuple(float(v) for v in centre), radius_mm=float(radius_mm))


def pleural_clearance_mm(nodule_points_mm: np.ndarray, pleura: Pleura) -> float:
    """Smallest gap between the nodule's voxel centres and the surface (negative: inside the wall)."""
    return float(-pleura.depth_mm(nodule_points_mm).max())
