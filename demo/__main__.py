"""``make demo``: a phantom CT study through the deploy app to a DICOM SR and a PDF report.

Writes a DICOM CT phantom with three nodules and a seeds SR (as a PACS would send them), builds the
demo bundle, runs the MONAI Deploy application on the study and prints one line per nodule. The
results are left in ``demo_output/``: ``input/`` (the study), ``bundle/`` and ``results/<series>/``
(``sr.dcm``, ``report_pdf.dcm``, ``report.pdf``, ``nodule_<n>_sc.dcm``).

The demo model is a tiny CLIP that this project trained on synthetic CT phantoms built from LIDC-IDRI
reader contours (``bundle/models/demo/``, model card in ``bundle/docs/README.md``): it shows the
pipeline, not a clinical result.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")  # before holoscan is imported

from demo.study import write_demo_study
from deploy_app.app import process_folder
from deploy_app.findings import results_table
from deploy_app.inference import BundleModels
from scripts.errors import exit_on_user_error
from training.demo_bundle import build_demo_bundle

BANNER = (
    "DEMO MODEL: a tiny CLIP trained on synthetic CT phantoms (LIDC-IDRI reader contours), for "
    "demonstration only. Research use only; not for clinical decisions."
)


@exit_on_user_error
def run_demo(output_dir: Path) -> int:
    """Build the study and the bundle, run the app; returns the process exit code."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    study = write_demo_study(output_dir / "input", n_nodules=3)
    models = BundleModels.load(build_demo_bundle(output_dir / "bundle"))
    print(BANNER)
    outcome = process_folder(output_dir / "input", output_dir / "results", models=models)
    for failure in outcome.failures:
        print(f"error: {failure.series}: {failure.message}", file=sys.stderr)
    result = outcome.results.get(study.series.series_instance_uid)
    if result is None:
        return 1
    print(f"\nCT series {study.series.series_instance_uid}: {len(result.nodules)} nodule(s) (seeds SR)")
    print(f"model: {models.info.name} {models.info.version}, {models.info.folds} calibrated folds")
    print(results_table(result))
    print(f"\n{BANNER}")
    folder = output_dir / "results" / study.series.series_instance_uid
    print(f"\nStructured report: {folder / 'sr.dcm'}")
    print(f"Readable report:   {folder / 'report.pdf'} (also as DICOM: {folder / 'report_pdf.dcm'})")
    return 0


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--output", type=Path, default=Path("demo_output"), help="replaced if it exists")
    args = arguments.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_demo(args.output))


if __name__ == "__main__":
    main()
