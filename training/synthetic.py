"""Small parametric CT phantoms with nodules, written as NIfTI plus a cohort CSV and a split.

For tests, the untrained demo and smoke runs of the bundle workflows; nothing here is realistic
enough to train a useful model (the LIDC-contour phantoms of ``python -m training.phantoms`` are for
that). Rendering goes through :mod:`training.phantom_render`, the project's one phantom renderer:
malignant nodules are spiculated and irregular, benign ones smooth and round; several nodules share
one volume. Seeds are the centroids of the rendered nodule masks. Deterministic per seed; patient
ids are synthetic.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.dicom_ct import CTGeometry, write_nifti
from training.phantom_nodules import ParametricNodule, PlacedNodule, parametric_mask
from training.phantom_render import SceneSettings, render_scene

SPACING_MM = (0.8, 0.8, 1.5)
SHAPE = (96, 96, 48)
#: Default LPS position of voxel (0, 0, 0).
ORIGIN_LPS = (-40.0, -60.0, -200.0)


@dataclass(frozen=True)
class SyntheticNodule:
    """One nodule of a phantom: where, how large, and what it looks like.

    Args:
        voxel: centre in voxel indices (i, j, k) of the phantom (the NIfTI order).
        radius_mm: radius of the solid part.
        malignant: the label.
    """

    voxel: tuple[float, float, float]
    radius_mm: float
    malignant: bool

    @property
    def semantics(self) -> dict[str, str]:
        if self.malignant:
            return {
                "nodule_margin_conspicuity": "Poorly marginated",
                "nodule_margins": "Spiculated/Serrated",
                "nodule_shape": "Complex/Irregular",
                "nodule_consistency": "Solid",
                "pleural_attachment": "Absent",
            }
        return {
            "nodule_margin_conspicuity": "Well marginated",
            "nodule_margins": "Smooth",
            "nodule_shape": "Round",
            "nodule_consistency": "Solid",
            "pleural_attachment": "Absent",
        }

    def parametric(self) -> ParametricNodule:
        """The renderer's description of this nodule."""
        if self.malignant:
            return ParametricNodule(
                diameter_mm=2 * self.radius_mm, shape="irregular", margin="spiculated", poorly_marginated=True
            )
        return ParametricNodule(
            diameter_mm=2 * self.radius_mm, shape="round", margin="smooth", asymmetric=False
        )


def phantom_geometry(
    shape: Sequence[int] = SHAPE,
    spacing: Sequence[float] = SPACING_MM,
    origin_lps: Sequence[float] = ORIGIN_LPS,
) -> CTGeometry:
    """The :class:`CTGeometry` of a phantom given in NIfTI order: shape and spacing (i, j, k)."""
    return CTGeometry(
        shape=(int(shape[2]), int(shape[1]), int(shape[0])),
        pixel_spacing=(float(spacing[1]), float(spacing[0])),
        slice_spacing=float(spacing[2]),
        origin_lps=tuple(float(v) for v in origin_lps),
    )


def place_nodules(
    nodules: Sequence[SyntheticNodule], geometry: CTGeometry, rng: np.random.Generator
) -> list[PlacedNodule]:
    """Each nodule's mask with its centroid at ``voxel``, cropped to the volume."""
    spacing = geometry.spacing_krc
    placed = []
    for nodule in nodules:
        spec = nodule.parametric()
        mask = parametric_mask(spec, spacing, rng)
        centre_krc = np.asarray(nodule.voxel, dtype=np.float64)[::-1]
        corner = np.rint(centre_krc - np.argwhere(mask).mean(axis=0)).astype(int)
        placed.append(PlacedNodule(mask, tuple(int(c) for c in corner), spec.look).clipped(geometry.shape))
    return placed


def render_phantom_with_seeds(
    nodules: Sequence[SyntheticNodule],
    rng: np.random.Generator,
    shape: Sequence[int] = SHAPE,
    spacing: Sequence[float] = SPACING_MM,
    origin_lps: Sequence[float] = ORIGIN_LPS,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`render_phantom` plus each nodule's seed: the world LPS centroid of its rendered mask."""
    geometry = phantom_geometry(shape, spacing, origin_lps)
    placed = place_nodules(nodules, geometry, rng)
    scene = render_scene(geometry, placed, rng, settings=SceneSettings())
    return scene.volume.transpose(2, 1, 0).copy(), [p.centroid_lps(geometry) for p in placed]


def render_phantom(
    nodules: list[SyntheticNodule], rng: np.random.Generator, shape=SHAPE, spacing=SPACING_MM
) -> np.ndarray:
    """int16 HU volume in NIfTI order (i, j, k): textured lung and vessels with the nodules."""
    return render_phantom_with_seeds(nodules, rng, shape, spacing)[0]


def write_synthetic_cohort(
    out_dir: str | Path, n_patients: int = 8, nodules_per_patient: int = 2, seed: int = 0
) -> Path:
    """Write ``images/*.nii.gz``, ``cohort.csv`` and ``splits/fold_0/{train,val}_pid.csv``.

    Patients alternate between malignant and benign nodules, so every split has both classes.

    Returns:
        the path of the cohort CSV.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    geometry = phantom_geometry()
    rows = []
    for p in range(n_patients):
        pid = f"SYN{p:04d}"
        nodules = [
            SyntheticNodule(
                voxel=tuple(float(v) for v in rng.uniform([20, 20, 12], np.subtract(SHAPE, [20, 20, 12]))),
                radius_mm=float(rng.uniform(6, 10) if (p + n) % 2 == 0 else rng.uniform(3, 5)),
                malignant=(p + n) % 2 == 0,
            )
            for n in range(nodules_per_patient)
        ]
        volume, seeds = render_phantom_with_seeds(nodules, rng)
        write_nifti(volume.transpose(2, 1, 0), geometry, out_dir / "images" / f"{pid}.nii.gz")
        for n, (nodule, seed_lps) in enumerate(zip(nodules, seeds, strict=True)):
            x, y, z = (float(v) for v in seed_lps)
            rows.append(
                {
                    "pid": pid,
                    "nodule_id": n,
                    "image_path": f"images/{pid}.nii.gz",
                    "coordX": round(x, 3),
                    "coordY": round(y, 3),
                    "coordZ": round(z, 3),
                    "malignant": int(nodule.malignant),
                    "mean_diameter": round(2 * nodule.radius_mm, 1),
                    **nodule.semantics,
                }
            )
    csv_path = out_dir / "cohort.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pids = [f"SYN{p:04d}" for p in range(n_patients)]
    n_val = max(2, n_patients // 4)
    fold = out_dir / "splits" / "fold_0"
    fold.mkdir(parents=True, exist_ok=True)
    for name, subset in (("train_pid.csv", pids[n_val:]), ("val_pid.csv", pids[:n_val])):
        (fold / name).write_text("pid\n" + "\n".join(subset) + "\n")
    return csv_path
