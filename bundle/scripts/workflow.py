"""Engine glue for the bundle's train/evaluate configs: batch preparation and validation metrics."""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from sklearn.metrics import average_precision_score, roc_auc_score

from scripts.atomic import atomic_path
from scripts.clip_backbone import create_tokenizer
from scripts.network import SemanticCLIP, SemanticCLIPLoss
from scripts.zero_shot import PromptLayout, embed_prompts, zero_shot_probabilities

logger = logging.getLogger(__name__)


class PrepareSemanticBatch:
    """``prepare_batch`` for MONAI engines: planes in, targets and tokenised reports out.

    Returns ``(image, targets, (), {"text": tokens})`` where ``targets`` holds ``label`` (N,) and
    ``semantics`` (N, F) value indices (``-1`` unknown), so losses and metrics see both.

    Args:
        model_name: open_clip architecture whose tokenizer to use.
        with_text: tokenise the ``text`` key (training and validation loss); ``False`` for inference.
        layout: semantic features whose ground truth to encode.
    """

    def __init__(self, model_name: str, with_text: bool = True, layout: PromptLayout | None = None) -> None:
        self.tokenizer = create_tokenizer(model_name) if with_text else None
        self.layout = layout or PromptLayout()

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        **_: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        image = torch.as_tensor(batchdata["image"]).to(device, non_blocking=non_blocking)
        batch_size = image.shape[0]
        targets = {
            "label": torch.as_tensor(batchdata["label"]).long().to(device),
            "semantics": self.layout.encode_targets(batchdata.get("semantics", {}), batch_size).to(device),
        }
        kwargs = {}
        if self.tokenizer is not None:
            kwargs["text"] = self.tokenizer(list(batchdata["text"])).to(device, non_blocking=non_blocking)
        return image, targets, (), kwargs


def loss_value(output: dict[str, Any]) -> float:
    """``output_transform`` of loss loggers: the scalar loss of a non-decollated training step."""
    return float(output["loss"])


