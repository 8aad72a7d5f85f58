"""The PACS listener's durability, offline: send queue, late instances, poison studies, restarts, modes.

Pure Python with an injected clock, processor and sender; no sockets. A ``kill -9`` at a given
moment is imitated by copying the work directory at that moment (what the killed process would
have left) and starting a new collector and dispatcher on the copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from test_pacs_support import FakeClock, FlakySender, RecordingProcessor

from deploy_app import pacs
from deploy_app.pacs import StudyCollector, StudyDispatcher, WorkDirs
from deploy_app.pacs_store import file_mode, read_json
from scripts.errors import UserInputError

STUDY = "1.2.826.0.1.3680043.8.498.10"
OTHER = "1.2.826.0.1.3680043.8.498.11"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(root: Path, clock: FakeClock, processor, sender=None, **options) -> StudyDispatcher:
    collector = StudyCollector(WorkDirs(root), stable_seconds=10, clock=clock)
    return StudyDispatcher(collector, processor, sender, clock=clock, wall_clock=clock, **options)


def receive(dispatcher: StudyDispatcher, study: str, *sop_uids: str) -> None:
    for uid in sop_uids:
        dispatcher.collector.store(study, uid, b"instance " + uid.encode())


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- persistent send queue --------------------------------------------------------------------


def test_undelivered_results_wait_in_the_outbox_with_backoff_and_are_sent_once(
    tmp_path: Path, clock: FakeClock
) -> None:
    sender = FlakySender(down=True)
    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), sender, send_retry_seconds=30)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1", "1.2")
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()

    assert outcome.state == "queued" and not outcome.succeeded
    assert outcome.folder == dirs.outbox / STUDY and names(outcome.folder) == ["1.1.dcm", "1.2.dcm"]
    assert list(dirs.failed.iterdir()) == [] and list(dirs.done.iterdir()) == []
    state = read_json(dirs.outbox / f"{STUDY}.json")
    assert state["attempts"] == 1 and "could not open an association" in state["last_error"]
    assert state["next_attempt"] == clock.now + 30 and state["files"] == ["sr.dcm"]

    clock.advance(29)
    assert dispatcher.send_due() == [] and sender.attempts == 1  # not due yet
    clock.advance(1)
    (second,) = dispatcher.send_due()
    assert second.state == "queued" and read_json(dirs.outbox / f"{STUDY}.json")["attempts"] == 2
    assert read_json(dirs.outbox / f"{STUDY}.json")["next_attempt"] == clock.now + 60  # doubled

    sender.down = False  # the destination is back
    clock.advance(60)
    (delivered,) = dispatcher.send_due()
    assert delivered.succeeded and delivered.folder == dirs.done / STUDY
    assert len(sender.delivered) == 1 and sender.delivered[0][0].endswith("DICMresult of " + STUDY)
    assert list(dirs.outbox.iterdir()) == []
    clock.advance(10_000)
    assert dispatcher.send_due() == [] and len(sender.delivered) == 1  # exactly once


def test_the_backoff_is_capped(tmp_path: Path, clock: FakeClock) -> None:
    dispatcher = make(
        tmp_path / "w",
        clock,
        RecordingProcessor(),
        FlakySender(),
        send_retry_seconds=10,
        send_retry_max_seconds=45,
    )
    assert [dispatcher.queue.backoff(n) for n in range(1, 6)] == [10, 20, 40, 45, 45]


def test_the_outbox_survives_a_restart_and_is_sent_at_start(tmp_path: Path, clock: FakeClock) -> None:
    first = make(tmp_path / "w", clock, RecordingProcessor(), FlakySender(down=True), send_retry_seconds=3600)
    receive(first, STUDY, "1.1")
    clock.advance(10)
    (queued,) = first.dispatch_stable()
    assert queued.state == "queued"

    sender = FlakySender(down=False)  # restarted with the destination back
    restarted = make(tmp_path / "w", clock, RecordingProcessor(), sender, send_retry_seconds=3600)
    assert restarted.collector.pending_studies() == {}  # processed already: not analysed again
    (delivered,) = restarted.send_due()  # due at start, whatever the old schedule said
    assert delivered.succeeded and len(sender.delivered) == 1
    assert names(restarted.collector.dirs.done) == [STUDY]


def test_a_kill_while_queueing_or_after_sending_is_recovered(tmp_path: Path, clock: FakeClock) -> None:
    snapshots: dict[str, Path] = {}

    class SnapshotSender(FlakySender):
        def __call__(self, files) -> None:
            snapshots["sending"] = Path(shutil.copytree(tmp_path / "w", tmp_path / "killed_sending"))
            super().__call__(files)

    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), SnapshotSender(down=False))
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    (done,) = dispatcher.dispatch_stable()
    assert done.succeeded

    # killed during the send: sent again at start (same files, so the same SOP Instance UIDs)
    sender = FlakySender(down=False)
    again = make(
        shutil.copytree(snapshots["sending"], tmp_path / "resend"), clock, RecordingProcessor(), sender
    )
    (resent,) = again.send_due()
    assert resent.succeeded and len(sender.delivered) == 1 and again.collector.pending_studies() == {}

    # killed between the state file and the move into the outbox: the move is finished
    between = tmp_path / "killed_between"
    shutil.copytree(snapshots["sending"], between)
    dirs = WorkDirs(between)
    os.replace(dirs.outbox / STUDY, dirs.processing / STUDY)
    sender = FlakySender(down=False)
    recovered = make(between, clock, RecordingProcessor(), sender)
    assert recovered.collector.pending_studies() == {}
    (resent,) = recovered.send_due()
    assert resent.succeeded and names(dirs.done / STUDY) == ["1.1.dcm"]

    # killed after the move to done/ but before the state file was removed: not sent again
    after = tmp_path / "killed_after"
    shutil.copytree(tmp_path / "w", after)
    (WorkDirs(after).outbox / f"{STUDY}.json").write_text(
        (snapshots["sending"] / "outbox" / f"{STUDY}.json").read_text()
    )
    sender = FlakySender(down=False)
    assert make(after, clock, RecordingProcessor(), sender).send_due() == []
    assert sender.attempts == 0 and list(WorkDirs(after).outbox.iterdir()) == []


# --- late instances ---------------------------------------------------------------------------


def test_late_instances_are_merged_and_supersede_the_results_sent_earlier(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    processor, sender = RecordingProcessor(), FlakySender(down=False)
    dispatcher = make(tmp_path / "w", clock, processor, sender)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1", "1.2")
    clock.advance(10)
    (first,) = dispatcher.dispatch_stable()
    clock.advance(60)  # a second association, long after the stability timer
    receive(dispatcher, STUDY, "1.3", "1.2")  # one new instance, one sent again
    clock.advance(10)
    with caplog.at_level(logging.INFO, logger="deploy_app.pacs"):
        (second,) = dispatcher.dispatch_stable()

    assert first.succeeded and second.succeeded and second.run_name == f"{STUDY}_2"
    assert processor.calls[1] == (dirs.processing / f"{STUDY}_2", ["1.1.dcm", "1.2.dcm", "1.3.dcm"])
    assert (dirs.processing / f"{STUDY}_2").exists() is False
    assert names(dirs.done / STUDY) == ["1.1.dcm", "1.2.dcm"]  # the earlier run is kept as it was
    assert names(dirs.done / f"{STUDY}_2") == ["1.1.dcm", "1.2.dcm", "1.3.dcm"]
    assert (dirs.done / f"{STUDY}_2" / "1.2.dcm").read_bytes() == b"instance 1.2"
    assert len(sender.delivered) == 2 and sender.delivered[1][0].endswith(f"{STUDY}_2")
    superseding = [r.getMessage() for r in caplog.records if "supersede" in r.getMessage()]
    assert any(f"arrived after run {STUDY};" in line for line in superseding), superseding
    assert any(f"supersede those sent earlier for run {STUDY} " in line for line in superseding)


def test_results_still_queued_when_late_instances_arrive_are_never_sent(
    tmp_path: Path, clock: FakeClock
) -> None:
    sender = FlakySender(down=True)
    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), sender)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "queued"
    receive(dispatcher, STUDY, "1.2")
    clock.advance(10)
    (second,) = dispatcher.dispatch_stable()
    assert second.state == "queued" and names(second.folder) == ["1.1.dcm", "1.2.dcm"]
    assert "never sent" in (dirs.done / f"{STUDY}.log").read_text()
    assert [e.run_name for e in dispatcher.queue.entries()] == [f"{STUDY}_2"]

    sender.down = False
    clock.advance(3600)
    (delivered,) = dispatcher.send_due()
    assert delivered.run_name == f"{STUDY}_2" and len(sender.delivered) == 1


# --- poison studies ---------------------------------------------------------------------------


def test_a_study_that_crashes_the_processor_is_retried_then_failed(tmp_path: Path, clock: FakeClock) -> None:
    processor = RecordingProcessor(RuntimeError("segfault-like failure"))
    dispatcher = make(tmp_path / "w", clock, processor, FlakySender(down=False))
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1")
    receive(dispatcher, OTHER, "2.1")
    clock.advance(10)
    first = dispatcher.dispatch_stable()
    assert [o.state for o in first] == ["retrying", "retrying"]
    assert read_json(dirs.attempts / f"{STUDY}.json")["attempts"] == 1
    assert names(dirs.incoming / STUDY) == ["1.1.dcm"] and list(dirs.outputs.iterdir()) == []
    clock.advance(10)
    second = dispatcher.dispatch_stable()
    assert [o.state for o in second] == ["failed", "failed"]
    log = (dirs.failed / f"{STUDY}.log").read_text()
    assert "given up after 2 processing attempts" in log and "segfault-like failure" in log
    assert len(processor.calls) == 4 and list(dirs.attempts.iterdir()) == []
    clock.advance(3600)
    assert dispatcher.dispatch_stable() == []  # never requeued again


def test_a_study_that_recovers_on_the_second_attempt_is_done(tmp_path: Path, clock: FakeClock) -> None:
    processor = RecordingProcessor(MemoryError("out of memory"), failures=1)
    dispatcher = make(tmp_path / "w", clock, processor, FlakySender(down=False))
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "retrying"
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.succeeded and list(dispatcher.collector.dirs.attempts.iterdir()) == []


def test_kills_during_processing_count_as_attempts(tmp_path: Path, clock: FakeClock) -> None:
    kills: list[Path] = []

    def killed_while_processing(input_dir: Path, output_dir: Path) -> list[Path]:
        # what a kill -9 at this moment leaves on disk
        kills.append(Path(shutil.copytree(tmp_path / f"w{len(kills)}", tmp_path / f"w{len(kills) + 1}")))
        (output_dir / "half.dcm").write_bytes(b"half written")
        raise KeyboardInterrupt  # stops this "process"; the copy is the state after the kill

    for attempt in (1, 2):
        dispatcher = make(tmp_path / f"w{attempt - 1}", clock, killed_while_processing)
        if attempt == 1:
            receive(dispatcher, STUDY, "1.1")
        dispatcher.start()
        clock.advance(10)
        with pytest.raises(KeyboardInterrupt):
            dispatcher.dispatch_stable()
        assert read_json(WorkDirs(kills[-1]).attempts / f"{STUDY}.json")["attempts"] == attempt

    processor = RecordingProcessor()
    after_two_kills = make(kills[-1], clock, processor)
    assert after_two_kills.collector.pending_studies() == {STUDY: 1}
    after_two_kills.start()
    clock.advance(10)
    (outcome,) = after_two_kills.dispatch_stable()
    assert outcome.state == "failed" and processor.calls == []  # not run a third time
    log = (WorkDirs(kills[-1]).failed / f"{STUDY}.log").read_text()
    assert "given up after 2 processing attempts" in log and "killed or crashed" in log
    assert names(outcome.folder) == ["1.1.dcm"]


def test_a_rerun_after_a_kill_does_not_send_what_the_killed_attempt_wrote(
    tmp_path: Path, clock: FakeClock
) -> None:
    dirs = WorkDirs(tmp_path / "w")
    dirs.create()
    (dirs.processing / STUDY).mkdir()
    (dirs.processing / STUDY / "1.1.dcm").write_bytes(b"a")
    (dirs.outputs / STUDY).mkdir()
    (dirs.outputs / STUDY / "stale.dcm").write_bytes(b"\0" * 128 + b"DICM stale")
    sender = FlakySender(down=False)
    dispatcher = make(dirs.root, clock, RecordingProcessor(), sender)
    dispatcher.start()
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.succeeded and names(dirs.outputs / STUDY) == ["sr.dcm"]
    assert len(sender.delivered) == 1 and len(sender.delivered[0]) == 1


def test_an_error_in_the_data_fails_at_the_first_attempt(tmp_path: Path, clock: FakeClock) -> None:
    processor = RecordingProcessor(UserInputError("no CT series with at least 16 slices"))
    dispatcher = make(tmp_path / "w", clock, processor, max_attempts=5)
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.state == "failed" and len(processor.calls) == 1
    assert "at least 16 slices" in (dispatcher.collector.dirs.failed / f"{STUDY}.log").read_text()


# --- restarts and modes -----------------------------------------------------------------------


def test_main_loads_the_models_before_it_recovers_the_work_dir(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path / "w")
    dirs.create()
    (dirs.processing / STUDY).mkdir()
    (dirs.processing / STUDY / "1.1.dcm").write_bytes(b"a")
    seen: list[bool] = []

    def make_processor(model: Path):
        seen.append((dirs.processing / STUDY).is_dir())  # nothing recovered yet
        raise UserInputError("stand-in: stop here")

    argv = ["--model", str(tmp_path), "--work-dir", str(dirs.root), "--port", "0"]
    with pytest.raises(SystemExit) as exit_status:
        pacs.main(argv, make_processor=make_processor)
    assert exit_status.value.code == 2 and seen == [True]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-attempts", "0"], "--max-attempts must be at least 1"),
        (["--send-retry-seconds", "0"], "must be positive"),
        (["--send-retry-seconds", "100", "--send-retry-max-seconds", "10"], "at most"),
    ],
)
def test_bad_retry_settings_are_user_errors(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--model", str(tmp_path), "--work-dir", str(tmp_path / "w"), *flags]
    with pytest.raises(SystemExit) as exit_status:
        pacs.main(argv, make_processor=lambda model: RecordingProcessor())
    assert exit_status.value.code == 2 and message in capsys.readouterr().err


def test_files_and_folders_get_umask_modes(tmp_path: Path, clock: FakeClock) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    sender = FlakySender(down=True)
    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), sender)
    receive(dispatcher, STUDY, "1.1")
    receive(dispatcher, OTHER, "2.1")
    clock.advance(10)
    dispatcher.dispatch_stable()  # both queued: outbox state files, attempts written and removed
    sender.down = False
    clock.advance(3600)
    dispatcher.send_due()
    dispatcher.processor = RecordingProcessor(UserInputError("bad"))
    receive(dispatcher, OTHER, "2.2")
    clock.advance(10)
    dispatcher.dispatch_stable()  # failed/<run>.log

    seen = {"file": 0, "folder": 0}
    for path in [dispatcher.collector.dirs.root, *dispatcher.collector.dirs.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        kind = "folder" if path.is_dir() else "file"
        seen[kind] += 1
        assert mode == (0o777 & ~mask if kind == "folder" else file_mode()), f"{path}: {mode:o}"
    assert seen["file"] >= 6 and seen["folder"] >= 8
    assert file_mode() == 0o666 & ~mask


# --- the app's results are new objects on every run -------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.demo_bundle import build_untrained_bundle

    return build_untrained_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def test_a_rerun_writes_new_series_and_instance_uids(tiny_bundle: Path, tmp_path: Path) -> None:
    from demo.study import write_demo_study

    write_demo_study(tmp_path / "study", seed=3, n_nodules=1)
    process = pacs.app_processor(tiny_bundle)
    runs = [process(tmp_path / "study", tmp_path / f"out{n}") for n in (1, 2)]
    uids = [
        {(str(h.Modality), str(h.SeriesInstanceUID), str(h.SOPInstanceUID)) for h in headers}
        for headers in ([pydicom.dcmread(p, stop_before_pixels=True) for p in run] for run in runs)
    ]
    assert len(uids[0]) == len(uids[1]) == 3
    first_series = {series for _, series, _ in uids[0]}
    assert not first_series & {series for _, series, _ in uids[1]}
    assert not {sop for *_, sop in uids[0]} & {sop for *_, sop in uids[1]}


# --- failures reach the PACS: the "analysis not performed" notice --------------------------------

NOTICE_PATIENT_ID = "PID-NOTICE-3141"
NOTICE_PATIENT_NAME = "Notice^Patient"
NO_SEEDS = "series 1 'Chest' (1.2.826.0.1.3680043.8.498.99): no nodule seeds: no seeds SR, SEG or seeds file"


class RecordingSender:
    """A sender that is up (or not) and keeps the datasets it delivered."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.delivered: list[list[pydicom.Dataset]] = []

    def __call__(self, files) -> None:
        from deploy_app.pacs_net import SendError

        if self.down:
            raise SendError("PACS@127.0.0.1:104: could not open an association (refused)")
        self.delivered.append([pydicom.dcmread(f) for f in files])


