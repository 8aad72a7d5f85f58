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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi

from training.dicom_ct import CTGeometry

SOLID = "Solid"
PART_SOLID = "Part-solid"
GROUND_GLASS = "Pure ground glass"
CONSISTENCIES = (SOLID, PART_SOLID, GROUND_GLASS)

#: Calcification patterns (LIDC calcification ratings 1..6 map onto them, see LIDC_CALCIFICATION).
CALCIFICATION_PATTERNS = ("none", "popcorn", "laminated", "solid", "eccentric", "central")
#: LIDC calcification rating -> pattern (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central,
#: 6 absent).
LIDC_CALCIFICATION = {1: "popcorn", 2: "laminated", 3: "solid", 4: "eccentric", 5: "central", 6: "none"}

HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class NoduleLook:
    """How a nodule's voxels are filled.

    Attributes:
        consistency: ``Solid``, ``Part-solid`` or ``Pure ground glass`` (the vocabulary's spellings).
        calcification: one of :data:`CALCIFICATION_PATTERNS`.
        poorly_marginated: soften the edge (extra 1.0..1.5 mm blur of the nodule alone).
        cyst_like_spaces: carve 1..3 small air spaces (-950 HU) inside.
    """

    consistency: str = SOLID
    calcification: str = "none"
    poorly_marginated: bool = False
    cyst_like_spaces: bool = False

    def __post_init__(self) -> None:
        if self.consistency not in CONSISTENCIES:
            raise ValueError(f"consistency must be one of {CONSISTENCIES}, got '{self.consistency}'")
        if self.calcification not in CALCIFICATION_PATTERNS:
            raise ValueError(
                f"calcification must be one of {CALCIFICATION_PATTERNS}, got '{self.calcification}'"
            )


@dataclass(frozen=True)
class PlacedNodule:
    """A nodule mask at its place in a volume.

    Attributes:
        mask: bool array ``(slices, rows, columns)``: the nodule's voxels in a local box.
        corner: volume index of ``mask[0, 0, 0]``.
        look: how to fill it.
    """

    mask: np.ndarray
    corner: tuple[int, int, int]
    look: NoduleLook = field(default_factory=NoduleLook)

    def voxel_indices(self) -> np.ndarray:
        """Volume indices ``(N, 3)`` of the mask's voxels, in (slice, row, column) order."""
        return np.argwhere(self.mask) + np.asarray(self.corner)

    def centroid_index(self) -> np.ndarray:
        """Mean volume index of the mask's voxels (slice, row, column)."""
        return self.voxel_indices().mean(axis=0)

    def centroid_lps(self, geometry: CTGeometry) -> np.ndarray:
        """World LPS mm of the mask's centroid: the nodule's seed."""
        return geometry.index_to_lps(self.centroid_index())

    def clipped(self, shape: Sequence[int]) -> PlacedNodule:
        """The part of the nodule inside a volume of ``shape`` (the mask cropped to it)."""
        start = np.asarray(self.corner)
        low = np.maximum(start, 0)
        high = np.minimum(start + np.asarray(self.mask.shape), np.asarray(shape))
        if np.any(high <= low):
            raise ValueError("the nodule lies outside the volume")
        box = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(low, high, start, strict=True))
        mask = self.mask[box]
        if not mask.any():
            raise ValueError("the nodule lies outside the volume")
        return PlacedNodule(mask=mask, corner=tuple(int(v) for v in low), look=self.look)

    def volume_mm3(self, geometry: CTGeometry) -> float:
        """Mask volume in mm^3."""
        return float(self.mask.sum() * np.prod(geometry.spacing_krc))


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


def _random_unit(rng: np.random.Generator, size: int | None = None) -> np.ndarray:
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
        direction = _random_unit(rng)
        length = float(rng.uniform(0.5, 1.0)) * float(np.linalg.norm(extent_mm))
        trunk = _centreline(start - direction * length / 2, direction, length, rng, step)
        radii = np.linspace(radius_mm, max(0.5, 0.4 * radius_mm), len(trunk))
        points, all_radii = [trunk], [radii]
        if rng.uniform() < 0.6:
            at = int(rng.uniform(0.3, 0.7) * len(trunk))
            axis = np.cross(direction, _random_unit(rng))
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


# --------------------------------------------------------------------------------------------------
# parametric nodule masks
# --------------------------------------------------------------------------------------------------

SHAPES = ("round", "ovoid", "irregular")
MARGINS = ("smooth", "lobulated", "spiculated")


