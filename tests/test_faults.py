"""Faults in the app: each is one series' failure with a message, and no result is lost or half-written.

Disk full while writing, a NaN probability, a multi-frame or localizer image and a slice that
decodes to the wrong size fail (or skip) their series with a message and leave the other series
alone; the exit code says whether anything was analysed (2: nothing, 3: some). Results replace
earlier ones without a moment when neither exists, and what a killed run left behind is tidied up
by the next one.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import deploy_app.__main__ as cli
import deploy_app.app
from demo.study import write_demo_study
from deploy_app.app import process_folder
from deploy_app.findings import NoduleResult, NoduleSeed
from deploy_app.inference import BundleModels
from deploy_app.report import DEFAULT_WRITERS, ReportInput
from deploy_app.result_folders import new_staging_folder, place_results, recover_interrupted
from deploy_app.volume import UndecodableSlice, check_series_geometry, stored_values_releasing_pixel_data
from scripts.errors import UserInputError
from training.demo_bundle import build_untrained_bundle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_untrained_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def models(bundle: Path) -> BundleModels:
    return BundleModels.load(bundle)


def copy_as_new_series(ct: Path, target: Path, **changes: object) -> list[Path]:
    """A copy of the series in ``ct`` with new Series and SOP Instance UIDs (and ``changes``)."""
    target.mkdir(parents=True)
    series_uid = generate_uid()
    files = []
    for path in sorted(ct.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(dataset, keyword, value)
        dataset.save_as(target / path.name)
        files.append(target / path.name)
    return files


@pytest.fixture(scope="module")
def two_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One study, two CT series of the same scan, and one seed in ``seeds.csv``."""
    folder = tmp_path_factory.mktemp("study") / "in"
    write_demo_study(folder, seed=5, n_nodules=1, seed_sr=False, seeds_csv=True)
    copy_as_new_series(folder / "ct", folder / "ct_copy")
    return folder


def series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm"))).SeriesInstanceUID)


class DiskFullWriter:
    """Writes part of a file for one series, then fails as a full disk does."""

    name = "disk-full test writer"

    def __init__(self, failing_series: str) -> None:
        self.failing_series = failing_series

    def write(self, report: ReportInput, folder: Path) -> None:
        if report.reference.SeriesInstanceUID == self.failing_series:
            (folder / "partial.bin").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "partial.bin"))


