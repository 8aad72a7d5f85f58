"""Zero-shot semantic findings: image embedding vs. one text prompt per feature value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from scripts.vocabulary import FEATURES, SemanticFeature


@dataclass(frozen=True)
class PromptLayout:
    """The prompts of the chosen features, flattened, and where each feature's values sit.

    Args:
        features: the semantic features to predict, in output order.
    """

    features: tuple[SemanticFeature, ...] = FEATURES

    @property
    def prompts(self) -> list[str]:
        return [value.prompt for feature in self.features for value in feature.values]

    @property
    def group_sizes(self) -> list[int]:
        return [len(feature.values) for feature in self.features]

    @property
    def columns(self) -> list[dict[str, str]]:
        """One ``{"feature": column, "value": name}`` per output column, in order."""
        return [{"feature": f.column, "value": v.name} for f in self.features for v in f.values]

    def value_index(self, feature: SemanticFeature, value: str) -> int:
        """Index of ``value`` among ``feature``'s values (``-1`` when missing/empty)."""
        names = [v.name for v in feature.values]
        return names.index(value) if value else -1

    def encode_targets(self, semantics: dict[str, Sequence[str]], batch_size: int) -> torch.Tensor:
        """Collated ``{column: [value or ""]}`` -> ``(N, F)`` value indices, ``-1`` where unknown."""
        targets = torch.full((batch_size, len(self.features)), -1, dtype=torch.long)
        for j, feature in enumerate(self.features):
            for i, value in enumerate(semantics.get(feature.column, [""] * batch_size)):
                targets[i, j] = self.value_index(feature, value)
        return targets


def zero_shot_probabilities(
    image_embedding: torch.Tensor,
    prompt_embedding: torch.Tensor,
    group_sizes: list[int],
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Per-feature softmax over the scaled cosine similarities with each value's prompt.

    Args:
        image_embedding: ``(N, D)`` L2-normalised image embeddings.
        prompt_embedding: ``(V, D)`` L2-normalised prompt embeddings, features' values concatenated.
        group_sizes: number of values of each feature (sums to V).
        logit_scale: the network's (exp'ed) logit scale.

    Returns:
        ``(N, V)`` probabilities; each feature's block sums to one.
    """
    logits = logit_scale * image_embedding @ prompt_embedding.t()
    return torch.cat([block.softmax(dim=-1) for block in logits.split(group_sizes, dim=-1)], dim=-1)


@torch.no_grad()
def embed_prompts(
    encode_reports: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    layout: PromptLayout,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Text embeddings ``(V, D)`` of every prompt of ``layout`` with the network's text branch."""
    return encode_reports(tokenizer(layout.prompts).to(device))
