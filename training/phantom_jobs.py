"""Phantom jobs: what to render for each LIDC table row or parametric phantom (no rendering here).

A :class:`PhantomJob` holds everything one phantom needs (the nodule mask or parametric description,
its look, spacings, label, semantic columns and provenance) and is picklable for worker processes.
The rules (pleural-attachment draw, LIDC ratings -> look, parametric label and feature draws, the
per-phantom seed, the seeded ``--limit`` selection) are described in :mod:`training.phantoms`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from scripts.errors import UserInputError
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES
from training.phantom_nodules import (
    GROUND_GLASS,
    LIDC_CALCIFICATION,
    MARGINS,
    PART_SOLID,
    SHAPES,
    SOLID,
    NoduleLook,
    ParametricNodule,
)
from training.phantom_render import SceneSettings

#: Slices of a parametric --full-size phantom cover this much (mm).
FULL_SIZE_PARAMETRIC_Z_MM = 300.0


def _spelled(column: str, value: str) -> str:
    """The vocabulary's canonical spelling (fails at import when the vocabulary lacks it)."""
    return FEATURE_BY_COLUMN[column].value(value).name


PRESENT = _spelled("pleural_attachment", "Present")
ABSENT = _spelled("pleural_attachment", "Absent")
_SHAPE_VALUE = {
    "round": _spelled("nodule_shape", "Round"),
    "ovoid": _spelled("nodule_shape", "Ovoid"),
    "irregular": _spelled("nodule_shape", "Complex/Irregular"),
}
_MARGIN_VALUE = {
    "smooth": _spelled("nodule_margins", "Smooth"),
    "lobulated": _spelled("nodule_margins", "Lobulated"),
    "spiculated": _spelled("nodule_margins", "Spiculated/Serrated"),
}
_WELL = _spelled("nodule_margin_conspicuity", "Well marginated")
_POORLY = _spelled("nodule_margin_conspicuity", "Poorly marginated")
for _consistency in (SOLID, PART_SOLID, GROUND_GLASS):
    _spelled("nodule_consistency", _consistency)