def receive_ct(dispatcher: StudyDispatcher, tmp_path: Path, study: str, slices: int = 2) -> list[str]:
    """Receive a small real CT series (real headers: the notice is built from one)."""
    import numpy as np

    from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

    written = write_ct_series(
        np.zeros((slices, 4, 4)),
        CTGeometry((slices, 4, 4), (1.0, 1.0), 1.0),
        tmp_path / f"ct_{study}_{len(list(tmp_path.glob('ct_*')))}",
        patient=SyntheticPatient(NOTICE_PATIENT_ID, NOTICE_PATIENT_NAME),
        study_uid=study,
    )
    for path, uid in zip(written.files, written.sop_instance_uids, strict=True):
        dispatcher.collector.store(study, uid, path.read_bytes())
    return list(written.sop_instance_uids)


def notifier() -> pacs.FailureNoticeWriter:
    return pacs.FailureNoticeWriter(model_name="test_bundle", model_version="9.9")


def test_a_study_without_seeds_is_kept_and_its_notice_is_sent(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sender = RecordingSender()
    processor = RecordingProcessor(
        pacs.SeriesFailures([NO_SEEDS, "series 2 'Scout' (1.2.3): too few slices"])
    )
    dispatcher = make(tmp_path / "w", clock, processor, sender, notifier=notifier(), keep_received_hours=0)
    dirs = dispatcher.collector.dirs
    received = receive_ct(dispatcher, tmp_path, STUDY)
    clock.advance(10)
    with caplog.at_level(logging.INFO, logger="deploy_app.pacs"):
        (outcome,) = dispatcher.dispatch_stable()
        dispatcher.purge_received()
        clock.advance(10 * 24 * 3600)
        dispatcher.purge_received()

    assert outcome.state == "failed" and outcome.folder == dirs.failed / STUDY
    assert names(outcome.folder) == sorted(f"{uid}.dcm" for uid in received)  # kept for inspection
    assert outcome.outputs == (dirs.outputs / STUDY / pacs.NOTICE_FILE,)
    ((notice,),) = sender.delivered
    assert notice.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage and notice.StudyInstanceUID == STUDY
    assert notice.DocumentTitle == "Analysis not performed" and notice.PatientID == NOTICE_PATIENT_ID
    assert notice.SeriesDescription == "Semantic CLIP: analysis not performed"
    assert notice.SoftwareVersions == "9.9"
    log = (dirs.failed / f"{STUDY}.log").read_text()
    assert "no nodule seeds" in log and "notice written" in log and "notice was delivered" in log
    assert list(dirs.outbox.iterdir()) == [] and list(dirs.done.iterdir()) == []
    messages = [record.getMessage() for record in caplog.records]
    assert any("analysis-not-performed notice sent" in line for line in messages), messages
    assert not any(NOTICE_PATIENT_ID in line or NOTICE_PATIENT_NAME in line for line in messages)
    assert not any("Notice, Patient" in line for line in messages)


def test_an_undelivered_notice_waits_in_the_outbox_and_survives_a_restart(
    tmp_path: Path, clock: FakeClock
) -> None:
    sender = RecordingSender(down=True)
    processor = RecordingProcessor(UserInputError("every seed lies outside the scan"))
    dispatcher = make(tmp_path / "w", clock, processor, sender, notifier=notifier(), send_retry_seconds=30)
    dirs = dispatcher.collector.dirs
    receive_ct(dispatcher, tmp_path, STUDY)
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.state == "failed" and names(dirs.failed) == [STUDY, f"{STUDY}.log"]
    state = read_json(dirs.outbox / f"{STUDY}.json")
    assert state["notice"] is True and state["files"] == [pacs.NOTICE_FILE] and state["attempts"] == 1
    assert names(dirs.outbox) == [f"{STUDY}.json"]  # the instances stay in failed/

    restarted_sender = RecordingSender()
    restarted = make(dirs.root, clock, RecordingProcessor(), restarted_sender, notifier=notifier())
    (notified,) = restarted.send_due()
    assert notified.state == "notified" and notified.final and not notified.succeeded
    assert notified.folder == dirs.failed / STUDY and names(dirs.failed / STUDY)
    assert len(restarted_sender.delivered) == 1 and list(dirs.outbox.iterdir()) == []
    assert "delivered after 2 attempts" in (dirs.failed / f"{STUDY}.log").read_text()
    assert list(dirs.done.iterdir()) == []


def test_a_study_given_up_after_its_attempts_gets_a_notice(tmp_path: Path, clock: FakeClock) -> None:
    sender, reasons = RecordingSender(), []
    writer = notifier()

    def recording_notifier(study_dir: Path, output_dir: Path, given: list[str], run_name: str) -> Path:
        reasons.append(list(given))
        return writer(study_dir, output_dir, given, run_name)

    processor = RecordingProcessor(RuntimeError("segfault-like failure"))
    dispatcher = make(tmp_path / "w", clock, processor, sender, notifier=recording_notifier)
    receive_ct(dispatcher, tmp_path, STUDY)
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "retrying" and sender.delivered == []
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.state == "failed" and len(sender.delivered) == 1
    ((reason,),) = reasons
    assert "failed 2 times in a row with an internal error" in reason and "segfault-like failure" in reason
    assert sender.delivered[0][0].DocumentTitle == "Analysis not performed"


def test_a_notice_that_cannot_be_made_is_logged_and_the_listener_goes_on(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sender = RecordingSender()
    processor = RecordingProcessor(UserInputError("no CT series with at least 16 slices"))
    dispatcher = make(tmp_path / "w", clock, processor, sender, notifier=notifier())
    receive(dispatcher, STUDY, "1.1")  # not DICOM: no header to build the notice from
    receive(dispatcher, OTHER, "2.1")
    clock.advance(10)
    with caplog.at_level(logging.ERROR, logger="deploy_app.pacs"):
        first, second = dispatcher.dispatch_stable()
    assert first.state == second.state == "failed" and first.outputs == ()
    assert sender.delivered == [] and list(dispatcher.collector.dirs.outbox.iterdir()) == []
    assert any("notice could not be written" in r.getMessage() for r in caplog.records)

    def broken(*args) -> Path:
        raise RuntimeError("reportlab exploded")

    dispatcher.notifier = broken
    receive(dispatcher, STUDY, "1.2")
    clock.advance(10)
    (third,) = dispatcher.dispatch_stable()
    assert third.state == "failed" and "reportlab exploded" in caplog.text


def test_results_of_a_later_run_supersede_an_unsent_notice(tmp_path: Path, clock: FakeClock) -> None:
    sender = RecordingSender(down=True)
    processor = RecordingProcessor(UserInputError("no nodule seeds"), failures=1)
    dispatcher = make(tmp_path / "w", clock, processor, sender, notifier=notifier())
    dirs = dispatcher.collector.dirs
    receive_ct(dispatcher, tmp_path, STUDY)
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "failed"
    receive(dispatcher, STUDY, "1.9")  # the seeds, sent later
    clock.advance(10)
    (second,) = dispatcher.dispatch_stable()
    assert second.state == "queued" and [e.run_name for e in dispatcher.queue.entries()] == [f"{STUDY}_2"]
    assert "never sent" in (dirs.failed / f"{STUDY}.log").read_text()
    sender.down = False
    clock.advance(3600)
    (delivered,) = dispatcher.send_due()
    assert delivered.succeeded and len(sender.delivered) == 1


def test_without_a_destination_the_notice_is_kept_in_the_outputs(tmp_path: Path, clock: FakeClock) -> None:
    processor = RecordingProcessor(UserInputError("no nodule seeds"))
    dispatcher = make(tmp_path / "w", clock, processor, notifier=notifier())
    receive_ct(dispatcher, tmp_path, STUDY)
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    dirs = dispatcher.collector.dirs
    assert outcome.state == "failed" and names(dirs.outputs / STUDY) == [pacs.NOTICE_FILE]
    assert list(dirs.outbox.iterdir()) == []


# --- --keep-received ------------------------------------------------------------------------------


def test_received_images_are_deleted_after_delivery_and_the_record_stays(
    tmp_path: Path, clock: FakeClock
) -> None:
    sender = FlakySender(down=False)
    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), sender, keep_received_hours=2)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1", "1.2")
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.succeeded and names(dirs.done / STUDY) == ["1.1.dcm", "1.2.dcm"]
    record = read_json(dirs.done / f"{STUDY}.json")
    assert record["finished"] == "delivered" and record["finished_at"] == clock.now
    assert record["received_instances"] == ["1.1", "1.2"] and record["results"] == ["sr.dcm"]
    assert record["received_deleted_at"] is None

    clock.advance(2 * 3600 - 1)
    assert dispatcher.purge_received() == [] and names(dirs.done / STUDY) == ["1.1.dcm", "1.2.dcm"]
    clock.advance(1)
    assert dispatcher.purge_received() == [STUDY]
    assert names(dirs.done) == [STUDY, f"{STUDY}.json"] and names(dirs.done / STUDY) == []
    record = read_json(dirs.done / f"{STUDY}.json")
    assert record["received_deleted_at"] == clock.now and record["received_deleted"] == 2
    assert record["received_instances"] == ["1.1", "1.2"]  # what was received stays on record
    assert names(dirs.outputs / STUDY) == ["sr.dcm"]  # the results delivered are kept
    clock.advance(3600)
    assert dispatcher.purge_received() == []


