"""Write the speed benchmark's study and checkpoints, reproducible from one seed, for both programs.

The job of issue 15's comparison: a 512 x 512 x 300 chest-like CT (0.7 x 0.7 x 1.0 mm), 5 nodule
seeds, and 5 random LoRA folds of ViT-B/32 that share one frozen backbone (as cross-validation
leaves them). Written once for our app and once for the authors' scripts, from the same numbers:

- ``ct.nii.gz`` (NIfTI, RAS affine) and ``dicom/`` (the same volume as an int16 DICOM series, with
  ``dicom/seeds.csv``: ``x,y,z,label`` in world LPS mm, which the deploy app reads);
- ``seeds.csv``: the seeds with their voxel indices too (``i,j,k`` of the NIfTI), for the
  authors' crop script;
- ``authors_checkpoints/``: ``args.txt`` and ``fold_<k>/best_both.pt`` in the authors' layout
  (:mod:`training.reference_layout`; about 0.6 GB per fold);
- ``bundle/``: those checkpoints imported with ``training.import_reference``: what
  ``python -m deploy_app -i DIR/dicom -o OUT -m DIR/bundle`` runs.

Usage::

    .venv/bin/python bench/make_benchmark_study.py --out /tmp/lnsc_benchmark [--seed 0] [--folds 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import benchlib  # noqa: F401  (puts the repository on sys.path)

BENCH_GEOMETRY = {"shape": (300, 512, 512), "pixel_spacing": (0.7, 0.7), "slice_spacing": 1.0}
#: Seed offsets from the volume centre (slice, row, column voxels): inside the scan, apart.
SEED_OFFSETS = ((0, 0, 0), (-60, -80, -80), (60, 80, 80), (-90, 100, -100), (90, -100, 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} already exists; choose a new --out")

    import numpy as np

    from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series, write_nifti
    from training.import_reference import import_reference
    from training.reference_layout import random_reference_state, write_checkpoint_dir

    out: Path = args.out
    geometry = CTGeometry(**BENCH_GEOMETRY, origin_lps=(-179.0, -179.0, -400.0))
    rng = np.random.default_rng(args.seed)
    volume = rng.normal(-850, 60, size=geometry.shape).astype(np.float32)
    centre = np.array(geometry.shape) / 2
    indices = [centre + np.array(offset) for offset in SEED_OFFSETS]
    spacing = np.array([1.0, 0.7, 0.7])  # slice, row, column mm
    for index in indices:  # a solid 8 mm sphere at each seed, so the crops hold something
        low = np.floor(index - 5 / spacing).astype(int)
        box = tuple(slice(a, a + n) for a, n in zip(low, np.ceil(10 / spacing).astype(int) + 1, strict=True))
        grid = np.stack(np.meshgrid(*(np.arange(b.start, b.stop) for b in box), indexing="ij"), axis=-1)
        inside = np.linalg.norm((grid - index) * spacing, axis=-1) <= 4.0
        volume[box][inside] = 40.0
    write_nifti(volume, geometry, out / "ct.nii.gz")
    write_ct_series(
        volume, geometry, out / "dicom", patient=SyntheticPatient("BENCH"), uid_seed=f"bench-{args.seed}"
    )
    del volume
    positions = [geometry.index_to_lps(index) for index in indices]
    rows = "".join(f"{x:.3f},{y:.3f},{z:.3f},Nodule {n + 1}\n" for n, (x, y, z) in enumerate(positions))
    (out / "dicom" / "seeds.csv").write_text("x,y,z,label\n" + rows)
    voxel_rows = "".join(
        f"Nodule {n + 1},{x:.3f},{y:.3f},{z:.3f},{int(i[2])},{int(i[1])},{int(i[0])}\n"
        for n, ((x, y, z), i) in enumerate(zip(positions, indices, strict=True))
    )
    (out / "seeds.csv").write_text("label,x_lps,y_lps,z_lps,i,j,k\n" + voxel_rows)

    states = [
        random_reference_state("lora", args.seed + 1 + fold, backbone_seed=args.seed)
        for fold in range(args.folds)
    ]
    write_checkpoint_dir(out / "authors_checkpoints", "lora", states)
    del states
    import_reference(out / "authors_checkpoints", out / "bundle")
    print(f"benchmark study written to {out}")


if __name__ == "__main__":
    main()
