"""Small parametric CT phantoms with nodules, written as NIfTI plus a cohort CSV and a split.

For tests, the untrained demo and smoke runs of the bundle workflows; nothing here is realistic
enough to train a useful model (the LIDC-contour phantoms are for that). Deterministic per seed;
patient ids are synthetic.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from training.bundle_path import use_bundle

use_bundle()
from scripts.geometry import voxel_to_world_lps  # noqa: E402

SPACING_MM = (0.8, 0.8, 1.5)
SHAPE = (96, 96, 48)


@dataclass(frozen=True)
class SyntheticNodule:
    """One nodule of a phantom: where, how large, and what it looks like.

    Args:
        voxel: centre in voxel indices (i, j, k) of the phantom.
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


def phantom_affine(
    spacing: tuple[float, float, float] = SPACING_MM, origin_lps=(-40.0, -60.0, -200.0)
) -> np.ndarray:
    """RAS affine of an axial scan (i -> patient left, j -> posterior, k -> superior), as CT loads."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return affine


def render_phantom(
    nodules: list[SyntheticNodule], rng: np.random.Generator, shape=SHAPE, spacing=SPACING_MM
) -> np.ndarray:
    """int16 HU volume: textured lung parenchyma with the nodules (spiculated when malignant)."""
    volume = rng.normal(-850.0, 25.0, size=shape)
    grid = np.stack(
        np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"), -1
    )
    for nodule in nodules:
        centre = np.asarray(nodule.voxel) * spacing
        offset = grid - centre
        distance = np.linalg.norm(offset, axis=-1)
        radius = nodule.radius_mm
        if nodule.malignant:
            # spicules: the boundary radius varies with direction
            azimuth = np.arctan2(offset[..., 1], offset[..., 0])
            elevation = np.arctan2(offset[..., 2], np.linalg.norm(offset[..., :2], axis=-1))
            radius = radius * (1.0 + 0.35 * np.clip(np.sin(7 * azimuth) * np.cos(5 * elevation), 0, None))
        volume = np.where(distance <= radius, rng.normal(30.0, 20.0, size=shape), volume)
    return np.clip(volume, -1024, 3000).astype(np.int16)


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
    affine = phantom_affine()
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
        image_path = out_dir / "images" / f"{pid}.nii.gz"
        nib.save(nib.Nifti1Image(render_phantom(nodules, rng), affine), image_path)
        for n, nodule in enumerate(nodules):
            x, y, z = voxel_to_world_lps(affine, np.asarray(nodule.voxel))
            rows.append(
                {
                    "pid": pid,
                    "nodule_id": n,
                    "image_path": f"images/{pid}.nii.gz",
                    "coordX": round(float(x), 3),
                    "coordY": round(float(y), 3),
                    "coordZ": round(float(z), 3),
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
