"""Benchmark: the deploy app from DICOM to SR on a 512 x 512 x 300 CT with 5 seeds, ViT-B-32, CPU.

Writes the study (int16 DICOM, 0.7 x 0.7 x 1.0 mm) and a seeds SR once, exports ViT-B-32 fold
predictors with random weights that differ as LoRA cross-validation folds do (one backbone, per-fold
adapters and heads: ``training.demo_bundle.lora_folds``; the deploy app keeps the identical backbone
weights once), then, in a fresh process per configuration (1 fold, 5 folds):

- times each stage exactly as the app's operators run it, in graph order: SDK DICOM loading, SDK
  series selection, geometry check + SDK series-to-volume, seeds, bundle preprocessing, the fold
  models, the writers (SR, PDF, SC); repeated ``--repeats`` times, medians reported;
- times the whole app (``process_folder``, the holoscan graph) once, first, and reports the peak
  resident memory of the process after it (models loaded + one app run; ``VmHWM``, in GB of 10^9
  bytes; ``ru_maxrss`` would include the parent's peak, which a child inherits).

Usage::

    .venv/bin/python bench/bench_deploy.py [--work /tmp/lnsc_bench_deploy] [--folds 1 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")  # before holoscan is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pydicom
import torch
from holoscan.core import Application
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator

from benchlib import StageTimes, median_seconds
from deploy_app.app import SERIES_RULES, process_folder, read_series_rules
from deploy_app.dicom_io import write_dataset
from deploy_app.findings import NoduleSeed, SeriesResult
from deploy_app.inference import BundleModels, analyse_nodules
from deploy_app.operators import ReportWritersOperator, SeriesAnalysed, SeriesVolumesOperator
from deploy_app.seeds import CTSeriesInfo, find_seeds
from deploy_app.sr import build_seed_sr
from scripts.bundle_files import copy_bundle
from scripts.export import weight_bytes
from scripts.memory import peak_resident_bytes
from scripts.transforms import nine_planes_for_seeds
from training.demo_bundle import build_untrained_bundle
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

BENCH_MODEL = "ViT-B-32-quickgelu"


def prepare(work: Path, fold_counts: list[int]) -> None:
    """Write the study and, per fold count, a bundle of that many ViT-B-32 LoRA-like folds."""
    study = work / "study"
    if not (study / "ct").is_dir():
        geometry = CTGeometry(shape=(300, 512, 512), pixel_spacing=(0.7, 0.7), slice_spacing=1.0,
                              origin_lps=(-179.0, -179.0, -400.0))  # fmt: skip
        rng = np.random.default_rng(0)
        volume = rng.normal(-850, 60, size=geometry.shape).astype(np.float32)
        patient = SyntheticPatient("BENCH")
        series = write_ct_series(volume, geometry, study / "ct", patient=patient, uid_seed="b")
        del volume
        centre = np.array(geometry.shape) / 2
        offsets = np.array([[0, 0, 0], [-60, -80, -80], [60, 80, 80], [-90, 100, -100], [90, -100, 100]])
        seeds = [
            NoduleSeed(tuple(float(v) for v in geometry.index_to_lps(centre + o)), f"Nodule {n + 1}", "bench")
            for n, o in enumerate(offsets)
        ]
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
        write_dataset(build_seed_sr(headers, seeds), study / "seeds_sr.dcm")
    largest = work / f"lora_bundle_{max(fold_counts)}"
    if not largest.is_dir():
        build_untrained_bundle(largest, folds=max(fold_counts), model_name=BENCH_MODEL, shared_backbone=True)
    for folds in fold_counts:
        bundle = work / f"lora_bundle_{folds}"
        if not bundle.is_dir():  # the first folds of the largest bundle
            copy_bundle(bundle)
            for fold in range(folds):
                shutil.copytree(largest / "models" / f"fold_{fold}", bundle / "models" / f"fold_{fold}")


def measure(work: Path, folds: int, repeats: int) -> dict:
    """Stage timings (medians) + whole-app time + peak RSS for one bundle; runs in its own process."""
    torch.set_num_threads(os.cpu_count() or 1)
    study, bundle = work / "study", work / f"lora_bundle_{folds}"
    load_models, models = median_seconds(lambda: BundleModels.load(bundle), repeats=1, warmup=0)
    # the whole app first, so the peak memory is the app's own (the stage loop below keeps copies)
    whole_app, outcome = median_seconds(
        lambda: process_folder(study, work / f"app_{folds}", models=models), repeats=1, warmup=0
    )
    assert not outcome.failures, outcome.failures
    peak = peak_resident_bytes()  # this process's own peak, not its parent's
    peak_rss_gb = peak / 1e9 if peak is not None else float("nan")
    fragment = Application()
    rules, min_slices = read_series_rules(SERIES_RULES)
    loader = DICOMDataLoaderOperator(fragment, input_folder=study, name="loader")
    selector = DICOMSeriesSelectorOperator(fragment, rules=rules, all_matched=True, name="selector")
    to_volume = SeriesVolumesOperator(fragment, min_slices=min_slices, name="volume")
    stages = StageTimes()
    for repeat in range(repeats):
        with stages("load (SDK DICOM loader)"):
            studies = loader.load_data_to_studies(study)
        with stages("select (SDK series selector)"):
            selected = selector.filter(json.loads(rules), studies, True)
        chosen = selected[0].selected_series[0]
        with stages("volume (geometry check + SDK series-to-volume)"):
            volume = to_volume.series_volume(chosen.series, chosen.selection_name)
        with stages("seeds (series info + SR)"):  # as NoduleSeedsOperator does it
            seeds, skipped, _ = find_seeds(study, CTSeriesInfo.from_geometry(volume.geometry))
        with stages("preprocessing (crop + nine planes)"):
            planes = nine_planes_for_seeds(volume.volume, [s.position_lps for s in seeds])
        with stages(f"model ({folds} fold(s), {len(seeds)} nodules)"):
            models.predict(planes)
        if repeat == 0:  # the writers' input: the same numbers the app would produce
            nodules = analyse_nodules(volume.volume, seeds, models)
            result = SeriesResult(nodules=tuple(nodules), skipped=tuple(skipped), model=models.info)
        writer = ReportWritersOperator(fragment, output_folder=work / f"out_{folds}_{repeat}",
                                       outcome=None, name=f"writers{repeat}")  # fmt: skip
        with stages("writers (SR + PDF + SC)"):
            writer.write_series(SeriesAnalysed(series=volume, result=result))
    model_times = next(values for name, values in stages.samples.items() if name.startswith("model"))
    outside_times = [
        sum(values[repeat] for name, values in stages.samples.items() if not name.startswith("model"))
        for repeat in range(repeats)
    ]
    return {
        "folds": folds,
        "stages_median_s": stages.medians(),
        # per repeat, so a slower or faster spell of this shared machine affects both sides alike
        "outside_share_per_repeat": [o / m for o, m in zip(outside_times, model_times, strict=True)],
        "model_load_s": load_models,
        "weights_held_gb": weight_bytes(models.predictors) / 1e9,
        "whole_app_s": whole_app,
        "peak_rss_gb": peak_rss_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lnsc_bench_deploy")
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.work, args.measure, args.repeats)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.folds)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    for folds in args.folds:
        command = [sys.executable, __file__, "--work", str(args.work), "--measure", str(folds),
                   "--repeats", str(args.repeats)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        report = json.loads(output.strip().splitlines()[-1])
        stages = report["stages_median_s"]
        model = next(v for k, v in stages.items() if k.startswith("model"))
        outside = sum(v for k, v in stages.items() if not k.startswith("model"))
        print(
            f"\n{folds} fold(s): peak RSS {report['peak_rss_gb']:.2f} GB (weights held "
            f"{report['weights_held_gb']:.2f} GB), models loaded in {report['model_load_s']:.1f} s, "
            f"whole app {report['whole_app_s']:.2f} s"
        )
        for name, seconds in stages.items():
            print(f"  {name:<52} {seconds:8.3f} s")
        shares = ", ".join(f"{100 * share:.1f}" for share in report["outside_share_per_repeat"])
        print(
            f"  {'outside the model':<52} {outside:8.3f} s = {100 * outside / model:.1f} % of the model "
            f"time (per repeat: {shares} %; median "
            f"{100 * statistics.median(report['outside_share_per_repeat']):.1f} %)"
        )


if __name__ == "__main__":
    main()
