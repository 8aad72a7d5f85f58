"""The authors' checkpoint layout, and random checkpoints written in it.

``training/data/reference_checkpoint.json`` lists every state-dict key and shape of the authors'
model (the LoRA and the full fine-tuning variant), with an ``args.txt`` example, as their
model-building code produces them: names and shapes only, no weights. :func:`write_checkpoint_dir`
writes ``args.txt`` and ``fold_<k>/best_both.pt`` exactly as the authors' ``train.py`` does, so the
same random folds can be run by their ``evaluate.py`` and imported by
:mod:`training.import_reference`: the benchmark study (``bench/make_benchmark_study.py``) and the
import tests use it.

Random LoRA folds are made as cross-validation leaves them: the frozen backbone is the same in
every fold (``backbone_seed``), and only the trainable tensors (the variant's
``trainable_parameter_groups``: LoRA matrices, projections, heads, logit scale) differ per fold.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import zlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

LAYOUT_FILE = Path(__file__).parent / "data" / "reference_checkpoint.json"
VARIANTS = ("lora", "ft")


@cache
def reference_layout() -> dict[str, Any]:
    """The whole layout record (see the module docstring)."""
    return json.loads(LAYOUT_FILE.read_text(encoding="utf-8"))


def reference_entries(variant: str) -> list[dict[str, Any]]:
    """Every ``{"key", "shape", "dtype"}`` of a variant's state dict, in the authors' order."""
    return reference_layout()["variants"][variant]["state_dict"]


def reference_shape(variant: str, key: str) -> tuple[int, ...]:
    return next(tuple(e["shape"]) for e in reference_entries(variant) if e["key"] == key)


def is_trainable(variant: str, key: str) -> bool:
    """Whether the authors' training updates ``key`` in this variant (full fine-tuning: every key)."""
    if variant == "ft":
        return True
    groups = reference_layout()["variants"][variant]["trainable_parameter_groups"]
    return any(fnmatch.fnmatch(key, group) or key.split(".")[0] == group for group in groups)


def _random_value(key: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    # one generator per key: a key's value depends on its name and seed only, not on the layout order
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    noise = torch.randn(tuple(shape), generator=generator)
    if key == "logit_scale":
        return torch.tensor(math.log(1 / 0.07))
    if len(shape) == 1 and key.endswith(".weight"):  # LayerNorm gains (and the class weights)
        return 1.0 + 0.1 * noise
    if "embedding" in key:
        return 0.1 * noise
    if re.search(r"\.w_lora_[AB]$", key):  # an update large enough to show if it is re-added
        return 0.5 * noise
    if key.startswith("classifier_"):  # spread the probabilities away from 0.5
        return 2.0 * noise
    return 0.05 * noise


def random_reference_state(
    variant: str,
    seed: int,
    *,
    backbone_seed: int | None = None,
    layout: Sequence[tuple[str, tuple[int, ...]]] | None = None,
) -> dict[str, torch.Tensor]:
    """A random state dict in the authors' layout.

    Args:
        variant: ``lora`` or ``ft``.
        seed: the seed of the trainable tensors (one per fold).
        backbone_seed: the seed of the frozen tensors (default: ``seed``); give every fold the same
            one to get LoRA folds that share their backbone, as cross-validation leaves them.
        layout: ``(key, shape)`` pairs to fill (default: the full ViT-B/32 layout of the variant).
    """
    frozen_seed = seed if backbone_seed is None else backbone_seed
    pairs = layout or [(e["key"], tuple(e["shape"])) for e in reference_entries(variant)]
    return {
        key: _random_value(key, shape, seed if is_trainable(variant, key) else frozen_seed)
        for key, shape in pairs
    }


def args_text(variant: str, folds: int, out_dim: int | None = None) -> str:
    """The authors' ``args.txt`` example for ``folds`` folds (and optionally another ``out_dim``)."""
    text = reference_layout()["variants"][variant]["args_txt_example"]
    if out_dim is not None:
        text = re.sub(r"\bout_dim=\d+", f"out_dim={out_dim}", text)
    return re.sub(r"\bk_end=\d+", f"k_end={folds}", text)


def write_checkpoint_dir(
    root: Path, variant: str, states: Sequence[dict[str, torch.Tensor]], text: str | None = None
) -> Path:
    """``args.txt`` + ``fold_<k>/best_both.pt`` (``{"model": state_dict}``) as the authors' train.py
    writes them; ``root`` must not exist."""
    root.mkdir(parents=True)
    (root / "args.txt").write_text(text or args_text(variant, len(states)), encoding="utf-8")
    for k, state in enumerate(states):
        (root / f"fold_{k}").mkdir()
        torch.save({"model": state}, root / f"fold_{k}" / "best_both.pt")
    return root
