"""Benchmark: the deploy app's compute on one device: preprocessing and every fold model, 5 nodules.

Exports a ViT-B-32-quickgelu predictor with random weights (as the deploy app loads it: TorchScript,
``scripts.export.load_exported``), loads it ``--folds`` times onto ``--device``, and times on a
synthetic 512 x 512 x 300 CT already on that device:

- preprocessing: ``nine_planes_for_seeds`` (ROI crop + nine planes + CLIP normalisation) for all seeds;
- the model: every fold on the batch of nodules (N x 9 planes), as ``BundleModels.predict`` runs it.

It also checks that the device gives the CPU's numbers (max abs difference of the probabilities).
Medians over ``--repeats`` after one warm-up. Usage::

    python bench/bench_inference.py [--device cuda] [--folds 5] [--nodules 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

import benchlib
import deploy_app  # noqa: F401  (its __init__ puts bundle/ on sys.path for scripts.*)
from scripts.export import export_torchscript, load_exported
from scripts.geometry import voxel_to_world_lps
from scripts.network import SemanticCLIP
from scripts.transforms import nine_planes_for_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-name", default="ViT-B-32-quickgelu")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--nodules", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None

    def timed(function):  # median over --repeats after one warm-up, device work included
        return benchlib.median_seconds(function, args.repeats, synchronize=synchronize)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        path = export_torchscript(
            SemanticCLIP(args.model_name, pretrained=None, tuning="lora"), Path(tmp) / "model.ts"
        )
        folds = [load_exported(path, device)[0] for _ in range(args.folds)]
        reference = load_exported(path, "cpu")[0]

    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    affine[:3, 3] = [179.0, 179.0, -400.0]
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(-1024, 400, (1, 512, 512, 300), generator=generator, dtype=torch.int16)
    volume = MetaTensor(data.to(device), affine=torch.as_tensor(affine))
    rng = np.random.default_rng(0)
    seeds = voxel_to_world_lps(affine, rng.uniform([120, 120, 80], [392, 392, 220], size=(args.nodules, 3)))

    preprocessing, planes = timed(lambda: nine_planes_for_seeds(volume, seeds))

    def all_folds():
        with torch.no_grad():
            return [fold(planes)["malignancy"] for fold in folds]

    model, outputs = timed(all_folds)
    with torch.no_grad():
        expected = reference(planes.cpu())["malignancy"]
    difference = float((outputs[0].float().cpu() - expected).abs().max())
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model_name,
        "folds": args.folds,
        "nodules": args.nodules,
        "preprocessing_s": round(preprocessing, 4),
        "model_s": round(model, 4),
        "model_per_fold_and_nodule_ms": round(1000 * model / args.folds / args.nodules, 2),
        "max_abs_difference_vs_cpu": difference,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
