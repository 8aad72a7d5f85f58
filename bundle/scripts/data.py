"""Dataset items and sampling for the bundle workflows (configs wire these; no logic in JSON)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from monai.data import DistributedWeightedRandomSampler
from torch.utils.data import WeightedRandomSampler

from scripts.cohort import read_cohort, select
from scripts.errors import UserInputError
from scripts.split_folder import read_split

logger = logging.getLogger(__name__)

SUBSETS = ("train", "val", "all")


def cohort_items(
    csv_path: str | Path,
    subset: str = "all",
    split_dir: str | Path | None = None,
    fold: int = 0,
    report_dir: str | Path | None = None,
    require_label: bool = True,
) -> list[dict]:
    """Dataset items of a cohort CSV, optionally restricted to one side of a patient-level split.

    Args:
        csv_path: the cohort CSV (see docs/semantic_schema.md).
        subset: ``train`` or ``val`` (needs ``split_dir``), or ``all``.
        split_dir: folder with ``fold_k/train_pid.csv`` and ``fold_k/val_pid.csv``.
        fold: the fold k.
        report_dir: optional folder of ``{pid}_{nodule_id}.txt`` reports used instead of the template.
        require_label: whether the ``malignant`` column must be present and 0/1.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got '{subset}'")
    records = read_cohort(csv_path, require_label=require_label)
    if subset != "all":
        if split_dir is None:
            raise UserInputError(f"subset '{subset}' needs a split folder (split_dir)")
        train_pids, val_pids = read_split(Path(split_dir), fold)
        records = select(records, train_pids if subset == "train" else val_pids)
        if not records:
            raise UserInputError(
                f"fold {fold} of {split_dir} selects no nodule of {csv_path} for '{subset}': "
                "do the split's pids match the CSV's?"
            )
    report_dir = Path(report_dir) if report_dir else None
    items = [record.as_item(report_dir) for record in records]
    labels = Counter(item["label"] for item in items)
    logger.info("%s: %d nodules (%s) for '%s'", Path(csv_path).name, len(items), dict(labels), subset)
    return items


def class_weights(items: list[dict]) -> torch.Tensor:
    """Per-nodule sampling weight, inversely proportional to its class frequency."""
    labels = [int(item["label"]) for item in items]
    counts = Counter(labels)
    if len(counts) < 2:
        raise UserInputError(f"the training set has a single class ({dict(counts)}): both labels are needed")
    return torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)


def class_balanced_sampler(items: list[dict], seed: int = 0) -> WeightedRandomSampler:
    """Class-balanced sampling with replacement, one epoch = as many draws as nodules."""
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        class_weights(items), num_samples=len(items), replacement=True, generator=generator
    )


def distributed_class_balanced_sampler(items: list[dict], seed: int = 0) -> DistributedWeightedRandomSampler:
    """:func:`class_balanced_sampler` for ``torch.distributed``: each rank draws its share."""
    generator = torch.Generator().manual_seed(seed)
    return DistributedWeightedRandomSampler(
        dataset=items, weights=class_weights(items).tolist(), generator=generator, shuffle=False
    )
