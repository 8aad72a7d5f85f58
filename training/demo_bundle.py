"""A deployable bundle holding a tiny, randomly initialised (UNTRAINED) model, for demos and tests.

The exported model carries ``untrained_demo: true`` in its metadata, so the deploy app's SR and
report say that its numbers mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.bundle_path import copy_bundle, use_bundle

use_bundle()
from scripts.export import export_torchscript  # noqa: E402
from scripts.network import SemanticCLIP  # noqa: E402

TINY_MODEL = "lnsc-tiny-vit"


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
