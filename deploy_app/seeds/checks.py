"""Seeds checked against the CT series (frame of reference, extent, repeats, labels, count) and the
sources asked in order of precedence."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deploy_app.findings import NoduleSeed, SkippedSeed
from deploy_app.limits import MAX_SEEDS_PER_SERIES
from deploy_app.seeds.ct_series import CTSeriesInfo
from deploy_app.seeds.sources import DEFAULT_SOURCES, SeedSource
from scripts.errors import UserInputError

logger = logging.getLogger(__name__)

_DUPLICATE_DISTANCE_MM = 1e-3
#: Longest seed label kept (the DICOM LO length): it is the SR's Tracking Identifier and a report heading.
MAX_LABEL_CHARACTERS = 64


def _skip_reason(seed: NoduleSeed, ct: CTSeriesInfo) -> str | None:
    position = np.asarray(seed.position_lps, dtype=np.float64)
    if position.shape != (3,) or not np.all(np.isfinite(position)):
        return f"its position {seed.position_lps!r} is not 3 finite numbers"
    if seed.frame_of_reference_uid and seed.frame_of_reference_uid != ct.frame_of_reference_uid:
        return (
            f"its frame of reference {seed.frame_of_reference_uid} is not the CT series' "
            f"({ct.frame_of_reference_uid}); the point cannot be placed on this scan"
        )
    if not ct.contains(position):
        x, y, z = position
        return (
            f"({x:.1f}, {y:.1f}, {z:.1f}) mm LPS lies outside the scan, which spans "
            f"{ct.describe_extent()} mm LPS"
        )
    return None


_NEIGHBOUR_CELLS = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]


class _RepeatFinder:
    """Says whether a seed repeats an earlier one (same tracking UID, or in the same frame of
    reference within :data:`_DUPLICATE_DISTANCE_MM`), in constant time per seed.

    Positions are hashed into cubes of the duplicate distance: a repeat lies in the seed's cube or
    one of its 26 neighbours, so thousands of seeds are checked in linear time, not quadratic.
    """

    def __init__(self) -> None:
        self._tracking_uids: set[str] = set()
        self._cells: dict[tuple[str | None, int, int, int], list[np.ndarray]] = {}

    def seen(self, seed: NoduleSeed) -> bool:
        """True when ``seed`` repeats an earlier one; otherwise it is remembered."""
        if seed.tracking_uid and seed.tracking_uid in self._tracking_uids:
            return True
        position = np.asarray(seed.position_lps, dtype=np.float64)
        cell = None
        if position.shape == (3,) and np.isfinite(position).all():
            cell = tuple(math.floor(v / _DUPLICATE_DISTANCE_MM) for v in position)
            for di, dj, dk in _NEIGHBOUR_CELLS:
                key = (seed.frame_of_reference_uid, cell[0] + di, cell[1] + dj, cell[2] + dk)
                for other in self._cells.get(key, ()):
                    if np.linalg.norm(position - other) <= _DUPLICATE_DISTANCE_MM:
                        return True
        if seed.tracking_uid:
            self._tracking_uids.add(seed.tracking_uid)
        if cell is not None:
            self._cells.setdefault((seed.frame_of_reference_uid, *cell), []).append(position)
        return False


class _UniqueLabels:
    """``label``, then ``label (2)``, ``label (3)``... for repeats, in amortised constant time."""

    def __init__(self) -> None:
        self._used: set[str] = set()
        self._next_number: dict[str, int] = {}

    def __call__(self, label: str) -> str:
        candidate, number = label, self._next_number.get(label, 2)
        while candidate in self._used:
            candidate, number = f"{label} ({number})", number + 1
        self._next_number[label] = number
        self._used.add(candidate)
        return candidate


def check_seeds(seeds: Sequence[NoduleSeed], ct: CTSeriesInfo) -> tuple[list[NoduleSeed], list[SkippedSeed]]:
    """Split seeds into usable and skipped ones; drop repeats; make labels unique.

    Args:
        seeds: seeds of one source.
        ct: the CT series.

    Returns:
        ``(usable, skipped)``; usable seeds carry the CT's frame of reference UID.
    """
    usable: list[NoduleSeed] = []
    skipped: list[SkippedSeed] = []
    repeats = _RepeatFinder()
    unique_label = _UniqueLabels()
    for seed in seeds:
        if repeats.seen(seed):
            logger.info("%s: repeats an earlier seed; used once", seed.source)
            continue
        label = seed.label
        if len(label) > MAX_LABEL_CHARACTERS:
            label = label[: MAX_LABEL_CHARACTERS - 3] + "..."
            logger.warning(
                "%s: label of %d characters cut to %d", seed.source, len(seed.label), MAX_LABEL_CHARACTERS
            )
        label = unique_label(label)
        reason = _skip_reason(seed, ct)
        if reason is None:
            usable.append(
                NoduleSeed(
                    position_lps=tuple(float(v) for v in seed.position_lps),  # type: ignore[arg-type]
                    label=label,
                    source=seed.source,
                    frame_of_reference_uid=ct.frame_of_reference_uid,
                    tracking_uid=seed.tracking_uid,
                )
            )
        else:
            relabelled = NoduleSeed(
                seed.position_lps, label, seed.source, seed.frame_of_reference_uid, seed.tracking_uid
            )
            skipped.append(SkippedSeed(relabelled, reason))
    return usable, skipped


def find_seeds(
    input_dir: str | Path,
    ct: CTSeriesInfo,
    sources: Sequence[SeedSource] = DEFAULT_SOURCES,
    max_seeds: int = MAX_SEEDS_PER_SERIES,
) -> tuple[list[NoduleSeed], list[SkippedSeed], str]:
    """The seeds of one CT series: those of the first source that has a usable one.

    Args:
        input_dir: the app's input folder.
        ct: the CT series.
        sources: sources in order of precedence.
        max_seeds: most usable seeds accepted for the series.

    Returns:
        ``(seeds, skipped, source name)``: the usable seeds (frame set to the CT's), the skipped
        seeds of the same source with their reasons, and the name of the source used.

    Raises:
        UserInputError: no source has a usable seed for the series (names the folder, what each
            source found, and the accepted seed sources), or more than ``max_seeds`` are usable.
    """
    folder = Path(input_dir)
    findings: list[str] = []
    for source in sources:
        found = source.find(folder, ct) or []
        if not found:
            findings.append(f"{source.name}: none")
            continue
        usable, skipped = check_seeds(found, ct)
        for item in skipped:
            logger.warning("seed %s (%s) skipped: %s", item.seed.label, item.seed.source, item.reason)
        if len(usable) > max_seeds:
            raise UserInputError(
                f"CT series {ct.series_instance_uid}: {source.name} gives {len(usable)} usable seeds, "
                f"more than the {max_seeds} analysed per series; send fewer seeds or raise the limit "
                "(--max-seeds)"
            )
        if usable:
            logger.info(
                "CT series %s: %d seed(s) from %s%s",
                ct.series_instance_uid,
                len(usable),
                source.name,
                f", {len(skipped)} skipped" if skipped else "",
            )
            return usable, skipped, source.name
        reasons = "; ".join(f"{s.seed.source}: {s.reason}" for s in skipped)
        findings.append(f"{source.name}: {len(skipped)} seed(s), none usable ({reasons})")
    accepted = "; ".join(f"({k}) {s.name}" for k, s in enumerate(sources, start=1))
    raise UserInputError(
        f"input folder {folder}: no usable nodule seed for CT series {ct.series_instance_uid} "
        f"({'; '.join(findings)}). Give the seeds as, in order of precedence: {accepted}"
    )
