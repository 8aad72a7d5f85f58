"""Deployable bundles for the demo and the tests.

- :func:`build_demo_bundle`: the project's demo model (``bundle/models/demo/``: a tiny CLIP trained by
  ``training.crossval`` on LIDC-contour CT phantoms, 5 calibrated folds).
- :func:`build_untrained_bundle`: a tiny, randomly initialised (UNTRAINED) model for tests; its export
  metadata says ``untrained_demo: true``, so the deploy app's SR and report say its numbers mean
  nothing. With ``shared_backbone`` its folds differ as LoRA cross-validation folds do
  (:func:`lora_folds`), which the benchmarks use with ViT-B-32.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from scripts.bundle_files import BUNDLE_ROOT, copy_bundle
from scripts.errors import UserInputError
from scripts.export import export_torchscript
from scripts.network import SemanticCLIP

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


def build_untrained_bundle(
    destination: str | Path,
    *,
    folds: int = 1,
    seed: int = 0,
    model_name: str = TINY_MODEL,
    shared_backbone: bool = False,
) -> Path:
    """Copy the bundle to ``destination`` and export ``folds`` random models into it.

    Args:
        destination: a new folder.
        folds: 1 writes ``models/model.ts``; more write ``models/fold_<k>/model.ts``.
        seed: torch seed of the random weights (fold k uses seed + k).
        model_name: the open_clip architecture (default: the tiny test model).
        shared_backbone: build the folds as LoRA cross-validation leaves them: one random backbone
            (``seed``) and, per fold, its own random LoRA adapters and heads (seed + 1 + k), so the
            frozen backbone weights are identical in every fold.

    Returns:
        the bundle folder.
    """
    bundle = copy_bundle(destination)
    make_folds = lora_folds if shared_backbone else _independent_folds
    networks = make_folds(model_name, folds, seed)
    for fold, network in enumerate(networks):
        target = bundle / "models" / ("model.ts" if folds == 1 else f"fold_{fold}/model.ts")
        export_torchscript(network, target, extra_metadata={"untrained_demo": True, "model_name": model_name})
    return bundle


def _independent_folds(model_name: str, folds: int, seed: int) -> Iterator[SemanticCLIP]:
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        yield SemanticCLIP(model_name, pretrained=None, tuning="lora")


def lora_folds(model_name: str, folds: int, seed: int = 0, scale: float = 0.02) -> Iterator[SemanticCLIP]:
    """Random networks that differ as LoRA-trained folds do: only in their trainable parameters.

    LoRA training from one backbone changes the adapters, the heads and the logit scale and leaves
    every other weight as it was; here those trainable parameters get fold-specific Gaussian noise
    (``scale``) on one random backbone. The same network object is yielded each time, re-randomised.

    Args:
        model_name: the open_clip architecture.
        folds: how many folds.
        seed: seed of the backbone; fold k's trainable noise uses seed + 1 + k.
        scale: standard deviation of the noise added to the trainable parameters.
    """
    torch.manual_seed(seed)
    network = SemanticCLIP(model_name, pretrained=None, tuning="lora")
    initial = {name: value.clone() for name, value in network.state_dict().items()}
    for fold in range(folds):
        network.load_state_dict(initial)
        generator = torch.Generator().manual_seed(seed + 1 + fold)
        with torch.no_grad():
            for parameter in network.parameters():
                if parameter.requires_grad:
                    parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        yield network
