"""The MONAI Deploy application: DICOM CT + nodule seeds -> TID 1500 SR and a readable report.

Graph: SDK DICOM loader -> SDK series selector (``series_rules.json``) -> SDK series-to-volume for
every selected series (after a geometry check) -> nodule seeds -> semantic CLIP inference (all folds
of the bundle, all nodules of a series in one batch) -> the report writers (by default the SR, the
PDF, the encapsulated PDF and the Secondary Capture montages; :mod:`deploy_app.report.writers`).

:func:`process_folder` runs it on one folder and reports what was written; ``python -m deploy_app``
is the command line (see ``__main__``); the PACS listener calls :func:`process_folder` per study.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from holoscan.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators import DICOMSeriesSelectorOperator

from deploy_app.inference import BundleModels
from deploy_app.operators import (
    AppOutcome,
    CheckedDICOMDataLoaderOperator,
    NoduleSeedsOperator,
    ReportWritersOperator,
    SemanticCLIPInferenceOperator,
    SeriesVolumesOperator,
)
from deploy_app.report import DEFAULT_WRITERS, ReportWriter
from deploy_app.result_folders import recover_interrupted
from deploy_app.seeds import DEFAULT_SOURCES, MAX_SEEDS_PER_SERIES, SeedSource
from scripts.errors import UserInputError

logger = logging.getLogger(__name__)

SERIES_RULES = Path(__file__).with_name("series_rules.json")


def read_series_rules(path: Path = SERIES_RULES) -> tuple[str, int]:
    """The SDK selection rules (JSON text) and the fewest slices a usable series has."""
    try:
        rules = json.loads(path.read_text())
        return json.dumps({"selections": rules["selections"]}), int(rules.get("min_slices", 16))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"series selection rules '{path}' cannot be read: {error}") from error


def check_input_folder(input_folder: Path) -> None:
    """A folder with at least one file in it (the loader ignores files that are not DICOM)."""
    if not input_folder.is_dir():
        raise UserInputError(f"input folder '{input_folder}' does not exist or is not a folder")
    if not any(path.is_file() for path in input_folder.rglob("*")):
        raise UserInputError(
            f"input folder '{input_folder}' is empty; put a CT series and nodule seeds in it"
        )


def check_output_folder(output_folder: Path) -> None:
    """Create ``output_folder`` and check that files can be written there, before any work."""
    try:
        output_folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=output_folder, prefix=".write-check.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserInputError(
            f"output folder '{output_folder}' is not writable ({error.strerror}); choose another with -o"
        ) from error


class SemanticCLIPApp(Application):
    """Lung nodule malignancy and semantic findings from CT, as a DICOM SR and a PDF report.

    Args:
        input_folder: the DICOM files (CT series + seeds); default from ``-i``/HOLOSCAN_INPUT_PATH.
        output_folder: where results go; default from ``-o``/HOLOSCAN_OUTPUT_PATH.
        models: the loaded bundle; default loaded from ``-m``/HOLOSCAN_MODEL_PATH.
        seed_sources: seed sources in order of precedence.
        max_seeds: most seeds analysed per series.
        report_writers: the outputs written per series, in order.
        rules_file: series selection rules.
    """

    name = "lung_nodule_ct_semantic_clip"
    description = "Semantic-guided CLIP lung nodule malignancy and findings: CT in, TID 1500 SR + PDF out"
    version = "0.1.0"

    def __init__(
        self,
        *args,
        input_folder: Path | None = None,
        output_folder: Path | None = None,
        models: BundleModels | None = None,
        seed_sources: Sequence[SeedSource] = DEFAULT_SOURCES,
        max_seeds: int = MAX_SEEDS_PER_SERIES,
        report_writers: Sequence[ReportWriter] = DEFAULT_WRITERS,
        rules_file: Path = SERIES_RULES,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.input_folder = input_folder
        self.output_folder = output_folder
        self.models = models
        self.seed_sources = tuple(seed_sources)
        self.max_seeds = max_seeds
        self.report_writers = tuple(report_writers)
        self.rules_file = rules_file
        self.outcome = AppOutcome()

    def compose(self) -> None:
        if self.input_folder is None or self.output_folder is None or self.models is None:
            context = Application.init_app_context(self.argv)
            self.input_folder = self.input_folder or Path(context.input_path)
            self.output_folder = self.output_folder or Path(context.output_path)
            self.models = self.models or BundleModels.load(Path(context.model_path))
        rules, min_slices = read_series_rules(self.rules_file)
        loader = CheckedDICOMDataLoaderOperator(
            self,
            CountCondition(self, 1),
            input_folder=self.input_folder,
            must_load=False,
            name="dicom_loader",
        )
        selector = DICOMSeriesSelectorOperator(self, rules=rules, all_matched=True, name="ct_series_selector")
        volumes = SeriesVolumesOperator(self, min_slices=min_slices, name="ct_series_to_volume")
        seeds = NoduleSeedsOperator(
            self,
            input_folder=self.input_folder,
            sources=self.seed_sources,
            max_seeds=self.max_seeds,
            name="nodule_seeds",
        )
        inference = SemanticCLIPInferenceOperator(self, models=self.models, name="semantic_clip_inference")
        writers = ReportWritersOperator(
            self,
            output_folder=self.output_folder,
            outcome=self.outcome,
            writers=self.report_writers,
            name="report_writers",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, volumes, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(volumes, seeds, {("series_volumes", "series_volumes")})
        self.add_flow(seeds, inference, {("series_seeds", "series_seeds")})
        self.add_flow(inference, writers, {("series_results", "series_results")})


def process_folder(
    input_dir: Path,
    output_dir: Path,
    model_dir: Path | None = None,
    *,
    models: BundleModels | None = None,
    seed_sources: Sequence[SeedSource] = DEFAULT_SOURCES,
    max_seeds: int = MAX_SEEDS_PER_SERIES,
    report_writers: Sequence[ReportWriter] = DEFAULT_WRITERS,
    finding_confidence: float | None = None,
) -> AppOutcome:
    """Run the application on one folder.

    Args:
        input_dir: DICOM files of one or more studies, plus seeds.
        output_dir: created if needed; one sub-folder per analysed series (replaced when the series is
            analysed again; what an interrupted run left there is tidied up first).
        model_dir: the bundle folder (ignored when ``models`` is given).
        models: an already loaded bundle (the PACS listener keeps one).
        seed_sources: seed sources in order of precedence.
        max_seeds: most seeds analysed per series; a series with more fails with a message.
        report_writers: the outputs written per series, in order (add or drop one here).
        finding_confidence: one confidence threshold for every semantic finding instead of the
            model's recorded ones (ignored when ``models`` is given: set it when loading them).

    Returns:
        the written files and the series that failed (with messages).

    Raises:
        UserInputError: the input, output or model folder is unusable.
    """
    started = time.time()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_input_folder(input_dir)
    check_output_folder(output_dir)
    # A run killed while writing left hidden staging folders (or results renamed aside); this run's
    # own appear after `started`. Two runs must not write into one output folder at the same time.
    recover_interrupted(output_dir, started_before=started)
    if models is None:
        if model_dir is None:
            raise ValueError("give model_dir or models")
        models = BundleModels.load(model_dir, finding_confidence=finding_confidence)
    app = SemanticCLIPApp(
        input_folder=input_dir,
        output_folder=output_dir,
        models=models,
        seed_sources=seed_sources,
        max_seeds=max_seeds,
        report_writers=report_writers,
    )
    app.run()
    return app.outcome
