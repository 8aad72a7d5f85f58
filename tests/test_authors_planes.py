"""Regression against nine-plane tensors made by the authors' own pipeline (data-only fixture).

See ``tests/data/authors_planes/README.md``: an exact trilinear sampler through the seed differs from
their cubic rotation about the array centre by 0.008-0.013 mean absolute per plane (nodule 0).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import TEST_DATA
from scripts.transforms import CLIPNormalize, LoadCT, nine_planes_for_seeds

FOLDER = TEST_DATA / "authors_planes"


@pytest.fixture(scope="module")
def case():
    with open(FOLDER / "nodules.csv", newline="") as handle:
        rows = {int(row["nodule_id"]): row for row in csv.DictReader(handle)}
    volume = LoadCT(base_dir=FOLDER)(rows[0]["image_path"])
    seeds = {n: [float(rows[n][k]) for k in ("coordX", "coordY", "coordZ")] for n in rows}
    return volume, seeds


def authors_unit_planes(nodule: int) -> np.ndarray:
    """The fixture (9, 3, 224, 224) CLIP-normalised -> (9, 224, 224) on the [0, 1] scale.

    Stored as float16 (at most 2.6e-4 from the authors' float32 on the [0, 1] scale, far below the
    bounds below; see the data README).
    """
    fixture = torch.from_numpy(np.load(FOLDER / f"planes_900001_{nodule}.npz")["planes"].astype(np.float32))
    assert fixture.shape == (9, 3, 224, 224)
    return CLIPNormalize().inverse(fixture).numpy()


def ours_unit_planes(volume, seed, pad_value: float = -1000.0) -> np.ndarray:
    out = nine_planes_for_seeds(volume, [seed], pid=900001, pad_value=pad_value)
    assert out.shape == (1, 9, 3, 224, 224) and out.dtype == torch.float32
    return CLIPNormalize().inverse(out[0]).numpy()


def per_plane(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).mean(axis=(1, 2))


def test_nodule_0_matches_the_authors_planes(case):
    volume, seeds = case
    diffs = per_plane(ours_unit_planes(volume, seeds[0]), authors_unit_planes(0))
    assert np.all(diffs <= 0.015), f"per-plane mean abs diffs {np.round(diffs, 4)}"


def test_nodule_1_off_the_scan(case):
    """Nodule 1's cube runs off the scan: the scan ends 21 mm left of and 18 mm superior to the seed,
    inside the planes' 25 mm half-width.

    With our air padding the off-scan part of the planes is 0 where the authors' is 0.667 (0 HU),
    so a full-plane comparison is meaningless. Here we check (1) our planes are finite and in [0, 1]
    (the authors' un-normalised ones are finite, with cubic-spline overshoot just outside); (2) with
    the authors' pad (0 HU) we match them within 0.04 per plane: the rest is their int() truncation
    of the seed voxel (0.35-0.65 mm here, in textured lung); (3) with their truncated seed as well,
    within 0.025.
    """
    volume, seeds = case
    ours = ours_unit_planes(volume, seeds[1])
    theirs = authors_unit_planes(1)
    assert np.isfinite(ours).all() and ours.min() >= 0.0 and ours.max() <= 1.0
    # theirs: the cubic-spline rotation overshoots at the pad edge (0.667 next to air), to about -0.08
    assert np.isfinite(theirs).all() and theirs.min() >= -0.15 and theirs.max() <= 1.15
    assert ours.min() == 0.0  # air outside the scan
    as_padded = per_plane(ours_unit_planes(volume, seeds[1], pad_value=0.0), theirs)
    assert np.all(as_padded <= 0.04), f"per-plane mean abs diffs {np.round(as_padded, 4)}"
    origin = np.array(
        [-97.35, -112.15, -331.5]
    )  # voxel (0, 0, 0) in LPS, spacing 1 mm after their resampling
    truncated = origin + np.floor(np.asarray(seeds[1]) - origin)
    as_theirs = per_plane(ours_unit_planes(volume, truncated, pad_value=0.0), theirs)
    assert np.all(as_theirs <= 0.025), f"per-plane mean abs diffs {np.round(as_theirs, 4)}"
