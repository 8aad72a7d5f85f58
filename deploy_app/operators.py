"""The app's operators: thin wrappers that call the pure functions of the deploy_app modules.

Each operator passes a list along, one entry per CT series, so every series of every study in the
input is analysed in one run, and a :class:`~deploy_app.volume.SeriesFailure` travels with the
others instead of stopping them. User mistakes become failures with a message; anything else is a
bug and propagates.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesToVolumeOperator
from pydicom.errors import InvalidDicomError

from deploy_app.findings import SeriesResult, SkippedSeed
from deploy_app.inference import BundleModels, analyse_nodules
from deploy_app.report import DEFAULT_WRITERS, ReportInput, ReportWriter
from deploy_app.result_folders import new_staging_folder, place_results
from deploy_app.seeds import DEFAULT_SOURCES, MAX_SEEDS_PER_SERIES, CTSeriesInfo, SeedSource, find_seeds
from deploy_app.uids import check_uid, path_inside, short_text
from deploy_app.volume import (
    SeriesFailure,
    SeriesGeometry,
    SeriesVolume,
    UndecodableSlice,
    check_plausible_hu,
    check_rescale,
    check_series_geometry,
    describe_series,
    is_localizer,
    rescale_to_hu,
    stored_values_releasing_pixel_data,
    to_meta_tensor,
)
from scripts.errors import UserInputError, find_user_error
from scripts.memory import release_freed_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedsFound:
    """A series with the seeds to analyse and those skipped."""

    series: SeriesVolume
    seeds: tuple
    skipped: tuple[SkippedSeed, ...]


@dataclass(frozen=True)
class SeriesAnalysed:
    """A series with its model results, ready for the writers."""

    series: SeriesVolume
    result: SeriesResult


@dataclass
class AppOutcome:
    """What a run produced: written files per series and the failures (filled by the last operator)."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failures: list[SeriesFailure] = field(default_factory=list)
    results: dict[str, SeriesResult] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [path for paths in self.written.values() for path in paths]


def _user_failure(series: str, error: BaseException) -> SeriesFailure:
    user_error = find_user_error(error)
    if user_error is None:
        raise error
    logger.error("%s: %s", series, user_error)
    return SeriesFailure(series=series, message=str(user_error))


class CheckedDICOMDataLoaderOperator(DICOMDataLoaderOperator):
    """The SDK's DICOM loader, leaving out (with a warning naming the file) files pydicom cannot read.

    The SDK's loader ignores files that are not DICOM but lets any other reading error stop the
    whole run (e.g. pydicom's TypeError on a SpecificCharacterSet that is not text). Only then are
    the files' headers checked one by one (without pixel data), and the SDK loads the readable ones
    again: a study of good files is read once, as before.
    """

    def _load_data(self, files: list) -> list:  # the SDK's one per-file step; its name is private
        try:
            return super()._load_data(files)
        except Exception:
            for file in files:
                if hasattr(file, "seek"):
                    file.seek(0)
            readable = [file for file in files if _readable_dicom(file)]
            if len(readable) == len(files):
                raise  # no file is unreadable: the error is not a file's
            return super()._load_data(readable)


def _readable_dicom(file) -> bool:
    try:
        pydicom.dcmread(file, stop_before_pixels=True)
        return True
    except InvalidDicomError:
        return True  # not DICOM at all: the SDK's loader ignores it, with its own log line
    except Exception as error:  # any other reading failure is this file's problem only
        logger.warning("ignored '%s': it cannot be read as DICOM (%s)", file, short_text(error))
        return False
    finally:
        if hasattr(file, "seek"):
            file.seek(0)


class SeriesVolumesOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume step for EVERY selected series, after checking its geometry.

    Named input ``study_selected_series_list``; named output ``series_volumes`` (a list of
    :class:`SeriesVolume` or :class:`SeriesFailure`).

    Args:
        min_slices: fewest slices a usable series has.
    """

    def __init__(self, fragment: Fragment, *args, min_slices: int = 16, **kwargs) -> None:
        self.min_slices = min_slices
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name_series)
        spec.output("series_volumes")

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive(self.input_name_series) or []
        volumes: list[SeriesVolume | SeriesFailure] = []
        localizers = 0
        for study_selection in selected:
            for selected_series in study_selection.selected_series:
                volume = self.series_volume(selected_series.series, selected_series.selection_name)
                if volume is None:
                    localizers += 1
                else:
                    volumes.append(volume)
        if not volumes:
            found = f" ({localizers} localizer series only)" if localizers else ""
            volumes.append(
                SeriesFailure(
                    "input",
                    f"no CT series in the input folder{found} (a series needs Modality CT, pixel data "
                    "and a StudyInstanceUID and SeriesInstanceUID; the loader drops instances without them)",
                )
            )
        op_output.emit(volumes, "series_volumes")

    def series_volume(self, series, selection: str) -> SeriesVolume | SeriesFailure | None:
        """Check one SDK DICOMSeries and convert it to the bundle's volume layout.

        Localizer images (topograms, ImageType LOCALIZER) are no part of a volume: a series of
        localizers only is skipped (None), and localizers inside a series are left out; both are
        logged.
        """
        instances = series.get_sop_instances()
        headers = [instance.get_native_sop_instance() for instance in instances]
        name = describe_series(headers[0]) if headers else f"series {series.SeriesInstanceUID}"
        scouts = [is_localizer(header) for header in headers]
        if headers and all(scouts):
            logger.info("%s: a localizer (ImageType LOCALIZER, %d image(s)), skipped", name, len(headers))
            return None
        if any(scouts):
            logger.info("%s: %d localizer image(s) (ImageType LOCALIZER) left out", name, sum(scouts))
            # The SDK returns its own list: filtering it in place keeps the SDK's later steps in step.
            instances[:] = [instance for instance, scout in zip(instances, scouts, strict=True) if not scout]
            headers = [header for header, scout in zip(headers, scouts, strict=True) if not scout]
        try:
            geometry = check_series_geometry(headers, min_slices=self.min_slices)
            self.prepare_series(series)
            order = [i.get_native_sop_instance().SOPInstanceUID for i in series.get_sop_instances()]
            if order != [d.SOPInstanceUID for d in geometry.datasets]:
                raise RuntimeError(f"{name}: the SDK ordered the slices differently from the geometry check")
            voxels = self._voxels(series, geometry, name)
            check_plausible_hu(voxels, name)
            for dataset in geometry.datasets:  # the pixels now live in `voxels`; keep only headers
                if "PixelData" in dataset:
                    del dataset.PixelData
            release_freed_memory()
        except UserInputError as error:
            return _user_failure(name, error)
        logger.info(
            "%s selected by rule '%s': CT, axial, %d slices of %dx%d",
            name,
            selection,
            *geometry.shape,
        )
        return SeriesVolume(geometry=geometry, volume=to_meta_tensor(voxels, geometry), selection=selection)

    def generate_voxel_data(self, series) -> np.ndarray:
        """HU voxels (slices, rows, columns): the SDK's conversion, vectorised for plain CT slices.

        When every slice is MONOCHROME2 with one pixel format, one RescaleSlope/Intercept and no
        modality LUT (as CT is), the stored values are decoded slice by slice into one array, each
        slice's pixel data dropped once decoded (so the series is never held twice), and rescaled in
        one step (int16 when the rescale is integral, else float32), with the same result as the SDK's
        per-slice float64 path; anything else goes through the SDK's own implementation.
        """
        datasets = [instance.get_native_sop_instance() for instance in series.get_sop_instances()]
        rescale = {check_rescale(d, describe_series(d)) for d in datasets}
        pixel_formats = {(d.get("BitsAllocated"), d.get("PixelRepresentation")) for d in datasets}
        plain = (
            len(rescale) == 1
            and len(pixel_formats) == 1
            and all(
                d.get("PhotometricInterpretation") == "MONOCHROME2" and "ModalityLUTSequence" not in d
                for d in datasets
            )
        )
        if not plain:
            return super().generate_voxel_data(series)
        slope, intercept = rescale.pop()
        return rescale_to_hu(stored_values_releasing_pixel_data(datasets), slope, intercept)

    def _voxels(self, series, geometry: SeriesGeometry, name: str):
        missing = next((d for d in geometry.datasets if "PixelData" not in d), None)
        if missing is not None:
            raise _undecodable(name, missing, ValueError("the instance has no Pixel Data"))
        try:
            return self.generate_voxel_data(series)
        except UndecodableSlice as error:
            raise _undecodable(name, error.dataset, error.__cause__) from error.__cause__
        except Exception as error:
            for dataset in geometry.datasets:
                if "PixelData" not in dataset:
                    continue  # decoded (and released) before the failure: not the culprit
                try:
                    dataset.pixel_array  # noqa: B018 - decoding is the check
                except Exception as slice_error:
                    raise _undecodable(name, dataset, slice_error) from error
            raise


def _undecodable(name: str, dataset, error: BaseException | None) -> UserInputError:
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    return UserInputError(
        f"{name}: instance {dataset.get('InstanceNumber', '?')} "
        f"({dataset.SOPInstanceUID}): pixel data cannot be decoded "
        f"(transfer syntax {getattr(syntax, 'name', syntax)}): {short_text(error)}; "
        "send it uncompressed or with a transfer syntax pydicom can decode"
    )


class NoduleSeedsOperator(Operator):
    """Nodule seeds for each series from the input folder (SR, SEG, seeds file, or a plugged detector).

    Named input ``series_volumes``; named output ``series_seeds``.

    Args:
        input_folder: where the study's files are (seed SR/SEG/files live beside the CT).
        sources: seed sources in order of precedence (an automatic detector is one more source).
        max_seeds: most seeds analysed per series; more fail the series.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        input_folder: Path,
        sources: Sequence[SeedSource] = DEFAULT_SOURCES,
        max_seeds: int = MAX_SEEDS_PER_SERIES,
        **kwargs,
    ) -> None:
        self.input_folder = Path(input_folder)
        self.sources = tuple(sources)
        self.max_seeds = max_seeds
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("series_volumes")
        spec.output("series_seeds")

    def compute(self, op_input, op_output, context) -> None:
        found: list[SeedsFound | SeriesFailure] = []
        for item in op_input.receive("series_volumes"):
            if isinstance(item, SeriesFailure):
                found.append(item)
                continue
            try:
                info = CTSeriesInfo.from_geometry(item.geometry)
                seeds, skipped, source = find_seeds(self.input_folder, info, self.sources, self.max_seeds)
            except UserInputError as error:
                found.append(_user_failure(item.description, error))
                continue
            for skip in skipped:
                logger.warning(
                    "%s: skipped seed %s (%s): %s",
                    item.description,
                    skip.seed.label,
                    skip.seed.source,
                    skip.reason,
                )
            if not seeds:
                found.append(
                    SeriesFailure(item.description, f"all {len(skipped)} seed(s) from {source} were skipped")
                )
                continue
            found.append(SeedsFound(series=item, seeds=tuple(seeds), skipped=tuple(skipped)))
        op_output.emit(found, "series_seeds")


