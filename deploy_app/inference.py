"""Semantic CLIP inference for the deploy app: every fold model of a bundle, all nodules in one batch.

The bundle is opened with :class:`scripts.deployed.DeployedBundle` (identity, fold predictors with
the weights identical across folds stored once, calibrators checked against the folds); the nodules
of a series are preprocessed once with the bundle's own transforms and go through its fold ensemble
as one batch. The malignancy probability is the mean of the folds' probabilities or, with
calibrators, the mean of each fold's calibrated probability; semantic probabilities and attention
weights are the mean over folds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed
from scripts.deployed import DeployedBundle, select_device
from scripts.errors import UserInputError
from scripts.export import weight_bytes
from scripts.finding_reliability import DEFAULT_CONFIDENCE, RELIABILITY_FILE
from scripts.transforms import CLIPNormalize, windowed_planes_for_seeds

__all__ = [
    "BundleModels",
    "analyse_nodules",
    "check_finite_outputs",
    "select_device",
    "use_simple_torchscript_executor",
]

logger = logging.getLogger(__name__)

#: Nodules per model batch: memory stays flat whatever the seed count (16 x 9 planes x 5 folds).
INFERENCE_CHUNK = 16


def use_simple_torchscript_executor() -> None:
    """Run TorchScript with its simple (non-profiling) executor, for the whole process.

    The profiling executor records and specialises a graph per loaded module on its first calls: for
    five ViT-B/32 folds that raised the app's peak resident memory by far more than the models'
    weights (``bench/bench_deploy.py`` prints the peak) and was no faster, since each study runs
    every fold once or twice.
    """
    switch = getattr(torch._C, "_jit_set_profiling_executor", None)  # no public switch exists
    if switch is not None:
        switch(False)


@dataclass
class BundleModels:
    """The opened bundle, its fold predictors kept on their device, and what the SR says about it.

    Args:
        bundle: the opened bundle (identity, fold ensemble).
        info: bundle name, version, folds, calibration, demo flag.
    """

    bundle: DeployedBundle
    info: ModelInfo

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        device: str | torch.device | None = None,
        *,
        finding_confidence: float | None = None,
    ) -> BundleModels:
        """Open ``bundle_dir`` and load every fold (and its calibrators, when present) onto ``device``.

        Args:
            bundle_dir: the bundle, or a model set inside one.
            device: torch device (default: CUDA when available).
            finding_confidence: one confidence threshold for every semantic finding, instead of
                the thresholds recorded with the model (or the default, without a record).

        Raises:
            UserInputError: see :meth:`scripts.deployed.DeployedBundle.open` (the identity is required:
                the SR must name the algorithm).
        """
        use_simple_torchscript_executor()
        bundle = DeployedBundle.open(bundle_dir, device)
        ensemble = bundle.ensemble
        reliability = bundle.reliability
        if finding_confidence is not None:
            features = [column["feature"] for column in ensemble.predictors.layout.get("columns", [])]
            reliability = reliability.with_confidence(finding_confidence, features)
            logger.info("finding confidence threshold set to %.2f for every feature", finding_confidence)
        elif not reliability.recorded:
            logger.warning(
                "the model has no finding reliability record (%s): every semantic finding below the "
                "default confidence %.2f is reported as indeterminate, and no AUROC is shown",
                RELIABILITY_FILE,
                DEFAULT_CONFIDENCE,
            )
        info = ModelInfo(
            name=bundle.identity.name,
            version=bundle.identity.version,
            folds=len(ensemble.folds),
            calibrated=ensemble.calibrators is not None,
            untrained_demo=bundle.untrained_demo,
            reliability=reliability,
        )
        logger.info(
            "model bundle %s %s: %d fold(s), %s, on %s; weights held: %.0f MB (%.0f MB identical across "
            "folds shared)",
            info.name,
            info.version,
            info.folds,
            "calibrated" if info.calibrated else "not calibrated",
            ensemble.device,
            weight_bytes(ensemble.modules) / 1e6,
            ensemble.predictors.shared_bytes / 1e6,
        )
        return cls(bundle, info)

    @property
    def predictors(self) -> list[torch.jit.ScriptModule]:
        """The TorchScript predictors, in fold order."""
        return self.bundle.ensemble.modules

    def predict(self, model_input: torch.Tensor) -> dict[str, np.ndarray]:
        """Run every fold on a batch ``(N, 9, 3, 224, 224)``.

        Returns:
            ``malignancy`` (N,), ``malignancy_per_fold`` (folds, N), ``semantic`` (N, V) and
            ``attention`` (N, 9), averaged over folds as described in the module docstring.
        """
        outputs = self.bundle.ensemble.predict(model_input)
        return {
            "malignancy": outputs.malignancy,
            "malignancy_per_fold": outputs.per_fold,
            "semantic": outputs.semantic,
            "attention": outputs.attention,
        }

    def semantic_by_feature(self, row: np.ndarray) -> dict[str, dict[str, float]]:
        """One nodule's semantic output row -> ``{feature: {value: probability}}``."""
        grouped: dict[str, dict[str, float]] = {}
        for column, probability in zip(self.bundle.ensemble.predictors.layout["columns"], row, strict=True):
            grouped.setdefault(column["feature"], {})[column["value"]] = float(probability)
        return grouped


