"""The LoRA-CLIP network: LoRA placement and counts, merge/fuse, heads, loss, pretrained handling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scripts.clip_backbone import (
    LoRASettings,
    SplitQKVAttention,
    add_lora,
    create_clip,
    create_tokenizer,
    has_lora,
    merge_lora,
)
from scripts.errors import UserInputError
from scripts.network import AttentionMIL, SemanticCLIP, SemanticCLIPLoss, count_parameters

TINY = "lnsc-tiny-vit"


def randomise_lora(module: nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (a no-op update); give every adapter a real update."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def planes() -> torch.Tensor:
    return torch.randn(2, 9, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_vit_b32_has_the_papers_lora_parameter_count() -> None:
    clip = create_clip("ViT-B-32")
    add_lora(clip, LoRASettings())
    lora = sum(p.numel() for n, p in clip.named_parameters() if "lora_" in n)
    modules = {n.rsplit(".lora_", 1)[0] for n, _ in clip.named_parameters() if "lora_" in n}
    assert lora == 184_320
    assert len(modules) == 72  # q, k, v of 12 blocks in each of 2 towers


def test_vit_b32_trainable_parameters_match_the_authors_lora_model() -> None:
    network = SemanticCLIP("ViT-B-32")
    trainable, _ = count_parameters(network)
    # LoRA + MIL + projection + heads + logit scale, as in training/data/reference_checkpoint.json
    assert trainable == 547_334


@pytest.mark.parametrize(
    ("settings", "expected_modules"),
    [
        (LoRASettings(encoder="vision"), 2 * 3),
        (LoRASettings(encoder="text", matrices=("q", "v")), 2 * 2),
        (LoRASettings(encoder="both", blocks=[1]), 2 * 3),
    ],
)
def test_lora_placement_is_configurable(settings: LoRASettings, expected_modules: int) -> None:
    clip = create_clip(TINY)
    add_lora(clip, settings)
    modules = {n.rsplit(".lora_", 1)[0] for n, _ in clip.named_parameters() if "lora_" in n}
    assert len(modules) == expected_modules
    assert all(f".resblocks.{settings.blocks[0]}." in m for m in modules) if settings.blocks else True


def test_lora_mode_trains_only_adapters_and_heads() -> None:
    network = SemanticCLIP(TINY, tuning="lora")
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    for name in trainable:
        assert "lora_" in name or not name.startswith("clip.") or name == "clip.logit_scale", name
    assert any(n.startswith("image_projection.") for n in trainable)
    assert any(n.startswith("semantic_projection.") for n in trainable)
    assert {"classifier_image.weight", "classifier_text.weight", "clip.logit_scale"} <= trainable


def test_heads_mode_freezes_the_backbone_and_full_mode_trains_everything() -> None:
    heads = SemanticCLIP(TINY, tuning="heads")
    assert not any(
        p.requires_grad for n, p in heads.named_parameters() if n.startswith("clip.") and "logit" not in n
    )
    full = SemanticCLIP(TINY, tuning="full")
    assert all(p.requires_grad for p in full.parameters())
    assert not has_lora(full)


def test_split_attention_equals_multihead_attention() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    split = SplitQKVAttention.from_multihead(mha)
    x = torch.randn(3, 7, 64)
    mask = torch.full((7, 7), float("-inf")).triu(1)
    expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(split(x, x, x, attn_mask=mask)[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.to_multihead()(x, x, x, need_weights=False)[0], mha(x, x, x)[0])


def test_merged_equals_unmerged_and_keys_are_vanilla_open_clip(planes: torch.Tensor) -> None:
    torch.manual_seed(0)
    network = SemanticCLIP(TINY).eval()
    randomise_lora(network)
    tokens = create_tokenizer(TINY)(["A solid nodule.", "A part-solid nodule."])
    with torch.no_grad():
        before = network(planes, tokens)
        network.merge_adapters()
        after = network(planes, tokens)
    for key in ("image_embedding", "text_embedding", "image_logits", "text_logits", "attention"):
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=0)
    vanilla = create_clip(TINY).state_dict().keys()
    assert {k.removeprefix("clip.") for k in network.state_dict() if k.startswith("clip.")} == set(vanilla)


def test_lora_update_uses_rank_stabilised_scaling() -> None:
    clip = create_clip(TINY)
    add_lora(clip, LoRASettings(rank=2, alpha=1.0, blocks=[0], encoder="vision", matrices=("q",)))
    randomise_lora(clip)
    layer = clip.visual.transformer.resblocks[0].attn.q_proj
    base = layer.get_base_layer().weight.detach().clone()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (1.0 / math.sqrt(2))
    merge_lora(clip)
    fused = clip.visual.transformer.resblocks[0].attn.in_proj_weight[:64]
    torch.testing.assert_close(fused, base + delta)


def test_attention_mil_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    mil = AttentionMIL(8, 4, 3)
    x = torch.randn(2, 9, 8)
    h = torch.relu(x @ mil.projector[0].weight.t() + mil.projector[0].bias)
    scores = torch.tanh(h @ mil.attention[0].weight.t() + mil.attention[0].bias) @ mil.attention[2].weight.t()
    weights = torch.softmax(scores.squeeze(-1) + mil.attention[2].bias, dim=1)
    pooled, attention = mil(x)
    torch.testing.assert_close(attention, weights)
    torch.testing.assert_close(pooled, (weights.unsqueeze(-1) * h).sum(1))
    # permutation invariance over the planes
    permuted, _ = mil(x[:, torch.randperm(9)])
    torch.testing.assert_close(permuted, pooled)


def test_loss_matches_a_hand_computation() -> None:
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    outputs = {
        "image_embedding": image,
        "text_embedding": text,
        "logit_scale": torch.tensor(2.0),
        "image_logits": torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]]),
        "text_logits": torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 2.0]]),
    }
    labels = torch.tensor([0, 1, 1])

    def smoothed_ce(logits: torch.Tensor, eps: float = 0.1) -> float:
        n = logits.shape[1]
        total = 0.0
        for i, row in enumerate(logits.tolist()):
            log_z = math.log(sum(math.exp(v) for v in row))
            log_p = [v - log_z for v in row]
            total += -sum(((1 - eps) * (j == i) + eps / n) * log_p[j] for j in range(n))
        return total / len(logits)

    def ce(logits: torch.Tensor, targets: list[int]) -> float:
        rows = logits.tolist()
        return sum(
            math.log(sum(math.exp(v) for v in r)) - r[t] for r, t in zip(rows, targets, strict=True)
        ) / len(rows)

    similarity = 2.0 * image @ text.t()
    expected = (smoothed_ce(similarity) + smoothed_ce(similarity.t())) / 2
    expected += (ce(outputs["image_logits"], [0, 1, 1]) + ce(outputs["text_logits"], [0, 1, 1])) / 2
    loss = SemanticCLIPLoss(label_smoothing=0.1)(outputs, {"label": labels})
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_logit_scale_starts_at_inverse_temperature_and_is_clamped() -> None:
    network = SemanticCLIP(TINY, temperature=0.07)
    assert network.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        network.clip.logit_scale.fill_(10.0)
    assert network.logit_scale.item() == 100.0


def test_forward_without_text_gives_image_outputs_only(planes: torch.Tensor) -> None:
    network = SemanticCLIP(TINY).eval()
    with torch.no_grad():
        outputs = network(planes)
    assert set(outputs) == {"image_embedding", "attention", "image_logits", "logit_scale"}
    assert outputs["attention"].shape == (2, 9)
    torch.testing.assert_close(outputs["attention"].sum(1), torch.ones(2))
    torch.testing.assert_close(outputs["image_embedding"].norm(dim=1), torch.ones(2))


def test_bad_planes_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, P, 3, H, W\)"):
        SemanticCLIP(TINY)(torch.zeros(9, 3, 224, 224))


def test_pretrained_tag_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="local path"):
        create_clip("ViT-B-32", pretrained="openai")


def test_unknown_tag_and_missing_file_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserInputError, match="known tags"):
        create_clip(TINY, pretrained="no-such-tag")
    with pytest.raises(UserInputError, match="not found"):
        create_clip(TINY, pretrained=str(tmp_path / "missing.pt"))


def test_pretrained_local_file_is_loaded(tmp_path) -> None:
    source = create_clip(TINY)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    loaded = create_clip(TINY, pretrained=str(path))
    torch.testing.assert_close(loaded.visual.conv1.weight, source.visual.conv1.weight)
