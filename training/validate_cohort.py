"""Check a cohort CSV before training: ``python -m training.validate_cohort CSV [--split-dir D --fold K]``.

Reports every problem at once, each with its file and line: required columns, allowed semantic
values, numeric coordinates and labels, images that exist and load (each distinct image once),
seeds inside their images, and with a split folder, split patients that are not in the CSV or are
in both train and val. Exits 2 when anything is wrong; prints one ``OK`` line when all is fine.
The checks live in :func:`scripts.cohort.validate_cohort`, which the bundle's ``train.json`` runs too.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scripts.cohort import CohortSummary, validate_cohort
from scripts.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> CohortSummary:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="cohort CSV (docs/semantic_schema.md)")
    parser.add_argument(
        "--split-dir", type=Path, default=None, help="split folder with fold_k/{train,val}_pid.csv"
    )
    parser.add_argument(
        "--fold", type=int, default=None, help="fold to check (default: every fold_* of --split-dir)"
    )
    parser.add_argument(
        "--no-images", action="store_true", help="skip loading the images and checking the seeds (fast)"
    )
    parser.add_argument(
        "--unlabelled", action="store_true", help="allow rows without a 0/1 'malignant' (inference cohorts)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    summary = validate_cohort(
        args.csv,
        split_dir=args.split_dir,
        fold=args.fold,
        check_images=not args.no_images,
        require_label=not args.unlabelled,
    )
    print(summary)
    return summary


if __name__ == "__main__":
    main()
