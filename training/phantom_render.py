"""The one CT phantom renderer: lung parenchyma, vessels, chest wall and nodules given as masks.

Everything here is pure array work (numpy and scipy), without files. Arrays are indexed
``(slice, row, column)`` like :mod:`training.dicom_ct`; a point's "frame millimetres" are its
voxel indices times the voxel size ``(slice spacing, row spacing, column spacing)``, i.e. world LPS
minus the origin, in (z, y, x) order.

What a rendered volume holds (HU before blur and noise):

- lung parenchyma around -850 HU with correlated texture: white noise on a 2.5 mm grid, smoothed
  at two scales, upsampled trilinearly (cheap; the fine detail comes from the CT noise), plus a
  gentle anterior-posterior density gradient;
- vessels: tubes of +20..+60 HU along smoothly curving random centrelines (some branch), tapering,
  kept at least ``vessel_clearance_mm`` away from every nodule;
- optionally a chest wall outside a spherical pleural surface: pleura and intercostal muscle, ribs
  (cortex and marrow), fat, an outer muscle/skin layer and air beyond the body;
- the nodules: their masks filled by consistency (solid ~ +30 HU; part-solid: the mask eroded to a
  solid core inside a ground-glass rim ~ -550 HU; pure ground glass ~ -600 HU) with internal
  texture, calcification patterns (the LIDC calcification ratings), air cysts, and a softened edge
  when poorly marginated;
- a Gaussian point-spread blur (0.6..0.8 mm sigma) applied together with white noise scaled so that
  the noise after the blur has the drawn standard deviation (15..25 HU); rounded to int16.


All randomness comes from the ``numpy.random.Generator`` passed in, so a phantom is a pure function
of its seed.

This module holds the scene (settings, filling the nodules, blur and noise, :func:`render_scene`);
the anatomy is in :mod:`training.phantom_anatomy` and the nodule masks in
:mod:`training.phantom_nodules`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi

from training.dicom_ct import CTGeometry
from training.phantom_anatomy import (
    Obstacle,
    Pleura,
    lung_texture,
    paint_chest_wall,
    pleural_depth,
    stamp_tubes,
    vessel_tree_points,
)
from training.phantom_nodules import GROUND_GLASS, SOLID, PlacedNodule

HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class SceneSettings:
    """Ranges the renderer draws from (uniform), in HU and mm.

    Attributes:
        lung_hu: mean parenchyma density.
        texture_std_hu: standard deviation of the parenchyma texture.
        gradient_hu: range of the anterior-posterior density gradient across the volume.
        vessels: how many vessel trees (inclusive range).
        vessel_hu: vessel density.
        vessel_radius_mm: radius where a vessel enters the volume.
        vessel_clearance_mm: minimal gap between a vessel and a nodule's bounding sphere.
        noise_std_hu: CT noise standard deviation after the point-spread blur.
        psf_sigma_mm: Gaussian point-spread sigma.
        solid_hu, ground_glass_hu, calcification_hu: nodule densities.
        solid_fraction: volume fraction of the solid core of a part-solid nodule.
        edge_sigma_mm: extra edge blur of a poorly marginated nodule.
    """

    lung_hu: tuple[float, float] = (-870.0, -830.0)
    texture_std_hu: tuple[float, float] = (25.0, 40.0)
    gradient_hu: tuple[float, float] = (0.0, 40.0)
    vessels: tuple[int, int] = (6, 12)
    vessel_hu: tuple[float, float] = (20.0, 60.0)
    vessel_radius_mm: tuple[float, float] = (0.8, 2.5)
    vessel_clearance_mm: float = 3.0
    noise_std_hu: tuple[float, float] = (15.0, 25.0)
    psf_sigma_mm: tuple[float, float] = (0.6, 0.8)
    solid_hu: tuple[float, float] = (10.0, 50.0)
    ground_glass_hu: tuple[float, float] = (-650.0, -520.0)
    calcification_hu: tuple[float, float] = (400.0, 1000.0)
    solid_fraction: tuple[float, float] = (0.2, 0.5)
    edge_sigma_mm: tuple[float, float] = (1.0, 1.5)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


# --------------------------------------------------------------------------------------------------
# nodules
# --------------------------------------------------------------------------------------------------


def _smooth_noise(shape: Sequence[int], rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(tuple(shape), dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _balls(
    shape: Sequence[int], spacing_krc: np.ndarray, centres: np.ndarray, radii: np.ndarray
) -> np.ndarray:
    """Boolean union of balls (centres in local indices, radii in mm) on a small box."""
    grid = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1).T * spacing_krc
    inside = np.zeros(len(grid), dtype=bool)
    for centre, radius in zip(np.atleast_2d(centres), np.atleast_1d(radii), strict=True):
        inside |= np.sum((grid - centre * spacing_krc) ** 2, axis=1) <= radius**2
    return inside.reshape(tuple(shape))


def calcification_mask(
    pattern: str, mask: np.ndarray, depth: np.ndarray, spacing_krc: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Calcified voxels of a nodule for a pattern (``depth`` = distance to the edge in mm)."""
    if pattern == "none":
        return np.zeros_like(mask)
    deepest = float(depth.max())
    inner = depth > 0
    if pattern == "solid":
        return mask & (depth >= np.quantile(depth[inner], 0.2))
    if pattern == "laminated":
        relative = depth / max(deepest, 1e-6)
        return mask & (((relative >= 0.45) & (relative <= 0.6)) | (relative >= 0.8))
    points = np.argwhere(inner)
    if pattern == "central":
        centre = np.unravel_index(int(np.argmax(depth)), depth.shape)
        return mask & _balls(
            mask.shape, spacing_krc, np.asarray(centre), np.array([max(0.45 * deepest, 0.6)])
        )
    if pattern == "eccentric":
        radius = max(0.35 * deepest, 0.6)
        deep_enough = points[depth[tuple(points.T)] >= min(radius, deepest)]
        centroid = points.mean(axis=0)
        away = np.linalg.norm((deep_enough - centroid) * spacing_krc, axis=1)
        centre = deep_enough[int(np.argmax(away))]
        return mask & _balls(mask.shape, spacing_krc, centre, np.array([radius]))
    # popcorn: several small dense foci
    count = int(rng.integers(3, 7))
    centres = points[rng.choice(len(points), size=min(count, len(points)), replace=False)]
    radii = np.full(len(centres), max(0.2 * deepest, 0.6))
    return mask & _balls(mask.shape, spacing_krc, centres, radii)