def check_finite_outputs(outputs: dict[str, np.ndarray], seeds: Sequence[NoduleSeed]) -> None:
    """Refuse NaN or infinite model outputs, which no report may carry as a probability.

    Raises:
        UserInputError: naming the nodules; the planes are finite (the HU checks come first), so the
            bundle's weights are the likely cause.
    """
    finite = np.isfinite(outputs["malignancy"]) & np.isfinite(outputs["malignancy_per_fold"]).all(axis=0)
    finite &= np.isfinite(outputs["semantic"]).all(axis=1)
    if not finite.all():
        labels = ", ".join(seed.label for seed, ok in zip(seeds, finite, strict=True) if not ok)
        raise UserInputError(
            f"the model gave a non-finite (NaN or infinite) probability for {labels}; nothing was "
            "written for this series. The bundle's weights are probably damaged: export or copy the "
            "bundle again"
        )


def analyse_nodules(
    volume: MetaTensor, seeds: Sequence[NoduleSeed], models: BundleModels
) -> list[NoduleResult]:
    """Bundle preprocessing and every fold model for the seeds of one CT volume.

    The nine windowed planes of each nodule (in [0, 1], for the readable report) are kept as the
    bundle's preprocessing makes them, before the CLIP normalisation that gives the model input.
    Nodules go through the folds :data:`INFERENCE_CHUNK` at a time, so the model's working memory
    does not grow with the seed count.

    Args:
        volume: (1, X, Y, Z) HU volume with a RAS affine (see :func:`deploy_app.volume.to_meta_tensor`).
        seeds: nodules inside the volume.
        models: the loaded bundle.

    Returns:
        one result per seed, in order.
    """
    results = []
    for start in range(0, len(seeds), INFERENCE_CHUNK):
        chunk = seeds[start : start + INFERENCE_CHUNK]
        planes = windowed_planes_for_seeds(
            volume, [seed.position_lps for seed in chunk], nodule_ids=[seed.label for seed in chunk]
        )
        outputs = models.predict(CLIPNormalize()(planes))
        check_finite_outputs(outputs, chunk)
        planes_01 = planes.float().cpu().numpy()
        results.extend(
            NoduleResult(
                seed=seed,
                malignancy=float(outputs["malignancy"][n]),
                malignancy_per_fold=tuple(float(p) for p in outputs["malignancy_per_fold"][:, n]),
                semantic=models.semantic_by_feature(outputs["semantic"][n]),
                attention=tuple(float(a) for a in outputs["attention"][n]),
                planes=planes_01[n],
            )
            for n, seed in enumerate(chunk)
        )
    return results
