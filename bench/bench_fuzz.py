"""Benchmark: 10,000 mutated CT headers in process, and a few dozen mutated studies end to end.

The generator, the targets and the outcome classes are those of ``tests/test_fuzz_headers.py``
(the default test runs the first 1,000 of the same stream). Prints the outcome table per mutation
category and the wall time of each part; exits 1 when any case is a bug (not analysed, not a
localizer skipped, not refused per series with a message naming the series or instance).

Usage::

    .venv/bin/python bench/bench_fuzz.py [--mutations 10000] [--app-cases 26] [--seed 20250101]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchlib import StageTimes

os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    """Run both parts and print their tables; 1 when a bug was found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=10_000, help="in-process cases")
    parser.add_argument("--app-cases", type=int, default=26, help="end-to-end cases (0 to skip)")
    parser.add_argument("--seed", type=int, default=None, help="stream seed (default: the test's)")
    args = parser.parse_args()

    import deploy_app  # noqa: F401 - puts the bundle's scripts on the path for the test module
    from tests import test_fuzz_headers as fuzz

    stages = StageTimes()

    seed = fuzz.FUZZ_SEED if args.seed is None else args.seed
    bugs = 0
    with tempfile.TemporaryDirectory(prefix="lnsc_bench_fuzz.") as folder:
        work = Path(folder)
        base = fuzz.base_series(work / "ct")
        with stages("in process"):
            tally = fuzz.fuzz_in_process(base, args.mutations, work / "out", seed=seed)
        elapsed = stages.medians()["in process"]
        print(f"in process: {args.mutations} mutations of a {fuzz.FUZZ_GEOMETRY.shape} series, seed {seed}")
        print(tally.table())
        print(f"wall time {elapsed:.1f} s ({1000 * elapsed / max(args.mutations, 1):.1f} ms per mutation)\n")
        bugs += len(tally.bugs)

        if args.app_cases:
            from demo.study import write_demo_study
            from deploy_app.inference import BundleModels
            from training.demo_bundle import build_untrained_bundle

            study = work / "study"
            write_demo_study(study, seed=5, n_nodules=1, seed_sr=False, seeds_csv=True)
            models = BundleModels.load(build_untrained_bundle(work / "bundle"))
            app_tally = fuzz.Tally()
            with stages("end to end"):
                for case in fuzz.app_cases(study, args.app_cases, seed=seed):
                    case_work = work / f"case{case.index}"
                    case_work.mkdir()
                    app_tally.add(case, fuzz.run_app_case(case, study, case_work, models))
            elapsed = stages.medians()["end to end"]
            print(f"end to end (process_folder, untrained demo bundle): {args.app_cases} mutated studies")
            print(app_tally.table())
            print(f"wall time {elapsed:.1f} s ({elapsed / args.app_cases:.1f} s per study)")
            bugs += len(app_tally.bugs)
    return 1 if bugs else 0


if __name__ == "__main__":
    raise SystemExit(main())