def test_zero_hours_deletes_right_after_success_also_without_a_destination(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), keep_received_hours=0)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].succeeded
    assert dispatcher.purge_received() == [STUDY] and names(dirs.done / STUDY) == []
    assert read_json(dirs.done / f"{STUDY}.json")["finished"] == "kept"

    # late instances: the earlier run has nothing left to merge; the new ones are analysed alone
    receive(dispatcher, STUDY, "1.2")
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="deploy_app.pacs"):
        (late,) = dispatcher.dispatch_stable()
    assert late.run_name == f"{STUDY}_2" and names(late.folder) == ["1.2.dcm"]
    assert "no longer kept (--keep-received)" in caplog.text


def test_failed_studies_are_never_deleted(tmp_path: Path, clock: FakeClock) -> None:
    processor = RecordingProcessor(UserInputError("no nodule seeds"))
    dispatcher = make(tmp_path / "w", clock, processor, FlakySender(down=False), keep_received_hours=0)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "failed"
    clock.advance(365 * 24 * 3600)
    assert dispatcher.purge_received() == []
    restarted = make(dirs.root, clock, RecordingProcessor(), keep_received_hours=0)
    assert restarted.purge_received() == []
    assert names(dirs.failed / STUDY) == ["1.1.dcm"] and list(dirs.done.iterdir()) == []


