"""One CT phantom from its job: its voxel grid and placement, its pleura, the scene and its cohort row.

The placement rules (field of view around the nodule with a random off-centre offset, or the
full-size grid of the LIDC scan; the pleura at a drawn clearance) are those stated in
:mod:`training.phantoms`; nothing here writes files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scripts.vocabulary import FEATURES, SIZE_COLUMNS
from training.dicom_ct import CTGeometry
from training.phantom_anatomy import Pleura, place_pleura, pleural_clearance_mm
from training.phantom_jobs import (
    ABSENT,
    DEFAULT_SETTINGS,
    PRESENT,
    FullSizePlacement,
    PhantomJob,
    PhantomSettings,
    format_number,
    phantom_generator,
)
from training.phantom_nodules import PART_SOLID, PlacedNodule, axial_diameters, parametric_mask
from training.phantom_render import RenderedScene, render_scene

FULL_SIZE_IN_PLANE = 512


#: Provenance columns after the bundle's cohort columns.
PROVENANCE_COLUMNS = (
    "phantom_id",
    "phantom_seed",
    "source",
    "lidc_pid",
    "lidc_nodule_id",
    "scan_id",
    "lidc_series_instance_uid",
    "annotation_ids",
    "reader_count",
    "lidc_malignancy",
    "lidc_calcification",
    "lidc_texture",
    "lidc_mean_diameter",
    "label_policy",
    "pixel_spacing",
    "slice_thickness",
    "slice_spacing",
    "mask_volume_mm3",
    "pleural_clearance_mm",
    "calcification_pattern",
    "dicom_path",
    "study_instance_uid",
    "series_instance_uid",
)
COHORT_COLUMNS: tuple[str, ...] = (
    "pid",
    "nodule_id",
    "image_path",
    "coordX",
    "coordY",
    "coordZ",
    "malignant",
    *SIZE_COLUMNS,
    *(feature.column for feature in FEATURES),
    *PROVENANCE_COLUMNS,
)


@dataclass(frozen=True)
class RenderedPhantom:
    """A rendered phantom before it is written.

    Attributes:
        job: what was rendered.
        geometry: the voxel grid.
        nodule: the nodule mask as placed.
        scene: the volume and what was drawn.
        seed_lps: world LPS centroid of the placed mask.
        pleura: the pleural surface, or ``None``.
        clearance_mm: gap between nodule and pleura (negative: reaches into the wall), or ``None``.
    """

    job: PhantomJob
    geometry: CTGeometry
    nodule: PlacedNodule
    scene: RenderedScene
    seed_lps: np.ndarray
    pleura: Pleura | None
    clearance_mm: float | None


def _world_origin(geometry_shape: Sequence[int], spacing_krc: np.ndarray, rng: np.random.Generator) -> tuple:
    """A plausible LPS origin: the volume centre somewhere in the right or left lung."""
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    centre_xyz = np.array(
        [side * rng.uniform(50.0, 110.0), rng.uniform(-40.0, 60.0), rng.uniform(-250.0, -80.0)]
    )
    half_xyz = ((np.asarray(geometry_shape) - 1) * spacing_krc / 2.0)[::-1]
    return tuple(float(v) for v in np.round(centre_xyz - half_xyz, 3))


def _offset_mm(rng: np.random.Generator, settings: PhantomSettings) -> np.ndarray:
    for _ in range(100):
        offset = rng.uniform(-settings.max_offset_mm, settings.max_offset_mm, 3)
        if np.linalg.norm(offset) >= settings.min_offset_mm:
            return offset
    return np.full(3, settings.min_offset_mm)


def place_in_fov(
    mask: np.ndarray, spacing_krc: np.ndarray, settings: PhantomSettings, rng: np.random.Generator
) -> tuple[CTGeometry, tuple[int, int, int]]:
    """A field-of-view grid around the mask and the mask's corner in it (centroid off-centre)."""
    margin = 3
    sizes = np.rint(settings.fov_mm / spacing_krc).astype(int)
    sizes = np.maximum(sizes, np.asarray(mask.shape) + 2 * margin + 2)
    local_centroid = np.argwhere(mask).mean(axis=0)
    target = (sizes - 1) / 2.0 + _offset_mm(rng, settings) / spacing_krc
    corner = np.rint(target - local_centroid).astype(int)
    corner = np.clip(corner, margin, sizes - np.asarray(mask.shape) - margin)
    origin = _world_origin(sizes, spacing_krc, rng)
    geometry = CTGeometry(
        shape=tuple(int(n) for n in sizes),
        pixel_spacing=(float(spacing_krc[1]), float(spacing_krc[2])),
        slice_spacing=float(spacing_krc[0]),
        origin_lps=origin,
    )
    return geometry, tuple(int(c) for c in corner)


