"""training.reference_layout: random checkpoints in the authors' layout, LoRA folds sharing a backbone."""

from __future__ import annotations

from pathlib import Path

import torch

from training.import_reference import parse_args_text
from training.reference_layout import (
    args_text,
    is_trainable,
    random_reference_state,
    reference_entries,
    write_checkpoint_dir,
)


def _small_layout() -> list[tuple[str, tuple[int, ...]]]:
    """A few keys of each kind (the full ViT-B/32 state is 600 MB)."""
    keys = [
        "logit_scale",
        "vision_model.class_embedding",
        "vision_model.transformer.resblocks.0.ln_1.weight",
        "vision_model.transformer.resblocks.0.attn.q_proj.w_lora_A",
        "vision_model.transformer.resblocks.0.attn.q_proj.weight",
        "classifier_image.weight",
    ]
    shapes = {e["key"]: tuple(e["shape"]) for e in reference_entries("lora")}
    return [(key, shapes[key]) for key in keys]


def test_trainable_groups_follow_the_variant() -> None:
    assert is_trainable("lora", "vision_model.transformer.resblocks.0.attn.q_proj.w_lora_B")
    assert is_trainable("lora", "classifier_image.weight") and is_trainable("lora", "logit_scale")
    assert not is_trainable("lora", "vision_model.transformer.resblocks.0.attn.q_proj.weight")
    assert is_trainable("ft", "vision_model.transformer.resblocks.0.attn.q_proj.weight")


def test_lora_folds_share_the_frozen_backbone_and_differ_in_the_rest() -> None:
    layout = _small_layout()
    first = random_reference_state("lora", 1, backbone_seed=0, layout=layout)
    second = random_reference_state("lora", 2, backbone_seed=0, layout=layout)
    assert [key for key, _ in layout] == list(first)
    for key, shape in layout:
        assert first[key].shape == shape
        same = torch.equal(first[key], second[key])
        assert same == (not is_trainable("lora", key) or key == "logit_scale"), key
    again = random_reference_state("lora", 1, backbone_seed=0, layout=layout)
    assert all(torch.equal(first[k], again[k]) for k in first)  # reproducible from the seeds


def test_the_checkpoint_folder_is_what_the_authors_train_py_writes(tmp_path: Path) -> None:
    layout = _small_layout()
    states = [random_reference_state("lora", k, backbone_seed=0, layout=layout) for k in range(2)]
    root = write_checkpoint_dir(tmp_path / "ckpt", "lora", states)
    assert sorted(p.name for p in root.iterdir()) == ["args.txt", "fold_0", "fold_1"]
    loaded = torch.load(root / "fold_1" / "best_both.pt", weights_only=True)
    assert list(loaded) == ["model"] and all(torch.equal(loaded["model"][k], states[1][k]) for k in states[1])
    args = parse_args_text((root / "args.txt").read_text())
    assert args["k_end"] == 2
    assert parse_args_text(args_text("lora", 5, out_dim=32))["out_dim"] == 32
