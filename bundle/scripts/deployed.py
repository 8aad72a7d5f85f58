"""Open a deployed bundle and run its fold ensemble: the one loader the deploy app and the evaluation share.

A deployed bundle holds ``configs/metadata.json`` (its name and version), the exported predictor of
every cross-validation fold (``models/fold_<k>/model.ts``, or one ``models/model.ts`` taken as fold 0,
see :func:`scripts.export.exported_models`) and optionally ``models/calibration.json`` (one beta map
per fold, see :mod:`scripts.calibration`) and ``models/finding_reliability.json`` (what the validation
data showed for each semantic finding, see :mod:`scripts.finding_reliability`).
:meth:`DeployedBundle.open` reads and checks all of it:
the identity, the calibration against the folds (one map for each fold model, no other) and the
predictors, loaded once with the weights that are identical across folds stored once.

:class:`FoldEnsemble` runs every fold on a batch of model input ``(N, 9, 3, 224, 224)``. The
malignancy probability is the mean of the folds' probabilities or, with calibrators, the mean of each
fold's calibrated probability (:func:`scripts.calibration.ensemble_probability`); the semantic
probabilities and the attention weights are the mean over folds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scripts.calibration import CALIBRATION_FILE, BetaCalibration, ensemble_probability, load_calibration
from scripts.errors import UserInputError
from scripts.export import FoldPredictors, exported_models, load_fold_predictors
from scripts.finding_reliability import FindingReliability, read_finding_reliability
from scripts.memory import release_freed_memory

__all__ = [
    "UNKNOWN_IDENTITY",
    "BundleIdentity",
    "DeployedBundle",
    "EnsembleOutputs",
    "FoldEnsemble",
    "bundle_calibrators",
    "check_calibration",
    "locate_models",
    "read_bundle_identity",
    "select_device",
]

logger = logging.getLogger(__name__)

METADATA_FILE = Path("configs") / "metadata.json"
"""The bundle's identity (``name``, ``version``), relative to the bundle folder."""


