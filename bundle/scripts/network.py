"""The semantic-guided CLIP network of Zhuang et al. (2025) and its loss.

Nine planes per nodule go through the CLIP image tower (shared weights), attention-MIL pooling makes
one image embedding; a report goes through the CLIP text tower and a projection head. Both are
L2-normalised, aligned by a symmetric contrastive loss, and each feeds a two-class head.
Module names (``image_projection``, ``semantic_projection``, ``classifier_image``, ...) follow the
authors' checkpoints so their weights map one to one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scripts.clip_backbone import LoRASettings, add_lora, create_clip, has_lora, merge_lora

logger = logging.getLogger(__name__)

TUNING_MODES = ("lora", "full", "heads")


class AttentionMIL(nn.Module):
    """Attention-based multiple-instance pooling (Ilse et al. 2018) over the planes of a nodule.

    Args:
        in_dim: instance feature width (the CLIP embedding width).
        out_dim: pooled embedding width.
        hidden_dim: width of the attention network.
    """

    def __init__(self, in_dim: int = 512, out_dim: int = 256, hidden_dim: int = 128) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())
        self.attention = nn.Sequential(nn.Linear(out_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool ``(N, P, in_dim)`` instances into ``(N, out_dim)``; also return the ``(N, P)`` weights."""
        projected = self.projector(instances)
        weights = torch.softmax(self.attention(projected).squeeze(-1), dim=1)
        return torch.einsum("np,npd->nd", weights, projected), weights