@dataclass(frozen=True)
class ParametricNodule:
    """A nodule described by parameters instead of reader contours.

    Attributes:
        diameter_mm: diameter of the base body (lobes and spicules extend it).
        shape: ``round``, ``ovoid`` or ``irregular``.
        margin: ``smooth``, ``lobulated`` or ``spiculated``.
        consistency: ``Solid``, ``Part-solid`` or ``Pure ground glass``.
        calcification: ``none``, ``central`` or ``eccentric`` (or any LIDC pattern).
        pleural_attachment: place the nodule touching the pleura.
        poorly_marginated: soften the edge.
        asymmetric: add one lobe even to a smooth nodule, so the centroid differs from the centre
            of the bounding box (meaningful geometry tests).
    """

    diameter_mm: float = 10.0
    shape: str = "round"
    margin: str = "smooth"
    consistency: str = SOLID
    calcification: str = "none"
    pleural_attachment: bool = False
    poorly_marginated: bool = False
    asymmetric: bool = True

    def __post_init__(self) -> None:
        if not 2.0 <= self.diameter_mm <= 60.0:
            raise ValueError(f"diameter_mm must be within 2..60 mm, got {self.diameter_mm}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got '{self.shape}'")
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got '{self.margin}'")
        NoduleLook(self.consistency, self.calcification)  # validates both

    @property
    def look(self) -> NoduleLook:
        return NoduleLook(self.consistency, self.calcification, self.poorly_marginated)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def parametric_mask(
    nodule: ParametricNodule, spacing_krc: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Bool mask ``(slices, rows, columns)`` of a parametric nodule, cropped to its voxels (+1 pad).

    The body is an ellipsoid (round: nearly a sphere; ovoid: axes 1.25/0.85/0.8; irregular: plus
    low-order angular undulations), randomly rotated; lobes are balls on its surface (2..4 when
    lobulated, one when ``asymmetric``); spicules are tapering spikes reaching 0.6..1.2 radii out.
    """
    spacing = np.asarray(spacing_krc, dtype=np.float64)
    radius = nodule.diameter_mm / 2.0
    reach = radius * (2.3 if nodule.margin == "spiculated" else 1.6) + 2.0 * spacing.max()
    half = np.ceil(reach / spacing).astype(int)
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    distance = np.linalg.norm(points, axis=-1)
    unit = points / np.maximum(distance, 1e-6)[..., None]

    if nodule.shape == "round":
        scale = 1.0 + rng.uniform(-0.04, 0.04, 3)
    elif nodule.shape == "ovoid":
        scale = np.array([1.25, 0.85, 0.8]) * (1.0 + rng.uniform(-0.05, 0.05, 3))
    else:
        scale = np.array([1.15, 0.9, 0.85])
    rotation = _random_rotation(rng).astype(np.float32)
    body_coords = points @ rotation / (radius * scale).astype(np.float32)
    level = np.linalg.norm(body_coords, axis=-1)
    boundary = np.ones_like(level)
    if nodule.shape == "irregular":
        for _ in range(4):
            wave = _random_unit(rng).astype(np.float32)
            boundary += np.float32(rng.uniform(0.08, 0.15)) * np.cos(
                np.float32(rng.uniform(2.0, 3.5)) * (unit @ wave) * np.pi
                + np.float32(rng.uniform(0, 2 * np.pi))
            )
    mask = level <= boundary

    lobes = int(rng.integers(2, 5)) if nodule.margin == "lobulated" else int(nodule.asymmetric)
    for _ in range(lobes):
        direction = _random_unit(rng)
        lobe_radius = radius * rng.uniform(0.4, 0.6)
        centre = direction * radius * rng.uniform(0.7, 0.9)
        mask |= np.linalg.norm(points - centre.astype(np.float32), axis=-1) <= lobe_radius

    if nodule.margin == "spiculated":
        for direction in _random_unit(rng, int(rng.integers(6, 13))).astype(np.float32):
            along = points @ direction
            across = np.sqrt(np.maximum(distance**2 - along**2, 0.0))
            start, end = 0.5 * radius, radius * (1.0 + rng.uniform(0.6, 1.2))
            width = rng.uniform(0.8, 1.4) * (1.0 - (along - start) / (end - start)) + 0.35
            mask |= (along >= start) & (along <= end) & (across <= width)

    if not mask.any():
        mask[tuple(h for h in half)] = True
    # keep the component holding the body (spicules are attached; this drops stray voxels)
    labels, _ = ndi.label(mask)
    mask = labels == labels[tuple(half)] if labels[tuple(half)] else mask
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    return np.pad(mask[box], 1)


# --------------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------------


def axial_diameters(mask: np.ndarray, pixel_spacing: tuple[float, float]) -> tuple[float, float]:
    """Longest axial diameter and the perpendicular short diameter (mm), edge to edge.

    The longest distance between voxel centres of one slice's outline (over all slices), plus one
    pixel; the short diameter is the extent of that slice perpendicular to it, plus one pixel.
    """
    best = (-1.0, 0.0)
    spacing = np.asarray(pixel_spacing, dtype=np.float64)
    for plane in mask:
        if not plane.any():
            continue
        outline = plane & ~ndi.binary_erosion(plane)
        points = np.argwhere(outline) * spacing
        if len(points) == 1:
            longest, short = 0.0, 0.0
        else:
            differences = points[:, None, :] - points[None, :, :]
            lengths = np.sqrt(np.sum(differences**2, axis=-1))
            a, b = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
            longest = float(lengths[a, b])
            axis = (points[b] - points[a]) / max(longest, 1e-9)
            normal = np.array([-axis[1], axis[0]])
            projection = (np.argwhere(plane) * spacing) @ normal
            short = float(projection.max() - projection.min())
        if longest > best[0]:
            best = (longest, short)
    pixel = float(spacing.mean())
    return best[0] + pixel, best[1] + pixel
