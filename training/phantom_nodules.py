"""The nodules of a CT phantom as masks: how they look, where they sit, parametric shapes, sizes.

A nodule is a boolean mask ``(slice, row, column)`` at a corner of the volume with a
:class:`NoduleLook` (consistency, calcification, margin, cysts); reader-consensus masks come from
:mod:`training.phantom_lidc`, parametric ones from :func:`parametric_mask`. Filling a mask with HU
values happens in :mod:`training.phantom_render`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi

from training.dicom_ct import CTGeometry
from training.phantom_anatomy import random_unit

SOLID = "Solid"
PART_SOLID = "Part-solid"
GROUND_GLASS = "Pure ground glass"
CONSISTENCIES = (SOLID, PART_SOLID, GROUND_GLASS)

#: Calcification patterns (LIDC calcification ratings 1..6 map onto them, see LIDC_CALCIFICATION).
CALCIFICATION_PATTERNS = ("none", "popcorn", "laminated", "solid", "eccentric", "central")
#: LIDC calcification rating -> pattern (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central,
#: 6 absent).
LIDC_CALCIFICATION = {1: "popcorn", 2: "laminated", 3: "solid", 4: "eccentric", 5: "central", 6: "none"}


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
            wave = random_unit(rng).astype(np.float32)
            boundary += np.float32(rng.uniform(0.08, 0.15)) * np.cos(
                np.float32(rng.uniform(2.0, 3.5)) * (unit @ wave) * np.pi
                + np.float32(rng.uniform(0, 2 * np.pi))
            )
    mask = level <= boundary

    lobes = int(rng.integers(2, 5)) if nodule.margin == "lobulated" else int(nodule.asymmetric)
    for _ in range(lobes):
        direction = random_unit(rng)
        lobe_radius = radius * rng.uniform(0.4, 0.6)
        centre = direction * radius * rng.uniform(0.7, 0.9)
        mask |= np.linalg.norm(points - centre.astype(np.float32), axis=-1) <= lobe_radius

    if nodule.margin == "spiculated":
        for direction in random_unit(rng, int(rng.integers(6, 13))).astype(np.float32):
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