def test_the_schedule_survives_a_restart_by_record_or_folder_time(tmp_path: Path) -> None:
    clock = FakeClock(now=1_700_000_000.0)  # epoch seconds: compared with file modification times
    first = make(tmp_path / "w", clock, RecordingProcessor(), FlakySender(down=False), keep_received_hours=1)
    dirs = first.collector.dirs
    receive(first, STUDY, "1.1")
    clock.advance(10)
    assert first.dispatch_stable()[0].succeeded
    # a run that finished before --keep-received was used: no record, the folder's time counts
    (dirs.done / OTHER).mkdir()
    (dirs.done / OTHER / "2.1.dcm").write_bytes(b"old")
    os.utime(dirs.done / OTHER, (clock.now - 1800, clock.now - 1800))

    clock.advance(1800)  # the listener is restarted half an hour later
    restarted = make(dirs.root, clock, RecordingProcessor(), FlakySender(down=False), keep_received_hours=1)
    assert restarted.purge_received() == [OTHER]  # its folder is an hour old
    assert read_json(dirs.done / f"{OTHER}.json")["finished"] == "unrecorded"
    assert names(dirs.done / STUDY) == ["1.1.dcm"]
    clock.advance(1800)
    assert restarted.purge_received() == [STUDY] and names(dirs.done / STUDY) == []


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "soon"])
def test_keep_received_refuses_what_is_not_zero_or_more_hours(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--model", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--keep-received", value]
    with pytest.raises(SystemExit) as exit_status:
        pacs.main(argv, make_processor=lambda model: RecordingProcessor())
    assert exit_status.value.code == 2 and "--keep-received" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_keep_received_defaults_to_zero_and_takes_hours() -> None:
    base = ["--model", "m", "--work-dir", "w"]
    assert pacs.build_parser().parse_args(base).keep_received == 0.0
    assert pacs.build_parser().parse_args([*base, "--keep-received", "36.5"]).keep_received == 36.5
    assert pacs.build_parser().parse_args([*base, "--keep-received", "inf"]).keep_received == float("inf")


def test_a_run_superseded_before_it_was_sent_is_purged_without_touching_the_newer_one(
    tmp_path: Path, clock: FakeClock
) -> None:
    sender = FlakySender(down=True)
    dispatcher = make(tmp_path / "w", clock, RecordingProcessor(), sender, keep_received_hours=0)
    dirs = dispatcher.collector.dirs
    receive(dispatcher, STUDY, "1.1")
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "queued"
    receive(dispatcher, STUDY, "1.2")
    clock.advance(10)
    assert dispatcher.dispatch_stable()[0].state == "queued"
    assert read_json(dirs.done / f"{STUDY}.json")["finished"] == "superseded"
    assert dispatcher.purge_received() == [STUDY] and names(dirs.done / STUDY) == []
    assert names(dirs.outbox / f"{STUDY}_2") == ["1.1.dcm", "1.2.dcm"]  # waiting: kept whole
    assert (dirs.outbox / f"{STUDY}_2" / "1.1.dcm").read_bytes() == b"instance 1.1"
    sender.down = False
    clock.advance(3600)
    assert dispatcher.send_due()[0].succeeded
    assert dispatcher.purge_received() == [f"{STUDY}_2"] and names(dirs.done / f"{STUDY}_2") == []