def test_a_full_disk_fails_that_series_only_and_leaves_nothing_half_written(
    two_series: Path,
    bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    failing, kept = series_uid(two_series / "ct"), series_uid(two_series / "ct_copy")
    writers = (*DEFAULT_WRITERS, DiskFullWriter(failing))
    monkeypatch.setattr(
        deploy_app.app, "process_folder", functools.partial(process_folder, report_writers=writers)
    )
    output = tmp_path / "out"

    code = cli.main(["-i", str(two_series), "-o", str(output), "-m", str(bundle)])

    assert code == cli.EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space and rerun" in err
    assert sorted(p.name for p in output.iterdir()) == [kept]  # no staging folder, no partial result
    assert (output / kept / "sr.dcm").is_file()


def test_exit_2_when_every_series_fails(
    two_series: Path, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers = (
        DiskFullWriter(series_uid(two_series / "ct")),
        DiskFullWriter(series_uid(two_series / "ct_copy")),
    )
    monkeypatch.setattr(
        deploy_app.app, "process_folder", functools.partial(process_folder, report_writers=writers)
    )
    assert cli.main(["-i", str(two_series), "-o", str(tmp_path / "out"), "-m", str(bundle)]) == cli.EXIT_INPUT
    assert list((tmp_path / "out").iterdir()) == []


def test_a_bug_in_a_writer_still_propagates_and_removes_its_staging_folder(
    two_series: Path, models: BundleModels, tmp_path: Path
) -> None:
    class BrokenWriter:
        name = "broken test writer"

        def write(self, report: ReportInput, folder: Path) -> None:
            raise KeyError("a bug")

    with pytest.raises(KeyError) as raised:
        process_folder(two_series, tmp_path / "out", models=models, report_writers=(BrokenWriter(),))
    assert any("broken test writer" in note for note in raised.value.__notes__)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_nan_probability_fails_the_series_and_writes_nothing(
    two_series: Path, models: BundleModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_predict = models.predict

    def predict_nan(model_input):
        outputs = real_predict(model_input)
        outputs["malignancy"] = np.full_like(outputs["malignancy"], np.nan)
        return outputs

    monkeypatch.setattr(models, "predict", predict_nan)
    outcome = process_folder(two_series, tmp_path / "out", models=models)

    assert not outcome.written and len(outcome.failures) == 2
    assert all("non-finite (NaN or infinite) probability for Nodule 1" in f.message for f in outcome.failures)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5, float("inf")])
def test_a_nodule_result_refuses_a_probability_outside_0_1(bad: float) -> None:
    seed = NoduleSeed((0.0, 0.0, 0.0), "Nodule 1", "test")
    good = {"semantic": {"nodule_shape": {"Round": 0.7, "Oval": 0.3}}, "attention": (1.0,)}
    with pytest.raises(ValueError, match="Nodule 1: malignancy probability"):
        NoduleResult(seed=seed, malignancy=bad, malignancy_per_fold=(0.5,), **good)
    with pytest.raises(ValueError, match="nodule_shape = Round probability"):
        NoduleResult(
            seed=seed,
            malignancy=0.5,
            malignancy_per_fold=(0.5,),
            semantic={"nodule_shape": {"Round": bad}},
            attention=(1.0,),
        )


# --- multi-frame, localizer and undecodable slices ---


def test_a_localizer_series_beside_the_axial_series_is_skipped_with_an_info_line(
    two_series: Path, models: BundleModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(two_series, inputs, ignore=shutil.ignore_patterns("ct_copy"))
    scout = copy_as_new_series(
        inputs / "ct", inputs / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
    )
    for path in scout[3:]:
        path.unlink()  # a localizer is one to three images
    with caplog.at_level(logging.INFO, logger="deploy_app"):
        outcome = process_folder(inputs, tmp_path / "out", models=models)
    assert not outcome.failures and list(outcome.written) == [series_uid(inputs / "ct")]
    assert "a localizer (ImageType LOCALIZER, 3 image(s)), skipped" in caplog.text


def test_localizer_images_inside_a_series_are_left_out(
    two_series: Path, models: BundleModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(two_series, inputs, ignore=shutil.ignore_patterns("ct_copy"))
    scout = pydicom.dcmread(next((inputs / "ct").glob("*.dcm")))
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImagePositionPatient = [0.0, 0.0, 0.0]  # would be a duplicate or a gap in the volume
    scout.save_as(inputs / "ct" / "scout.dcm")
    with caplog.at_level(logging.INFO, logger="deploy_app"):
        outcome = process_folder(inputs, tmp_path / "out", models=models)
    assert not outcome.failures and len(outcome.written) == 1
    assert "1 localizer image(s) (ImageType LOCALIZER) left out" in caplog.text


@pytest.fixture(scope="module")
def headers(two_series: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted((two_series / "ct").glob("*.dcm"))]


@pytest.mark.parametrize(
    "changes",
    [{"NumberOfFrames": 120}, {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2.1"}],
    ids=["number-of-frames", "enhanced-ct-class"],
)
def test_a_multi_frame_ct_is_named_as_such_not_as_one_slice(
    headers: list[pydicom.Dataset], changes: dict[str, object]
) -> None:
    enhanced = copy.deepcopy(headers[0])  # Dataset.copy() shares the elements
    for keyword, value in changes.items():
        setattr(enhanced, keyword, value)
    with pytest.raises(
        UserInputError, match=r"instance \d+ is a multi-frame \(Enhanced\) CT image"
    ) as raised:
        check_series_geometry([enhanced])
    assert "slice(s)" not in str(raised.value) and "single-frame" in str(raised.value)


def test_a_slice_of_another_size_is_the_one_named(headers: list[pydicom.Dataset]) -> None:
    """The fallback check used to blame the first slice (its pixels already released) instead."""
    slices = copy.deepcopy(headers[:5])
    odd = slices[3]
    odd.Rows, odd.Columns = odd.Rows // 2, odd.Columns // 2
    odd.PixelData = odd.PixelData[: len(odd.PixelData) // 4]
    with pytest.raises(UndecodableSlice) as raised:
        stored_values_releasing_pixel_data(slices)
    assert raised.value.dataset is odd, raised.value.__cause__
    assert "first slice" in str(raised.value.__cause__)


# --- result folders: replaced without a gap, tidied after a kill, readable by others ---


def make_results(folder: Path, content: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "sr.dcm").write_text(content)
    return folder


def test_results_replace_earlier_ones_and_get_umask_modes(tmp_path: Path) -> None:
    output = tmp_path / "out"
    target = make_results(output / "1.2.3", "old")
    staging = new_staging_folder(output, "1.2.3")
    (staging / "sr.dcm").write_text("new")
    (staging / "sr.dcm").chmod(0o600)

    previous = os.umask(0o022)
    try:
        place_results(staging, target)
    finally:
        os.umask(previous)

    assert sorted(p.name for p in output.iterdir()) == ["1.2.3"]
    assert (target / "sr.dcm").read_text() == "new"
    assert (target.stat().st_mode & 0o777, (target / "sr.dcm").stat().st_mode & 0o777) == (0o755, 0o644)


def test_the_old_results_exist_until_the_new_ones_are_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rename place_results makes leaves either the old or the new results at the target."""
    output = tmp_path / "out"
    target = make_results(output / "1.2.3", "old")
    staging = new_staging_folder(output, "1.2.3")
    (staging / "sr.dcm").write_text("new")
    seen = []
    real_replace = os.replace

    def watching_replace(source, destination):
        real_replace(source, destination)
        seen.append((target / "sr.dcm").read_text() if target.exists() else None)

    monkeypatch.setattr(os, "replace", watching_replace)
    place_results(staging, target)
    assert None not in seen[1:] and seen[-1] == "new"  # the first rename only moves the old aside


def touch_in_the_past(path: Path, seconds: float = 60.0) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_recovery_after_a_kill_restores_or_removes_what_the_killed_run_left(tmp_path: Path) -> None:
    output = tmp_path / "out"
    make_results(output / "1.2.3", "complete")
    orphan = make_results(output / ".1.2.3.abc123.tmp", "half-written")
    aside_alone = make_results(output / ".1.2.4.def456.old", "old results, replacement never arrived")
    aside_replaced = make_results(output / ".1.2.3.ghi789.old", "old results, replaced")
    for path in (orphan, aside_alone, aside_replaced):
        touch_in_the_past(path)
    running = make_results(output / ".1.2.5.jkl012.tmp", "a run still writing")

    actions = recover_interrupted(output, started_before=time.time() - 1)

    assert sorted(p.name for p in output.iterdir()) == [".1.2.5.jkl012.tmp", "1.2.3", "1.2.4"]
    assert (output / "1.2.3" / "sr.dcm").read_text() == "complete"
    assert (output / "1.2.4" / "sr.dcm").read_text() == "old results, replacement never arrived"
    assert running.is_dir() and len(actions) == 3
    assert any("restored '1.2.4'" in action for action in actions)


def test_the_app_tidies_its_output_folder_first(
    two_series: Path, models: BundleModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(two_series, inputs, ignore=shutil.ignore_patterns("ct_copy"))
    output = tmp_path / "out"
    orphan = make_results(output / f".{series_uid(inputs / 'ct')}.x1y2z3.tmp", "half-written")
    touch_in_the_past(orphan)
    with caplog.at_level(logging.WARNING, logger="deploy_app"):
        outcome = process_folder(inputs, output, models=models)
    assert sorted(p.name for p in output.iterdir()) == list(outcome.written)
    assert "removed the incomplete results" in caplog.text
