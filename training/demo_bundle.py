"""Deployable bundles for the demo and the tests.

- :func:`build_demo_bundle`: the project's demo model (``bundle/models/demo/``: a tiny CLIP trained by
  ``training.crossval`` on LIDC-contour CT phantoms, 5 calibrated folds).
- :func:`build_untrained_bundle`: a tiny, randomly initialised (UNTRAINED) model for tests; its export
  metadata says ``untrained_demo: true``, so the deploy app's SR and report say its numbers mean
  nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from training.bundle_path import BUNDLE_ROOT, copy_bundle, use_bundle

use_bundle()
from scripts.errors import UserInputError  # noqa: E402
from scripts.export import export_torchscript  # noqa: E402
from scripts.network import SemanticCLIP  # noqa: E402

TINY_MODEL = "lnsc-tiny-vit"
DEMO_MODEL = BUNDLE_ROOT / "models" / "demo"
"""The committed demo model: ``fold_<k>/model.ts``, ``calibration.json``, ``crossval_record.json``."""


def build_demo_bundle(destination: str | Path, demo_model: Path = DEMO_MODEL) -> Path:
    """Copy the bundle to ``destination`` with the demo model's folds and calibrators in ``models/``."""
    if not any(demo_model.glob("fold_*/model.ts")):
        raise UserInputError(
            f"the demo model is missing from '{demo_model}' (fold_<k>/model.ts); restore it with git, "
            "or train one with python -m training.crossval (see bundle/docs/README.md)"
        )
    bundle = copy_bundle(destination)
    shutil.copytree(demo_model, bundle / "models", dirs_exist_ok=True)
    return bundle


def build_untrained_bundle(destination: str | Path, *, folds: int = 1, seed: int = 0) -> Path:
    """Copy the bundle to ``destination`` and export ``folds`` random tiny models into it.

    Args:
        destination: a new folder.
        folds: 1 writes ``models/model.ts``; more write ``models/fold_<k>/model.ts``.
        seed: torch seed of the random weights (fold k uses seed + k).

    Returns:
        the bundle folder.
    """
    bundle = copy_bundle(destination)
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        network = SemanticCLIP(TINY_MODEL, pretrained=None, tuning="lora")
        target = bundle / "models" / ("model.ts" if folds == 1 else f"fold_{fold}/model.ts")
        export_torchscript(network, target, extra_metadata={"untrained_demo": True, "model_name": TINY_MODEL})
    return bundle
