"""Semantic CLIP inference for the deploy app: every fold model of a bundle, all nodules in one batch.

A deployable bundle holds its exported predictors as ``models/fold_<k>/model.ts`` (one per
cross-validation fold) or a single ``models/model.ts``, and optionally ``models/calibration.json``
(per-fold beta calibration). All folds stay in memory, weights that are identical across folds (the
frozen backbone of LoRA folds) stored once; the nodules of a series are preprocessed once
with the bundle's own transforms and go through each fold as one batch. The malignancy probability
is the mean of the folds' probabilities or, with calibrators, the mean of each fold's calibrated
probability; semantic probabilities and attention weights are the mean over folds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed
from scripts.calibration import CALIBRATION_FILE, BetaCalibration, ensemble_probability, load_calibration
from scripts.errors import UserInputError
from scripts.export import exported_models, load_fold_predictors, weight_bytes
from scripts.memory import release_freed_memory
from scripts.transforms import CLIPNormalize, nine_planes_for_seeds

logger = logging.getLogger(__name__)

MODELS_DIR = "models"


def use_simple_torchscript_executor() -> None:
    """Run TorchScript with its simple (non-profiling) executor, for the whole process.

    The profiling executor records and specialises a graph per loaded module on its first calls: for
    five ViT-B/32 folds that held about 2 GB more (peak 4.96 GB vs 2.96 GB for a 5-nodule study in
    ``bench/bench_deploy.py``) and was no faster, since each study runs every fold once or twice.
    """
    switch = getattr(torch._C, "_jit_set_profiling_executor", None)  # no public switch exists
    if switch is not None:
        switch(False)


def select_device(requested: str | None = None) -> torch.device:
    """``requested`` when given, else the first CUDA GPU when one is present, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bundle_identity(bundle_dir: Path) -> tuple[str, str]:
    metadata = bundle_dir / "configs" / "metadata.json"
    try:
        content = json.loads(metadata.read_text())
        return str(content["name"]), str(content["version"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(
            f"'{metadata}' is missing or has no name/version ({error}); the SR must name the algorithm"
        ) from error


@dataclass
class BundleModels:
    """The fold predictors of one bundle, loaded once and kept on ``device``.

    Args:
        predictors: TorchScript predictors in fold order.
        layout: ``{"columns": [{"feature", "value"}, ...], ...}`` shared by every fold.
        calibrators: fold index -> beta calibration, or None.
        info: bundle name, version, folds, calibration, demo flag.
        device: where the predictors run.
    """

    predictors: list[torch.jit.ScriptModule]
    layout: dict
    calibrators: dict[int, BetaCalibration] | None
    info: ModelInfo
    device: torch.device

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str | torch.device | None = None) -> BundleModels:
        """Load every fold of ``bundle_dir`` (and its calibrators, when present)."""
        bundle_dir = Path(bundle_dir)
        name, version = _bundle_identity(bundle_dir)
        device = select_device(str(device) if device else None)
        use_simple_torchscript_executor()
        folds = load_fold_predictors(exported_models(bundle_dir), device)
        predictors = folds.modules
        calibration_path = bundle_dir / MODELS_DIR / CALIBRATION_FILE
        calibrators = load_calibration(calibration_path) if calibration_path.is_file() else None
        if calibrators is not None and sorted(calibrators) != list(range(len(predictors))):
            raise UserInputError(
                f"'{calibration_path}' calibrates folds {sorted(calibrators)} but the bundle has "
                f"{len(predictors)} fold model(s); re-run the cross-validation export"
            )
        info = ModelInfo(
            name=name,
            version=version,
            folds=len(predictors),
            calibrated=calibrators is not None,
            untrained_demo=any(metadata.get("untrained_demo", False) for metadata in folds.metadata),
        )
        logger.info(
            "model bundle %s %s: %d fold(s), %s, on %s; weights held: %.0f MB (%.0f MB identical across "
            "folds shared)",
            name,
            version,
            info.folds,
            "calibrated" if info.calibrated else "not calibrated",
            device,
            weight_bytes(predictors) / 1e6,
            folds.shared_bytes / 1e6,
        )
        return cls(predictors, folds.layout, calibrators, info, device)

    @torch.no_grad()
    def predict(self, model_input: torch.Tensor) -> dict[str, np.ndarray]:
        """Run every fold on a batch ``(N, 9, 3, 224, 224)``.

        Returns:
            ``malignancy`` (N,), ``malignancy_per_fold`` (folds, N), ``semantic`` (N, V) and
            ``attention`` (N, 9), averaged over folds as described in the module docstring.
        """
        batch = model_input.to(self.device)
        outputs = []
        for predictor in self.predictors:
            outputs.append(predictor(batch))
            if self.device.type == "cpu":  # freed activations would otherwise stay resident, fold after fold
                release_freed_memory()
        raw = np.stack([out["malignancy"].float().cpu().numpy() for out in outputs])
        ensemble, _, calibrated = ensemble_probability(raw, self.calibrators)
        return {
            "malignancy": calibrated if calibrated is not None else ensemble,
            "malignancy_per_fold": raw,
            "semantic": torch.stack([o["semantic"].float() for o in outputs]).mean(0).cpu().numpy(),
            "attention": torch.stack([o["attention"].float() for o in outputs]).mean(0).cpu().numpy(),
        }

    def semantic_by_feature(self, row: np.ndarray) -> dict[str, dict[str, float]]:
        """One nodule's semantic output row -> ``{feature: {value: probability}}``."""
        grouped: dict[str, dict[str, float]] = {}
        for column, probability in zip(self.layout["columns"], row, strict=True):
            grouped.setdefault(column["feature"], {})[column["value"]] = float(probability)
        return grouped


def analyse_nodules(
    volume: MetaTensor, seeds: Sequence[NoduleSeed], models: BundleModels
) -> list[NoduleResult]:
    """Bundle preprocessing and every fold model for the seeds of one CT volume.

    Args:
        volume: (1, X, Y, Z) HU volume with a RAS affine (see :func:`deploy_app.volume.to_meta_tensor`).
        seeds: nodules inside the volume.
        models: the loaded bundle.

    Returns:
        one result per seed, in order.
    """
    if not seeds:
        return []
    model_input = nine_planes_for_seeds(
        volume, [seed.position_lps for seed in seeds], nodule_ids=[seed.label for seed in seeds]
    )
    outputs = models.predict(model_input)
    planes = CLIPNormalize().inverse(model_input).numpy()
    return [
        NoduleResult(
            seed=seed,
            malignancy=float(outputs["malignancy"][n]),
            malignancy_per_fold=tuple(float(p) for p in outputs["malignancy_per_fold"][:, n]),
            semantic=models.semantic_by_feature(outputs["semantic"][n]),
            attention=tuple(float(a) for a in outputs["attention"][n]),
            planes=planes[n],
        )
        for n, seed in enumerate(seeds)
    ]
