"""Benchmark: per-nodule preprocessing time from an already loaded CT to the model input.

Times :func:`scripts.transforms.nine_planes_for_seeds` for one seed at a time (crop of the 100 mm
cube at 1 mm + nine planes + CLIP normalisation -> (9, 3, 224, 224)) on a synthetic
512 x 512 x 300 float32 volume at 0.7 x 0.7 x 1.25 mm with a CT-like affine, at random seeds; then
the same on the volume tilted 5 degrees in-plane, which takes the ``grid_sample`` path instead of the
separable one.

Usage::

    .venv/bin/python bench/bench_preprocessing.py [--nodules 20] [--threads 2] [--device cpu]
        [--omp-wait-policy PASSIVE]

On a CPU shared with other busy processes, OpenMP's default spin-waiting makes every small
multi-threaded torch op wait for a descheduled thread (10-20x slower here with 2 threads while
another process used the second core); ``--omp-wait-policy PASSIVE`` (the ``OMP_WAIT_POLICY``
environment variable, which must be set before torch starts) avoids it. The load average is printed
with the result so numbers from a busy machine can be recognised.
"""

from __future__ import annotations

import argparse
import os

import benchlib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodules", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--omp-wait-policy", choices=("ACTIVE", "PASSIVE"), default=None)
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when torch's OpenMP starts

    # imported here, after OMP_WAIT_POLICY is set; importing deploy_app puts bundle/ on sys.path
    import numpy as np
    import torch
    from monai.data import MetaTensor

    import deploy_app  # noqa: F401
    from scripts.geometry import voxel_to_world_lps
    from scripts.transforms import nine_planes_for_seeds

    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(-1024, 1500, (1, *shape), generator=generator, dtype=torch.int16).to(torch.float32)
    affine = torch.tensor(  # RAS: i -> L, j -> P, k -> S, 0.7 x 0.7 x 1.25 mm
        [[-0.7, 0.0, 0.0, 179.0], [0.0, -0.7, 0.0, 179.0], [0.0, 0.0, 1.25, -400.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    volume = MetaTensor(data.to(args.device), affine=affine)
    rng = np.random.default_rng(0)
    voxels = rng.uniform(0.15, 0.85, size=(args.nodules, 3)) * (np.asarray(shape) - 1)
    seeds = np.asarray(voxel_to_world_lps(volume.affine, voxels))
    nine_planes_for_seeds(volume, seeds[:2])  # warm-up: grids cached, kernels loaded

    def sync() -> None:
        if args.device != "cpu":
            torch.cuda.synchronize()

    # the same volume tilted 5 degrees in-plane: not axis-aligned, so sampled with grid_sample
    angle = np.deg2rad(5.0)
    rotation = torch.eye(4, dtype=torch.float64)
    rotation[:2, :2] = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    oblique = MetaTensor(volume.as_tensor(), affine=rotation @ affine)
    oblique_seeds = np.asarray(voxel_to_world_lps(oblique.affine, voxels))
    nine_planes_for_seeds(oblique, oblique_seeds[:2])  # warm-up

    stages = benchlib.StageTimes()
    for seed in seeds:  # one seed at a time: the per-nodule distribution, not only its median
        sync()
        with stages("nodule"):
            out = nine_planes_for_seeds(volume, [seed])
            sync()
    for seed in oblique_seeds:
        sync()
        with stages("oblique"):
            nine_planes_for_seeds(oblique, [seed])
            sync()
    assert out.shape == (1, 9, 3, 224, 224)
    ms = np.asarray(stages.samples["nodule"]) * 1000.0
    oblique_ms = stages.medians()["oblique"] * 1000.0
    print(
        f"volume {shape} on {args.device}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, {args.nodules} nodules: "
        f"per nodule median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, "
        f"max {ms.max():.1f} ms (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print(f"oblique volume (5 degrees in-plane, grid_sample path): per nodule median {oblique_ms:.1f} ms")


if __name__ == "__main__":
    main()