# --------------------------------------------------------------------------------------------------
# settings and jobs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomSettings:
    """How phantoms are placed and rendered (everything that changes the voxels).

    Attributes:
        fov_mm: edge of the default field of view (in-plane and along z).
        full_size: 512 x 512 in-plane with the scan's slice count instead of the field of view.
        max_offset_mm: largest offset of the nodule centroid from the volume centre, per axis.
        min_offset_mm: smallest length of that offset (the seed is never the volume centre).
        chest_wall: draw the pleura and chest wall.
        pleural_fraction: share of LIDC nodules placed touching the pleura.
        attach_overlap_mm: how far an attached nodule reaches into the wall.
        clearance_mm: gap between a non-attached nodule and the pleura.
        pleura_radius_mm: radius of the spherical pleural surface.
        clevel: pylidc consensus level.
        scene: the renderer's ranges.
    """

    fov_mm: float = 120.0
    full_size: bool = False
    max_offset_mm: float = 15.0
    min_offset_mm: float = 3.0
    chest_wall: bool = True
    pleural_fraction: float = 0.3
    attach_overlap_mm: tuple[float, float] = (0.5, 1.5)
    clearance_mm: tuple[float, float] = (5.0, 30.0)
    pleura_radius_mm: tuple[float, float] = (120.0, 200.0)
    clevel: float = 0.5
    scene: SceneSettings = field(default_factory=SceneSettings)

    def digest(self) -> str:
        """Short hash of the settings (part of every UID seed)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_SETTINGS = PhantomSettings()


@dataclass(frozen=True)
class FullSizePlacement:
    """Where a LIDC mask sits in its scan (for ``--full-size``)."""

    scan_slices: int
    corner: tuple[int, int, int]
    first_slice_z: float


@dataclass(frozen=True)
class PhantomJob:
    """Everything needed to render and write one phantom (picklable, for worker processes).

    Attributes:
        phantom_id: file name of the image (``<pid>_<nodule id>``).
        pid: cohort patient id (synthetic).
        nodule_id: cohort nodule id.
        phantom_seed: seed of the phantom's generators.
        look: how the nodule is filled.
        pleural_attachment: the nodule touches the pleura.
        pixel_spacing: in-plane spacing (mm).
        slice_spacing: slice spacing (mm).
        slice_thickness: DICOM SliceThickness (mm).
        malignant: label, or ``None``.
        semantics: the 17 UCLA columns as written (overrides applied by :func:`phantom_row`).
        provenance: provenance cells (text).
        mask: LIDC consensus mask ``(slices, rows, columns)``, or ``None`` for a parametric nodule.
        parametric: the parametric nodule, or ``None``.
        full_size: LIDC placement for ``--full-size``, or ``None``.
    """

    phantom_id: str
    pid: str
    nodule_id: str
    phantom_seed: int
    look: NoduleLook
    pleural_attachment: bool
    pixel_spacing: float
    slice_spacing: float
    slice_thickness: float
    malignant: int | None
    semantics: dict[str, str | None]
    provenance: dict[str, str]
    mask: np.ndarray | None = None
    parametric: ParametricNodule | None = None
    full_size: FullSizePlacement | None = None


def phantom_seed(seed: int, pid: str, nodule_id: str) -> int:
    """The seed of one phantom: a 63-bit hash of ``(seed, pid, nodule_id)``.

    Args:
        seed: the run's ``--seed``.
        pid: source patient id (the LIDC pid, or the parametric phantom's pid).
        nodule_id: nodule id within the patient.

    Returns:
        a non-negative integer, stable across runs and machines.
    """
    digest = hashlib.sha256(f"{int(seed)}|{pid}|{nodule_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def phantom_generator(seed: int, stream: int) -> np.random.Generator:
    """Independent random streams of one phantom: 0 decisions, 1 placement, 2 rendering.

    Args:
        seed: the phantom's seed (:func:`phantom_seed`).
        stream: which stream.

    Returns:
        a generator seeded with ``[seed, stream]``.
    """
    return np.random.default_rng([seed, stream])


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "phantom"


# --------------------------------------------------------------------------------------------------
# LIDC jobs
# --------------------------------------------------------------------------------------------------


def _calcification_pattern(rating: float | None, eccentric: str | None) -> str:
    if rating is not None and round(rating) in LIDC_CALCIFICATION:
        return LIDC_CALCIFICATION[int(round(rating))]
    return "eccentric" if eccentric == PRESENT else "none"


def lidc_job(nodule: Any, mask: Any, seed: int, settings: PhantomSettings) -> PhantomJob:
    """The job of one LIDC table row with its consensus mask.

    Args:
        nodule: a :class:`training.phantom_lidc.LidcNodule`.
        mask: its :class:`training.phantom_lidc.ConsensusMask`.
        seed: the run's seed.
        settings: placement settings (the pleural fraction).

    Returns:
        the job.
    """
    own_seed = phantom_seed(seed, nodule.pid, nodule.nodule_id)
    attached = settings.chest_wall and phantom_generator(own_seed, 0).uniform() < settings.pleural_fraction
    semantics = dict(nodule.semantics)
    look = NoduleLook(
        consistency=semantics.get("nodule_consistency") or SOLID,
        calcification=_calcification_pattern(
            nodule.ratings.get("lidc_calcification"), semantics.get("eccentric_calcification")
        ),
        poorly_marginated=semantics.get("nodule_margin_conspicuity") == _POORLY,
        cyst_like_spaces=semantics.get("cyst-like_spaces") == PRESENT,
    )
    pid = f"PHANTOM-{nodule.pid}"
    ratings = nodule.ratings
    provenance = {
        "source": "lidc",
        "lidc_pid": nodule.pid,
        "lidc_nodule_id": nodule.nodule_id,
        "scan_id": str(nodule.scan_id),
        "lidc_series_instance_uid": nodule.extra.get("series_instance_uid", ""),
        "annotation_ids": ";".join(map(str, nodule.annotation_ids)),
        "reader_count": nodule.extra.get("reader_count") or str(len(nodule.annotation_ids)),
        "lidc_malignancy": format_number(ratings.get("lidc_malignancy")),
        "lidc_calcification": format_number(ratings.get("lidc_calcification")),
        "lidc_texture": format_number(ratings.get("lidc_texture")),
        "lidc_mean_diameter": nodule.extra.get("mean_diameter", ""),
        "label_policy": nodule.extra.get("label_policy", ""),
    }
    return PhantomJob(
        phantom_id=_safe_name(f"{pid}_{nodule.nodule_id}"),
        pid=pid,
        nodule_id=nodule.nodule_id,
        phantom_seed=own_seed,
        look=look,
        pleural_attachment=attached,
        pixel_spacing=nodule.pixel_spacing,
        slice_spacing=nodule.slice_spacing,
        slice_thickness=nodule.slice_thickness,
        malignant=nodule.malignant,
        semantics=semantics,
        provenance=provenance,
        mask=mask.mask,
        full_size=FullSizePlacement(mask.scan_slices, mask.corner, mask.first_slice_z)
        if settings.full_size
        else None,
    )


def format_number(value: float | None, decimals: int = 3) -> str:
    """A short decimal for the CSV: 4.0 -> "4", 3.14159 -> "3.142"; None or NaN -> ""."""
    if value is None or not math.isfinite(value):
        return ""
    text = f"{round(float(value), decimals):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# --------------------------------------------------------------------------------------------------
# parametric jobs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParametricChoices:
    """Values fixed for every parametric phantom (``None``: drawn per phantom).

    Attributes:
        diameter_mm, shape, margin, consistency, calcification, pleural_attachment: the nodule.
        pixel_spacing, slice_spacing: the grid.
        malignant: the label.
    """

    diameter_mm: float | None = None
    shape: str | None = None
    margin: str | None = None
    consistency: str | None = None
    calcification: str | None = None
    pleural_attachment: bool | None = None
    pixel_spacing: float | None = None
    slice_spacing: float | None = None
    malignant: int | None = None


def _pick(rng: np.random.Generator, values: Sequence[str], weights: Sequence[float]) -> str:
    return str(values[int(rng.choice(len(values), p=np.asarray(weights) / np.sum(weights)))])


def draw_parametric(rng: np.random.Generator, choices: ParametricChoices) -> tuple[ParametricNodule, int]:
    """Draw a parametric nodule and its synthetic label.

    The label comes first (fair coin); malignant nodules are drawn larger and more often
    spiculated, lobulated, irregular, part-solid and poorly marginated, benign ones smaller,
    smoother, sometimes calcified: a learnable synthetic task, not a clinical model. Every value is
    drawn even when fixed by ``choices``, so fixing one does not change the others.
    """
    malignant = int(rng.uniform() < 0.5)
    if malignant:
        diameter = rng.uniform(10.0, 30.0)
        shape = _pick(rng, SHAPES, (0.15, 0.35, 0.5))
        margin = _pick(rng, MARGINS, (0.15, 0.35, 0.5))
        consistency = _pick(rng, (SOLID, PART_SOLID, GROUND_GLASS), (0.6, 0.3, 0.1))
        calcification = _pick(rng, ("none", "central", "eccentric"), (1.0, 0.0, 0.0))
        poorly = rng.uniform() < 0.5
        attached = rng.uniform() < 0.35
    else:
        diameter = rng.uniform(4.0, 14.0)
        shape = _pick(rng, SHAPES, (0.55, 0.35, 0.1))
        margin = _pick(rng, MARGINS, (0.7, 0.2, 0.1))
        consistency = _pick(rng, (SOLID, PART_SOLID, GROUND_GLASS), (0.7, 0.05, 0.25))
        calcification = _pick(rng, ("none", "central", "eccentric"), (0.6, 0.3, 0.1))
        poorly = rng.uniform() < 0.2
        attached = rng.uniform() < 0.25
    consistency = choices.consistency or consistency
    if consistency != SOLID and choices.calcification is None:
        calcification = "none"  # calcified ground glass would read as solid
    nodule = ParametricNodule(
        diameter_mm=float(choices.diameter_mm or diameter),
        shape=choices.shape or shape,
        margin=choices.margin or margin,
        consistency=consistency,
        calcification=choices.calcification or calcification,
        pleural_attachment=attached if choices.pleural_attachment is None else choices.pleural_attachment,
        poorly_marginated=bool(poorly),
        asymmetric=True,
    )
    return nodule, malignant if choices.malignant is None else int(choices.malignant)


def parametric_semantics(nodule: ParametricNodule) -> dict[str, str | None]:
    """All 17 columns of a parametric nodule: what was drawn, Absent for what never is."""
    semantics: dict[str, str | None] = {f.column: (ABSENT if f.is_present_absent else None) for f in FEATURES}
    semantics.update(
        {
            "nodule_margin_conspicuity": _POORLY if nodule.poorly_marginated else _WELL,
            "nodule_margins": _MARGIN_VALUE[nodule.margin],
            "nodule_shape": _SHAPE_VALUE[nodule.shape],
            "nodule_consistency": nodule.consistency,
            "eccentric_calcification": PRESENT if nodule.calcification == "eccentric" else ABSENT,
            "pleural_attachment": PRESENT if nodule.pleural_attachment else ABSENT,
        }
    )
    return semantics


def parametric_job(
    index: int, seed: int, choices: ParametricChoices = ParametricChoices(), full_size: bool = False
) -> PhantomJob:
    """The job of parametric phantom number ``index`` (patient ``PHANTOM-P<index>``)."""
    pid = f"PHANTOM-P{index:05d}"
    own_seed = phantom_seed(seed, pid, "0")
    rng = phantom_generator(own_seed, 0)
    nodule, malignant = draw_parametric(rng, choices)
    pixel_spacing = round(float(rng.uniform(0.6, 0.9)), 4)
    slice_spacing = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5]))
    pixel_spacing = choices.pixel_spacing or pixel_spacing
    slice_spacing = choices.slice_spacing or slice_spacing
    full = None
    if full_size:
        slices = int(round(FULL_SIZE_PARAMETRIC_Z_MM / slice_spacing))
        full = FullSizePlacement(slices, (-1, -1, -1), -FULL_SIZE_PARAMETRIC_Z_MM / 2)
    return PhantomJob(
        phantom_id=f"{pid}_0",
        pid=pid,
        nodule_id="0",
        phantom_seed=own_seed,
        look=nodule.look,
        pleural_attachment=nodule.pleural_attachment,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        slice_thickness=slice_spacing,
        malignant=malignant,
        semantics=parametric_semantics(nodule),
        provenance={"source": "parametric"},
        parametric=nodule,
        full_size=full,
    )


@dataclass(frozen=True)
class Outcome:
    """What became of one job: its row, or the error; with timings (s)."""

    key: tuple[str, str]
    row: dict[str, str] | None
    error: str | None
    render_s: float = 0.0
    write_s: float = 0.0


def select_nodules(
    nodules: Sequence[Any],
    *,
    pids: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    keep_unlabelled: bool = False,
) -> tuple[list[Any], dict[str, int]]:
    """The LIDC rows to render, in table order.

    Args:
        nodules: rows of the LIDC table.
        pids: only these LIDC patients.
        limit: at most this many, taken from a permutation seeded by ``seed``.
        seed: the run's seed.
        keep_unlabelled: keep rows without a label.

    Returns:
        the selected rows and counts of what was left out.

    Raises:
        UserInputError: an unknown pid, a limit below 1, or nothing left to render.
    """
    if limit is not None and limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {limit}")
    selected = list(nodules)
    if pids:
        known = {n.pid for n in nodules}
        unknown = sorted(set(pids) - known)
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserInputError(
                f"--pids: {len(unknown)} patient id(s) are not in the LIDC table: {shown} "
                f"(LIDC ids look like LIDC-IDRI-0078)"
            )
        wanted = set(pids)
        selected = [n for n in selected if n.pid in wanted]
    unlabelled = sum(n.malignant is None for n in selected)
    if not keep_unlabelled:
        selected = [n for n in selected if n.malignant is not None]
    if not selected:
        raise UserInputError(
            f"no labelled nodule to render ({unlabelled} selected row(s) have an empty 'malignant'); "
            "pass --keep-unlabelled to render them anyway"
        )
    if limit is not None and limit < len(selected):
        order = np.random.default_rng(seed).permutation(len(selected))
        keep = set(order[:limit].tolist())
        selected = [n for i, n in enumerate(selected) if i in keep]
    return selected, {"unlabelled_skipped": 0 if keep_unlabelled else unlabelled}


def lidc_jobs(nodules: Sequence[Any], seed: int, settings: PhantomSettings) -> Iterator[PhantomJob | Outcome]:
    """Jobs for LIDC rows; a nodule whose mask cannot be built becomes a failed :class:`Outcome`."""
    from training.phantom_lidc import iter_consensus_masks

    for nodule, mask in iter_consensus_masks(nodules, clevel=settings.clevel):
        if isinstance(mask, Exception):
            yield Outcome(
                (nodule.pid, nodule.nodule_id), None, f"consensus mask: {type(mask).__name__}: {mask}"
            )
            continue
        try:
            yield lidc_job(nodule, mask, seed, settings)
        except Exception as error:  # e.g. a value the renderer does not know
            yield Outcome((nodule.pid, nodule.nodule_id), None, f"{type(error).__name__}: {error}")