class ProjectionHead(nn.Module):
    """Text projection head: Linear, GELU, Linear, dropout, residual to the first projection, LayerNorm.

    Args:
        in_dim: input width (the CLIP text embedding width).
        out_dim: output width.
        dropout: dropout probability before the residual add.
    """

    def __init__(self, in_dim: int = 512, out_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.projection(features)
        return self.layer_norm(self.dropout(self.fc(self.gelu(projected))) + projected)


class SemanticCLIP(nn.Module):
    """CLIP image and text towers with MIL pooling, projection heads and two malignancy heads.

    ``forward(image)`` needs no text (inference); ``forward(image, text)`` also embeds the tokenised
    reports (training). Both return a dict of tensors:

    - ``image_embedding`` (N, D), L2-normalised; ``attention`` (N, P) MIL weights over the planes;
      ``image_logits`` (N, 2); ``logit_scale`` (scalar, exp'ed and clamped at 100);
    - with text: ``text_embedding`` (N, D) and ``text_logits`` (N, 2).

    Args:
        model_name: open_clip architecture: ``ViT-B-32-quickgelu`` is the paper's OpenAI ViT-B/32
            (QuickGELU, as its ``openai`` weights need); the bundle also ships a tiny config.
        pretrained: open_clip tag (``openai``), local checkpoint file, or ``None`` for random weights.
        embed_dim: width of the joint image/text embedding.
        mil_hidden_dim: width of the MIL attention network.
        dropout: dropout of the text projection head.
        temperature: initial contrastive temperature (the logit scale starts at 1 / temperature).
        tuning: ``lora`` (LoRA adapters + heads train), ``full`` (everything trains) or ``heads``
            (the backbone is frozen).
        lora_rank, lora_alpha, lora_dropout, lora_encoder, lora_blocks, lora_matrices: see
            :class:`scripts.clip_backbone.LoRASettings`.
        model_config_dir: extra folder of open_clip JSON architectures.
    """

    max_logit_scale = 100.0

    def __init__(
        self,
        model_name: str = "ViT-B-32-quickgelu",
        pretrained: str | None = None,
        embed_dim: int = 256,
        mil_hidden_dim: int = 128,
        dropout: float = 0.1,
        temperature: float = 0.07,
        tuning: str = "lora",
        lora_rank: int = 2,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.25,
        lora_encoder: str = "both",
        lora_blocks: Sequence[int] | None = None,
        lora_matrices: Sequence[str] = ("q", "k", "v"),
        model_config_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if tuning not in TUNING_MODES:
            raise ValueError(f"tuning must be one of {TUNING_MODES}, got '{tuning}'")
        self.model_name = model_name
        self.tuning = tuning
        self.clip = create_clip(model_name, pretrained, model_config_dir)
        clip_dim = self.clip.text_projection.shape[1]
        with torch.no_grad():
            self.clip.logit_scale.fill_(math.log(1.0 / temperature))
        self.image_projection = AttentionMIL(clip_dim, embed_dim, mil_hidden_dim)
        self.semantic_projection = ProjectionHead(clip_dim, embed_dim, dropout)
        self.classifier_image = nn.Linear(embed_dim, 2)
        self.classifier_text = nn.Linear(embed_dim, 2)

        if tuning == "lora":
            settings = LoRASettings(
                lora_rank, lora_alpha, lora_dropout, lora_encoder, lora_blocks, lora_matrices
            )
            add_lora(self.clip, settings)
        if tuning == "heads":
            self.clip.requires_grad_(False)
        if tuning in ("lora", "heads"):
            # The contrastive temperature is a head parameter in the paper's lora and heads modes.
            self.clip.logit_scale.requires_grad_(True)
        trainable, total = count_parameters(self)
        logger.info(
            "SemanticCLIP %s, tuning=%s: %s trainable of %s parameters (%.3f%%)",
            model_name,
            tuning,
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / total,
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=self.max_logit_scale)

    def encode_planes(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, P, 3, H, W)`` planes -> L2-normalised ``(N, D)`` embedding and ``(N, P)`` MIL weights."""
        if image.ndim != 5:
            raise ValueError(f"expected planes of shape (N, P, 3, H, W), got {tuple(image.shape)}")
        batch, planes = image.shape[:2]
        features = self.clip.encode_image(image.flatten(0, 1)).view(batch, planes, -1)
        embedding, attention = self.image_projection(features)
        return F.normalize(embedding, dim=-1), attention

    def encode_reports(self, text: torch.Tensor) -> torch.Tensor:
        """Tokenised reports or prompts ``(N, L)`` -> L2-normalised ``(N, D)`` text embedding."""
        return F.normalize(self.semantic_projection(self.clip.encode_text(text)), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image_embedding, attention = self.encode_planes(image)
        outputs = {
            "image_embedding": image_embedding,
            "attention": attention,
            "image_logits": self.classifier_image(image_embedding),
            "logit_scale": self.logit_scale,
        }
        if text is not None:
            text_embedding = self.encode_reports(text)
            outputs["text_embedding"] = text_embedding
            outputs["text_logits"] = self.classifier_text(text_embedding)
        return outputs

    def merge_adapters(self) -> None:
        """Fold LoRA into the backbone and restore vanilla open_clip attention modules (in place)."""
        if has_lora(self.clip):
            merge_lora(self.clip)


class MalignancyProbabilities(nn.Module):
    """Image-only view of a :class:`SemanticCLIP`: planes -> ``(N, 2)`` class probabilities.

    The shape MONAI's ``verify_net_in_out`` and plain classification inferers expect.

    Args:
        network: the semantic CLIP network.
    """

    def __init__(self, network: SemanticCLIP) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(image)["image_logits"], dim=-1)


class SemanticCLIPLoss(nn.Module):
    """Label-smoothed symmetric contrastive loss plus the mean of the image and text head losses.

    ``loss = w_clip * (CE(s I T^T, i) + CE(s T I^T, i)) / 2 + (w_img * CE_img + w_txt * CE_txt) / 2``

    Args:
        label_smoothing: label smoothing of the contrastive cross-entropies.
        clip_weight: weight of the contrastive term.
        image_weight: weight of the image-head cross-entropy.
        text_weight: weight of the text-head cross-entropy.
    """

    def __init__(
        self,
        label_smoothing: float = 0.1,
        clip_weight: float = 1.0,
        image_weight: float = 1.0,
        text_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.clip_weight = clip_weight
        self.image_weight = image_weight
        self.text_weight = text_weight

    def terms(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term and the total, for logging."""
        image, text = outputs["image_embedding"], outputs["text_embedding"]
        logits = outputs["logit_scale"] * image @ text.t()
        targets = torch.arange(len(image), device=image.device)
        contrastive = (
            F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits.t(), targets, label_smoothing=self.label_smoothing)
        ) / 2
        labels = labels.long().view(-1)
        image_ce = F.cross_entropy(outputs["image_logits"], labels)
        text_ce = F.cross_entropy(outputs["text_logits"], labels)
        total = (
            self.clip_weight * contrastive + (self.image_weight * image_ce + self.text_weight * text_ce) / 2
        )
        return {"contrastive": contrastive, "image_ce": image_ce, "text_ce": text_ce, "total": total}

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor | dict) -> torch.Tensor:
        labels = targets["label"] if isinstance(targets, dict) else targets
        return self.terms(outputs, labels)["total"]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