def cyst_mask(
    mask: np.ndarray, depth: np.ndarray, spacing_krc: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """1..3 small air spaces well inside the nodule."""
    deepest = float(depth.max())
    radius = max(0.25 * deepest, 0.6)
    candidates = np.argwhere(depth >= min(1.5 * radius, deepest))
    count = int(rng.integers(1, 4))
    centres = candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
    return mask & _balls(mask.shape, spacing_krc, centres, np.full(len(centres), radius))


@dataclass(frozen=True)
class NoduleFill:
    """What :func:`nodule_fill` decided (for captions and tests)."""

    solid_core: np.ndarray | None
    calcified: np.ndarray
    cysts: np.ndarray


def nodule_fill(
    nodule: PlacedNodule, spacing_krc: np.ndarray, settings: SceneSettings, rng: np.random.Generator, pad: int
) -> tuple[np.ndarray, NoduleFill]:
    """HU values on the nodule's box padded by ``pad`` voxels (values outside the mask = its rim)."""
    look = nodule.look
    mask = np.pad(nodule.mask, pad)
    depth = ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing_krc)[1:-1, 1:-1, 1:-1]
    texture = _smooth_noise(mask.shape, rng)
    solid_hu = _uniform(rng, settings.solid_hu)
    glass_hu = _uniform(rng, settings.ground_glass_hu)
    solid = np.float32(solid_hu) + np.float32(15.0) * texture
    glass = np.float32(glass_hu) + np.float32(35.0) * texture
    core = None
    if look.consistency == SOLID:
        values = solid
    elif look.consistency == GROUND_GLASS:
        values = glass
    else:
        fraction = _uniform(rng, settings.solid_fraction)
        inside = depth[mask]
        core = mask & (depth >= np.quantile(inside, 1.0 - fraction))
        values = np.where(core, solid, glass)
    calcified = calcification_mask(look.calcification, mask, depth, spacing_krc, rng)
    if calcified.any():
        values = np.where(
            calcified, np.float32(_uniform(rng, settings.calcification_hu)) + 40 * texture, values
        )
    cysts = cyst_mask(mask, depth, spacing_krc, rng) if look.cyst_like_spaces else np.zeros_like(mask)
    if cysts.any():
        values = np.where(cysts, np.float32(-950.0) + 15 * texture, values)
    return values.astype(np.float32), NoduleFill(core, calcified, cysts)


def composite_nodule(
    volume: np.ndarray,
    nodule: PlacedNodule,
    spacing_krc: np.ndarray,
    settings: SceneSettings,
    rng: np.random.Generator,
) -> NoduleFill:
    """Blend one nodule into ``volume`` in place (a softened edge when poorly marginated)."""
    edge_sigma = _uniform(rng, settings.edge_sigma_mm) if nodule.look.poorly_marginated else 0.0
    pad = int(np.ceil(3.0 * edge_sigma / spacing_krc.min())) + 1 if edge_sigma else 0
    values, fill = nodule_fill(nodule, spacing_krc, settings, rng, pad)
    weight = np.pad(nodule.mask, pad).astype(np.float32)
    if edge_sigma:
        weight = ndi.gaussian_filter(weight, edge_sigma / spacing_krc)
    start = np.asarray(nodule.corner) - pad
    stop = start + np.asarray(weight.shape)
    low = np.maximum(start, 0)
    high = np.minimum(stop, volume.shape)
    if np.any(high <= low):
        raise ValueError("the nodule lies outside the volume")
    target = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    source = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(low, high, start, strict=True))
    w = weight[source]
    volume[target] = volume[target] * (1.0 - w) + values[source] * w
    return fill


# --------------------------------------------------------------------------------------------------
# the scene
# --------------------------------------------------------------------------------------------------