class SemanticCLIPInferenceOperator(Operator):
    """Bundle preprocessing and every fold model, all nodules of a series in one batch.

    Named input ``series_seeds``; named output ``series_results``.

    Args:
        models: the loaded bundle (loaded once, before the graph runs).
    """

    def __init__(self, fragment: Fragment, *args, models: BundleModels, **kwargs) -> None:
        self.models = models
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("series_seeds")
        spec.output("series_results")

    def compute(self, op_input, op_output, context) -> None:
        analysed: list[SeriesAnalysed | SeriesFailure] = []
        for item in op_input.receive("series_seeds"):
            if isinstance(item, SeriesFailure):
                analysed.append(item)
                continue
            try:
                nodules = analyse_nodules(item.series.volume, item.seeds, self.models)
            except UserInputError as error:
                analysed.append(_user_failure(item.series.description, error))
                continue
            result = SeriesResult(nodules=tuple(nodules), skipped=item.skipped, model=self.models.info)
            analysed.append(SeriesAnalysed(series=item.series, result=result))
        op_output.emit(analysed, "series_results")


def _write_failure(description: str, folder: Path, error: OSError) -> SeriesFailure:
    """A file-system error while writing results, as the series' failure (disk full, permissions)."""
    where = error.filename or folder
    hint = "free some space" if error.errno == errno.ENOSPC else "check the output folder"
    message = f"the results could not be written to '{where}' ({error.strerror or error}); {hint} and rerun"
    logger.error("%s: %s", description, message)
    return SeriesFailure(series=description, message=message)


class ReportWritersOperator(Operator):
    """Run the report writers of each series into ``output_folder/<SeriesInstanceUID>/``, all or nothing.

    Named input ``series_results``; the outcome is recorded in ``outcome``. The writers write into
    one staging folder per series, which replaces earlier results only when all of them succeeded
    (:mod:`deploy_app.result_folders`). A file-system error (disk full, permissions) fails that
    series with a message; any other error from a writer is a bug, and propagates with a note naming
    the writer. Either way the staging folder is removed.

    Args:
        output_folder: where results go.
        outcome: filled with the written files and the failures.
        writers: the outputs, in order (:data:`deploy_app.report.DEFAULT_WRITERS`: SR, PDF,
            encapsulated PDF, Secondary Capture montages); a site adds or drops one here.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args,
        output_folder: Path,
        outcome: AppOutcome,
        writers: Sequence[ReportWriter] = DEFAULT_WRITERS,
        **kwargs,
    ) -> None:
        self.output_folder = Path(output_folder)
        self.outcome = outcome
        self.writers = tuple(writers)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("series_results")

    def compute(self, op_input, op_output, context) -> None:
        for item in op_input.receive("series_results"):
            if isinstance(item, SeriesFailure):
                self.outcome.failures.append(item)
                continue
            uid = str(item.series.geometry.datasets[0].SeriesInstanceUID)
            try:
                self.outcome.written[uid] = self.write_series(item)
            except OSError as error:
                failure = _write_failure(item.series.description, self.output_folder, error)
                self.outcome.failures.append(failure)
                continue
            self.outcome.results[uid] = item.result

    def write_series(self, item: SeriesAnalysed) -> list[Path]:
        """Write one series' outputs into a staging folder, then move it into place."""
        datasets = item.series.geometry.datasets
        reference = datasets[0]
        uid = check_uid(reference.get("SeriesInstanceUID"), "SeriesInstanceUID", item.series.description)
        target = path_inside(self.output_folder, uid)
        staging = new_staging_folder(self.output_folder, uid)
        try:
            report = ReportInput(ct_datasets=datasets, result=item.result)
            for writer in self.writers:
                try:
                    writer.write(report, staging)
                except Exception as error:
                    error.add_note(f"{item.series.description}: report writer '{writer.name}' failed")
                    raise
            place_results(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("%s: wrote %s", item.series.description, target)
        return sorted(target.iterdir())