def output_pair(output: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``output_transform`` of the metrics: the engine's (pred, label) of a non-decollated batch."""
    return output["pred"], output["label"]


class _EpochMetric(Metric):
    """Collects per-nodule tensors of an epoch; subclasses compute from the concatenation."""

    keys: tuple[str, ...] = ()

    def __init__(self, output_transform: Callable = output_pair) -> None:
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._store: dict[str, list[torch.Tensor]] = {key: [] for key in self.keys}

    def update(self, output: tuple[dict, dict]) -> None:
        pred, target = output
        for key, value in self.collect(pred, target).items():
            self._store[key].append(value.detach().cpu())

    @abstractmethod
    def collect(self, pred: dict, target: dict) -> dict[str, torch.Tensor]:
        """The tensors of one batch to keep, by key (first dimension = nodules)."""

    def gathered(self) -> dict[str, np.ndarray]:
        return {key: torch.cat(values).numpy() for key, values in self._store.items()}


def _binary_score(
    score: Callable[[np.ndarray, np.ndarray], float], labels: np.ndarray, probs: np.ndarray
) -> float:
    if len(np.unique(labels)) < 2:
        logger.warning("validation set has a single class: AUROC/AUPRC undefined, reported as NaN")
        return math.nan
    return float(score(labels, probs))


class MalignancyAUROC(_EpochMetric):
    """Area under the ROC curve of the image head's malignancy probability."""

    keys = ("probability", "label")
    score = staticmethod(roc_auc_score)

    def collect(self, pred: dict, target: dict) -> dict[str, torch.Tensor]:
        return {"probability": torch.softmax(pred["image_logits"], -1)[:, 1], "label": target["label"]}

    def compute(self) -> float:
        data = self.gathered()
        return _binary_score(self.score, data["label"], data["probability"])


class MalignancyAUPRC(MalignancyAUROC):
    """Area under the precision-recall curve (average precision) of the malignancy probability."""

    score = staticmethod(average_precision_score)


class ValidationLoss(_EpochMetric):
    """Nodule-weighted mean of the training loss on the validation set (needs the text branch).

    Args:
        loss: the training loss.
        output_transform: maps the engine output to ``(pred, targets)``.
    """

    keys = ("loss", "count")

    def __init__(self, loss: SemanticCLIPLoss, output_transform: Callable = output_pair) -> None:
        self.loss = loss
        super().__init__(output_transform)

    def collect(self, pred: dict, target: dict) -> dict[str, torch.Tensor]:
        count = len(target["label"])
        return {"loss": (self.loss(pred, target) * count).reshape(1), "count": torch.tensor([count])}

    def compute(self) -> float:
        data = self.gathered()
        return float(data["loss"].sum() / max(data["count"].sum(), 1))


class ZeroShotSemanticAUROC(_EpochMetric):
    """Mean zero-shot AUROC of the semantic features over the features the set annotates.

    Each feature's prompts are embedded once per epoch with the current network. Binary features use
    the probability of their second value; multi-valued ones the prevalence-weighted one-vs-rest AUROC.
    Per-feature values are also written to ``engine.state.metrics["<name>/<column>"]``.

    Args:
        network: the network being validated.
        layout: the semantic features.
        output_transform: maps the engine output to ``(pred, targets)``.
    """

    keys = ("embedding", "semantics")

    def __init__(
        self,
        network: SemanticCLIP,
        layout: PromptLayout | None = None,
        output_transform: Callable = output_pair,
    ) -> None:
        self.network = network
        self.layout = layout or PromptLayout()
        self.tokenizer = create_tokenizer(network.model_name)
        self.per_feature: dict[str, float] = {}
        super().__init__(output_transform)

    def collect(self, pred: dict, target: dict) -> dict[str, torch.Tensor]:
        return {"embedding": pred["image_embedding"], "semantics": target["semantics"]}

    def compute(self) -> float:
        data = self.gathered()
        device = next(self.network.parameters()).device
        with torch.no_grad():
            prompts = embed_prompts(self.network.encode_reports, self.tokenizer, self.layout, device)
            probabilities = (
                zero_shot_probabilities(
                    torch.as_tensor(data["embedding"], device=device),
                    prompts,
                    self.layout.group_sizes,
                    self.network.logit_scale,
                )
                .cpu()
                .numpy()
            )
        self.per_feature = semantic_aurocs(probabilities, data["semantics"], self.layout)
        scores = [v for v in self.per_feature.values() if not math.isnan(v)]
        return float(np.mean(scores)) if scores else math.nan

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        for column, value in self.per_feature.items():
            engine.state.metrics[f"{name}/{column}"] = value


def semantic_aurocs(probabilities: np.ndarray, targets: np.ndarray, layout: PromptLayout) -> dict[str, float]:
    """Zero-shot AUROC per feature with at least two observed values (NaN-free dict).

    Args:
        probabilities: ``(N, V)`` zero-shot value probabilities.
        targets: ``(N, F)`` value indices, ``-1`` unknown.
        layout: the features of both.
    """
    scores: dict[str, float] = {}
    offsets = np.cumsum([0, *layout.group_sizes])
    for j, feature in enumerate(layout.features):
        known = targets[:, j] >= 0
        observed = np.unique(targets[known, j])
        if len(observed) < 2:
            continue
        block = probabilities[known, offsets[j] : offsets[j + 1]][:, observed]
        block = block / block.sum(axis=1, keepdims=True)  # renormalise over the values observed
        truth = targets[known, j]
        if len(observed) == 2:
            scores[feature.column] = float(roc_auc_score(truth == observed[1], block[:, 1]))
        else:
            scores[feature.column] = float(
                roc_auc_score(truth, block, multi_class="ovr", average="weighted", labels=observed)
            )
    return scores


def stopping_score(metric: str, higher_is_better: bool = False) -> Callable[[Engine], float]:
    """Score function for MONAI's ``EarlyStopHandler`` from a validation metric (NaN counts as worst)."""

    def score(engine: Engine) -> float:
        value = float(engine.state.metrics[metric])
        if math.isnan(value):
            return -math.inf
        return value if higher_is_better else -value

    return score


class PredictionWriter:
    """Evaluator handler: one CSV row per nodule with the predictor's probabilities.

    Columns: ``pid``, ``nodule_id``, ``malignancy_probability``, then one ``<feature>=<value>``
    probability column per semantic value. Written to a temporary name and renamed at completion,
    so an interrupted run leaves no half-written file.

    Args:
        output_path: the CSV to write.
        layout: the semantic output layout of the predictor.
    """

    def __init__(self, output_path: str, layout: PromptLayout | None = None) -> None:
        self.output_path = Path(output_path)
        self.layout = layout or PromptLayout()
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        batch, pred = engine.state.batch, engine.state.output["pred"]
        semantic = pred["semantic"].detach().cpu().numpy()
        malignancy = pred["malignancy"].detach().cpu().numpy()
        names = [f"{c['feature']}={c['value']}" for c in self.layout.columns]
        for i, (pid, nodule_id) in enumerate(zip(batch["pid"], batch["nodule_id"], strict=True)):
            row = {"pid": pid, "nodule_id": nodule_id, "malignancy_probability": float(malignancy[i])}
            row.update(zip(names, semantic[i].tolist(), strict=True))
            self.rows.append(row)

    def write(self, _: Engine) -> None:
        with atomic_path(self.output_path) as temporary:
            pd.DataFrame(self.rows).to_csv(temporary, index=False, float_format="%.6f")
        logger.info("wrote %d predictions to %s", len(self.rows), self.output_path)
