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