def place_full_size(
    mask: np.ndarray, spacing_krc: np.ndarray, placement: FullSizePlacement, rng: np.random.Generator
) -> tuple[CTGeometry, tuple[int, int, int]]:
    """A 512 x 512 grid with the scan's slice count; LIDC masks keep their place in the scan."""
    shape = np.array([placement.scan_slices, FULL_SIZE_IN_PLANE, FULL_SIZE_IN_PLANE])
    shape[0] = max(shape[0], mask.shape[0] + 2)
    if min(placement.corner) < 0:  # parametric: somewhere in the central part
        low = np.maximum((0.25 * shape).astype(int), 1)
        high = np.maximum(low + 1, (0.75 * shape).astype(int) - np.asarray(mask.shape))
        corner = np.array([rng.integers(a, b) for a, b in zip(low, high, strict=True)])
    else:
        corner = np.asarray(placement.corner)
    corner = np.clip(corner, 0, shape - np.asarray(mask.shape))
    origin = (
        -spacing_krc[2] * FULL_SIZE_IN_PLANE / 2.0,
        -spacing_krc[1] * FULL_SIZE_IN_PLANE / 2.0,
        placement.first_slice_z,
    )
    geometry = CTGeometry(
        shape=tuple(int(n) for n in shape),
        pixel_spacing=(float(spacing_krc[1]), float(spacing_krc[2])),
        slice_spacing=float(spacing_krc[0]),
        origin_lps=tuple(float(round(v, 4)) for v in origin),
    )
    return geometry, tuple(int(c) for c in corner)


def _pleura_for(
    nodule: PlacedNodule,
    spacing_krc: np.ndarray,
    attached: bool,
    settings: PhantomSettings,
    rng: np.random.Generator,
) -> Pleura:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    direction = np.array([rng.uniform(-0.2, 0.2), math.sin(angle), math.cos(angle)])
    direction /= np.linalg.norm(direction)
    bounds = settings.attach_overlap_mm if attached else settings.clearance_mm
    clearance = -rng.uniform(*bounds) if attached else rng.uniform(*bounds)
    radius = rng.uniform(*settings.pleura_radius_mm)
    return place_pleura(nodule.voxel_indices() * spacing_krc, clearance, radius, direction)


def render_job(job: PhantomJob, settings: PhantomSettings = DEFAULT_SETTINGS) -> RenderedPhantom:
    """Render one phantom (no files).

    Args:
        job: the phantom.
        settings: placement and rendering settings.

    Returns:
        the volume, its grid, the placed nodule and its world LPS centroid.
    """
    if job.pleural_attachment and not settings.chest_wall:
        raise ValueError("a nodule attached to the pleura needs the chest wall")
    place_rng, render_rng = phantom_generator(job.phantom_seed, 1), phantom_generator(job.phantom_seed, 2)
    spacing = np.array([job.slice_spacing, job.pixel_spacing, job.pixel_spacing], dtype=np.float64)
    if job.mask is not None:
        mask = job.mask
    elif job.parametric is not None:
        mask = parametric_mask(job.parametric, spacing, place_rng)
    else:
        raise ValueError("a phantom job needs a mask or a parametric nodule")
    if not mask.any():
        raise ValueError("the nodule mask is empty")
    if job.full_size is not None:
        geometry, corner = place_full_size(mask, spacing, job.full_size, place_rng)
    else:
        geometry, corner = place_in_fov(mask, spacing, settings, place_rng)
    nodule = PlacedNodule(mask=mask, corner=corner, look=job.look)
    pleura = clearance = None
    if settings.chest_wall:
        pleura = _pleura_for(nodule, spacing, job.pleural_attachment, settings, place_rng)
        clearance = pleural_clearance_mm(nodule.voxel_indices() * spacing, pleura)
    scene = render_scene(geometry, [nodule], render_rng, pleura=pleura, settings=settings.scene)
    return RenderedPhantom(job, geometry, nodule, scene, nodule.centroid_lps(geometry), pleura, clearance)


def phantom_row(rendered: RenderedPhantom) -> dict[str, str]:
    """The cohort CSV row of a rendered phantom (paths and UIDs are filled in by the writer)."""
    job = rendered.job
    spacing = (job.pixel_spacing, job.pixel_spacing)
    longest, short = axial_diameters(rendered.nodule.mask, spacing)
    solid_diameter = ""
    fill = rendered.scene.fills[0]
    if job.look.consistency == PART_SOLID and fill.solid_core is not None and fill.solid_core.any():
        solid_diameter = format_number(axial_diameters(fill.solid_core, spacing)[0], 2)
    semantics = dict(job.semantics)
    semantics.update(
        {
            "nodule_consistency": job.look.consistency,
            "pleural_attachment": PRESENT if job.pleural_attachment else ABSENT,
            "eccentric_calcification": PRESENT if job.look.calcification == "eccentric" else ABSENT,
            "cyst-like_spaces": PRESENT if fill.cysts.any() else ABSENT,
        }
    )
    x, y, z = (float(v) for v in rendered.seed_lps)
    row = {column: "" for column in COHORT_COLUMNS}
    row.update(
        {
            "pid": job.pid,
            "nodule_id": job.nodule_id,
            "coordX": format_number(x),
            "coordY": format_number(y),
            "coordZ": format_number(z),
            "malignant": "" if job.malignant is None else str(int(job.malignant)),
            "longest_axial_diameter_(mm)": format_number(longest, 2),
            "short_diameter_(mm)": format_number(short, 2),
            "mean_diameter": format_number((longest + short) / 2.0, 2),
            "psn_longest_diameter_solid_component": solid_diameter,
            **{column: value or "" for column, value in semantics.items()},
            **job.provenance,
            "phantom_id": job.phantom_id,
            "phantom_seed": str(job.phantom_seed),
            "pixel_spacing": format_number(job.pixel_spacing, 6),
            "slice_thickness": format_number(job.slice_thickness, 6),
            "slice_spacing": format_number(job.slice_spacing, 6),
            "mask_volume_mm3": format_number(rendered.nodule.volume_mm3(rendered.geometry), 2),
            "pleural_clearance_mm": format_number(rendered.clearance_mm, 2),
            "calcification_pattern": job.look.calcification,
        }
    )
    return row