_TRUNCATE = 3.0
#: Below this sigma (in voxels) a Gaussian kernel is nearly the identity: that axis is not blurred.
_MIN_SIGMA_VOXELS = 0.4


def _gaussian_noise_gain(sigma_voxels: np.ndarray) -> float:
    """Standard deviation of white unit noise after the point-spread blur with these sigmas."""
    gain = 1.0
    for sigma in sigma_voxels:
        if sigma <= 0.0:
            continue
        radius = int(_TRUNCATE * float(sigma) + 0.5)
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (x / float(sigma)) ** 2)
        kernel /= kernel.sum()
        gain *= math.sqrt(float(np.sum(kernel**2)))
    return gain


@dataclass(frozen=True)
class RenderedScene:
    """A rendered volume and what was drawn for it.

    Attributes:
        volume: int16 HU ``(slices, rows, columns)``.
        fills: per nodule, its solid core / calcified / cyst voxels (local boxes).
        noise_std_hu: CT noise standard deviation after blur.
        psf_sigma_mm: point-spread sigma.
        vessels: number of vessel trees drawn.
    """

    volume: np.ndarray
    fills: tuple[NoduleFill, ...]
    noise_std_hu: float
    psf_sigma_mm: float
    vessels: int


def nodule_obstacle(nodule: PlacedNodule, spacing_krc: np.ndarray, margin_mm: float) -> Obstacle:
    """The bounding sphere of a nodule (frame mm) grown by ``margin_mm``."""
    points = nodule.voxel_indices() * spacing_krc
    centre = points.mean(axis=0)
    radius = float(np.linalg.norm(points - centre, axis=1).max()) + float(spacing_krc.max()) + margin_mm
    return Obstacle(centre, radius)


def render_scene(
    geometry: CTGeometry,
    nodules: Sequence[PlacedNodule],
    rng: np.random.Generator,
    *,
    pleura: Pleura | None = None,
    settings: SceneSettings = SceneSettings(),
) -> RenderedScene:
    """Render a CT volume holding ``nodules`` (their masks must lie inside the volume).

    Args:
        geometry: voxel grid.
        nodules: placed nodule masks; composited in order.
        rng: the phantom's random generator.
        pleura: chest wall outside this surface, or ``None`` for lung only.
        settings: the ranges drawn from.

    Returns:
        the int16 volume and what was drawn.
    """
    shape = tuple(int(n) for n in geometry.shape)
    spacing = geometry.spacing_krc.astype(np.float64)
    extent = (np.asarray(shape) - 1) * spacing
    volume = lung_texture(shape, spacing, rng)
    volume *= np.float32(_uniform(rng, settings.texture_std_hu))
    gradient = np.linspace(0.0, _uniform(rng, settings.gradient_hu), shape[1], dtype=np.float32)
    volume += (np.float32(_uniform(rng, settings.lung_hu)) + gradient)[None, :, None]

    obstacles = [nodule_obstacle(n, spacing, settings.vessel_clearance_mm) for n in nodules]
    vessel_points, vessel_radii = [], []
    count = int(rng.integers(settings.vessels[0], settings.vessels[1] + 1))
    for _ in range(count):
        tree = vessel_tree_points(extent, rng, _uniform(rng, settings.vessel_radius_mm), obstacles)
        if tree is not None:
            vessel_points.append(tree[0])
            vessel_radii.append(tree[1])
    if vessel_points:
        flat = stamp_tubes(shape, spacing, np.concatenate(vessel_points), np.concatenate(vessel_radii))
        volume.reshape(-1)[flat] = np.float32(_uniform(rng, settings.vessel_hu))

    if pleura is not None:
        depth = pleural_depth(shape, spacing, pleura)
        if depth is not None:
            paint_chest_wall(volume, depth, spacing, rng)
            del depth

    fills = tuple(composite_nodule(volume, n, spacing, settings, rng) for n in nodules)

    noise_std = _uniform(rng, settings.noise_std_hu)
    psf_sigma = _uniform(rng, settings.psf_sigma_mm)
    sigma_voxels = psf_sigma / spacing
    # thick slices: a sub-voxel blur across them is nearly the identity and not worth a pass
    sigma_voxels = np.where(sigma_voxels < _MIN_SIGMA_VOXELS, 0.0, sigma_voxels)
    pre_blur_std = noise_std / _gaussian_noise_gain(sigma_voxels)
    # uniform noise is cheaper to draw than normal noise (bench/bench_phantoms.py times both) and is
    # Gaussian after the blur (CLT)
    noise = rng.random(shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(pre_blur_std * math.sqrt(12.0))
    volume += noise
    del noise
    blurred = ndi.gaussian_filter(volume, sigma_voxels, mode="nearest", truncate=_TRUNCATE)
    np.rint(blurred, out=blurred)
    np.clip(blurred, HU_MIN, HU_MAX, out=blurred)
    return RenderedScene(
        volume=blurred.astype(np.int16),
        fills=fills,
        noise_std_hu=noise_std,
        psf_sigma_mm=psf_sigma,
        vessels=len(vessel_points),
    )