def select_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` when given, else the first CUDA GPU when one is present, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class BundleIdentity:
    """The name and version of a bundle, as its ``configs/metadata.json`` gives them."""

    name: str
    version: str


UNKNOWN_IDENTITY = BundleIdentity(name="unknown", version="unknown")


def read_bundle_identity(bundle_dir: str | Path, *, required: bool = True) -> BundleIdentity:
    """The bundle's name and version from ``BUNDLE/configs/metadata.json``.

    Args:
        bundle_dir: the bundle folder.
        required: raise when the file or its ``name``/``version`` is missing (the deploy app's SR
            must name the algorithm); otherwise log a warning and return :data:`UNKNOWN_IDENTITY`.

    Raises:
        UserInputError: ``required`` and the file is missing, not JSON, or lacks ``name``/``version``.
    """
    path = Path(bundle_dir) / METADATA_FILE
    try:
        content = json.loads(path.read_text())
        return BundleIdentity(name=str(content["name"]), version=str(content["version"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"'{path}' is missing or has no name/version ({error})"
        if required:
            raise UserInputError(
                f"{problem}; the bundle must name itself: restore configs/metadata.json from the bundle"
            ) from error
        logger.warning("%s: bundle name and version unknown", problem)
        return UNKNOWN_IDENTITY


def locate_models(path: str | Path) -> tuple[Path, Path]:
    """The bundle folder and its models folder, for a bundle or for a model set inside one.

    A model set is a folder of fold models (and their ``calibration.json``) kept in a bundle's
    ``models/`` beside others, like the project's ``bundle/models/demo/``: given
    ``BUNDLE/models/<set>``, the identity comes from ``BUNDLE`` and the models from the set.

    Returns:
        ``(bundle folder, models folder)``: ``(path, path / "models")`` for a plain bundle.
    """
    path = Path(path)
    bundle = path.parent.parent
    if (
        not (path / METADATA_FILE).is_file()
        and path.parent.name == "models"
        and (bundle / METADATA_FILE).is_file()
    ):
        return bundle, path
    return path, path / "models"


def bundle_calibrators(bundle_dir: str | Path) -> dict[int, BetaCalibration] | None:
    """The per-fold calibration maps of ``BUNDLE/models/calibration.json``, ``None`` without the file.

    ``bundle_dir`` may be a model set inside a bundle (see :func:`locate_models`).

    Raises:
        UserInputError: the file exists but is not a valid calibration file.
    """
    path = locate_models(bundle_dir)[1] / CALIBRATION_FILE
    return load_calibration(path) if path.is_file() else None


def check_calibration(
    calibrators: Mapping[int, BetaCalibration], folds: tuple[int, ...], source: Path
) -> None:
    """Check that ``calibrators`` holds exactly one map for each fold model.

    Args:
        calibrators: fold -> map, as read from ``source``.
        folds: the fold numbers of the bundle's models.
        source: the calibration file, for the message.

    Raises:
        UserInputError: a fold model has no map, or a map belongs to no fold model.
    """
    missing = [fold for fold in folds if fold not in calibrators]
    extra = sorted(fold for fold in calibrators if fold not in folds)
    if not missing and not extra:
        return
    problems = []
    if missing:
        problems.append(f"no calibration map for fold(s) {', '.join(map(str, missing))}")
    if extra:
        problems.append(f"maps for fold(s) {', '.join(map(str, extra))} that have no model")
    raise UserInputError(
        f"'{source}': {' and '.join(problems)} (the bundle's models are fold(s) "
        f"{', '.join(map(str, folds))}): refit the calibration for these models (re-run the "
        "cross-validation export) or remove the file"
    )


@dataclass(frozen=True)
class EnsembleOutputs:
    """What the fold ensemble gives for a batch of N nodules.

    Attributes:
        per_fold: ``(K, N)`` malignancy probability of each fold model (float32, as the models give it).
        ensemble: ``(N,)`` mean of ``per_fold``.
        calibrated_per_fold: ``(K, N)`` each fold's map applied to its own probability, or ``None``.
        calibrated_ensemble: ``(N,)`` mean of ``calibrated_per_fold``, or ``None``.
        semantic: ``(N, V)`` zero-shot value probabilities, mean over folds (float32; columns as the
            layout).
        attention: ``(N, 9)`` MIL attention weights of the nine planes, mean over folds (float32).
    """

    per_fold: np.ndarray
    ensemble: np.ndarray
    calibrated_per_fold: np.ndarray | None
    calibrated_ensemble: np.ndarray | None
    semantic: np.ndarray
    attention: np.ndarray

    @property
    def malignancy(self) -> np.ndarray:
        """``(N,)`` the bundle's malignancy probability: calibrated when the bundle is, else raw."""
        return self.calibrated_ensemble if self.calibrated_ensemble is not None else self.ensemble


@dataclass
class FoldEnsemble:
    """Fold predictors loaded on one device, with their calibrators: the bundle's one predictor.

    Args:
        folds: the fold number of each predictor, in order.
        predictors: the loaded TorchScript predictors, their shared semantic layout and metadata.
        calibrators: fold -> beta map (one for each fold), or ``None``.
        device: where the predictors run.
    """

    folds: tuple[int, ...]
    predictors: FoldPredictors
    calibrators: dict[int, BetaCalibration] | None
    device: torch.device

    @classmethod
    def load(
        cls,
        model_paths: Mapping[int, Path],
        device: str | torch.device | None = None,
        calibrators: dict[int, BetaCalibration] | None = None,
    ) -> FoldEnsemble:
        """Load the predictors of ``model_paths`` (fold -> ``model.ts``) onto ``device``.

        Raises:
            UserInputError: a file is not a loadable exported predictor, or the folds disagree on the
                semantic outputs (see :func:`scripts.export.load_fold_predictors`).
        """
        device = select_device(device)
        return cls(tuple(model_paths), load_fold_predictors(model_paths, device), calibrators, device)

    @property
    def modules(self) -> list[torch.jit.ScriptModule]:
        """The TorchScript predictors, in fold order."""
        return self.predictors.modules

    @property
    def semantic_columns(self) -> list[str]:
        """``<feature>=<value>`` of every column of :attr:`EnsembleOutputs.semantic`."""
        return [f"{c['feature']}={c['value']}" for c in self.predictors.layout.get("columns", [])]

    @torch.no_grad()
    def predict(self, model_input: torch.Tensor) -> EnsembleOutputs:
        """Run every fold on a batch ``(N, 9, 3, 224, 224)`` of CLIP-normalised planes.

        Returns:
            the per-fold and ensemble probabilities, as described in the module docstring.
        """
        batch = model_input.to(self.device)
        malignancy: list[np.ndarray] = []
        semantic: list[torch.Tensor] = []
        attention: list[torch.Tensor] = []
        for module in self.modules:
            output = module(batch)
            malignancy.append(output["malignancy"].float().cpu().numpy())
            semantic.append(output["semantic"].float())
            attention.append(output["attention"].float())
            del output  # the embedding: not needed
            if self.device.type == "cpu":  # freed activations would otherwise stay resident, fold after fold
                release_freed_memory()
        per_fold = np.stack(malignancy)
        ensemble, calibrated, calibrated_ensemble = ensemble_probability(
            per_fold, self.calibrators, self.folds
        )
        return EnsembleOutputs(
            per_fold=per_fold,
            ensemble=ensemble,
            calibrated_per_fold=calibrated,
            calibrated_ensemble=calibrated_ensemble,
            semantic=torch.stack(semantic).mean(0).cpu().numpy(),
            attention=torch.stack(attention).mean(0).cpu().numpy(),
        )


@dataclass
class DeployedBundle:
    """A deployed bundle, opened: its identity and its fold ensemble.

    Args:
        path: the bundle folder.
        identity: name and version.
        ensemble: the fold predictors and their calibrators.
        reliability: the semantic findings' validation record (empty: none came with the models).
    """

    path: Path
    identity: BundleIdentity
    ensemble: FoldEnsemble
    reliability: FindingReliability = field(default_factory=FindingReliability)

    @classmethod
    def open(
        cls, path: str | Path, device: str | torch.device | None = None, *, require_identity: bool = True
    ) -> DeployedBundle:
        """Read and check the bundle at ``path``, then load its fold predictors onto ``device``.

        Everything that can be checked without the models (identity, fold models present, calibration
        against the folds) is checked before any model is loaded.

        Args:
            path: the bundle folder, or a model set inside one (see :func:`locate_models`).
            device: torch device (default: :func:`select_device`).
            require_identity: see :func:`read_bundle_identity`.

        Raises:
            UserInputError: the identity is missing (when required), the bundle holds no exported model,
                the calibration file is invalid or does not match the folds, the finding reliability
                record is invalid, or a model cannot be loaded.
        """
        bundle, models = locate_models(path)
        identity = read_bundle_identity(bundle, required=require_identity)
        model_paths = exported_models(bundle, models)
        calibrators = bundle_calibrators(path)
        if calibrators is not None:
            check_calibration(calibrators, tuple(model_paths), models / CALIBRATION_FILE)
        reliability = read_finding_reliability(models)
        return cls(Path(path), identity, FoldEnsemble.load(model_paths, device, calibrators), reliability)

    @property
    def untrained_demo(self) -> bool:
        """Whether any fold was exported as an untrained demonstration model."""
        return any(metadata.get("untrained_demo", False) for metadata in self.ensemble.predictors.metadata)
