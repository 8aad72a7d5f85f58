"""The PACS listener under load and under ``kill -9``, over real DICOM associations.

These tests open many listening sockets and a listener subprocess, so they run only in the private
network namespace of ``make test`` (LNSC_PRIVATE_NETNS=1), as the Orthanc tests do:

    unshare -rn sh -c 'ip link set lo up && LNSC_PRIVATE_NETNS=1 .venv/bin/python -m pytest -q \
        tests/test_pacs_load.py'

The app is replaced by a stand-in processor (:func:`test_pacs_support.standin_processor`, one small
DICOM result per study that names the instances it saw), so no model is needed. Timings are
printed, never asserted; every wait has a generous deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import EncapsulatedPDFStorage, generate_uid
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from test_pacs_support import HOLD_ENV, MARK_ENV, POISON_ENV, instance_digest, standin_processor

from conftest import CI_STRICT, REPO_ROOT
from deploy_app.pacs import (
    STORAGE_CLASSES,
    DicomDestination,
    DicomSender,
    StorageServer,
    StudyCollector,
    StudyDispatcher,
    WorkDirs,
    enable_tcp_nodelay,
    run_listener,
)
from training.dicom_ct import CTGeometry, SyntheticPatient, WrittenSeries, write_ct_series

SUPPORT_SCRIPT = Path(__file__).with_name("test_pacs_support.py")


@pytest.fixture(autouse=True)
def private_network_namespace() -> None:
    if os.environ.get("LNSC_PRIVATE_NETNS") != "1":
        reason = "starts listeners: only in a private network namespace (LNSC_PRIVATE_NETNS=1, `make test`)"
        (pytest.fail if CI_STRICT else pytest.skip)(reason)


def series(directory: Path, study_uid: str, slices: int) -> WrittenSeries:
    geometry = CTGeometry(shape=(slices, 8, 8), pixel_spacing=(1.0, 1.0), slice_spacing=2.0)
    volume = np.arange(np.prod(geometry.shape), dtype=np.int16).reshape(geometry.shape)
    return write_ct_series(
        volume, geometry, directory, patient=SyntheticPatient("LOAD1"), study_uid=study_uid
    )


def vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds:g} s")
        time.sleep(0.05)


class Destination:
    """A Storage SCP standing in for the PACS; can hold C-STOREs (to kill the sender mid-send)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: every C-STORE received: (StudyInstanceUID, SOPInstanceUID, ImageComments)
        self.arrivals: list[tuple[str, str, str]] = []
        #: the "analysis not performed" notices received (Encapsulated PDF), kept apart from results
        self.notices: list[Dataset] = []
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.ae = AE(ae_title="PACS")
        self.ae.maximum_associations = 64
        for storage_class in (*STORAGE_CLASSES, EncapsulatedPDFStorage):
            self.ae.add_supported_context(storage_class, DEFAULT_TRANSFER_SYNTAXES)
        self.server = self.ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, enable_tcp_nodelay)],
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:
        if self.hold.is_set():
            self.holding.set()
            self.release.wait(60)
        dataset: Dataset = event.dataset
        with self.lock:
            if dataset.SOPClassUID == EncapsulatedPDFStorage:
                self.notices.append(dataset)
                return 0x0000
            self.arrivals.append(
                (str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID), str(dataset.ImageComments))
            )
        return 0x0000

    def results(self) -> dict[str, set[tuple[str, str]]]:
        """Study -> the distinct (SOP Instance UID, digest) results received."""
        with self.lock:
            found: dict[str, set[tuple[str, str]]] = {}
            for study, sop, digest in self.arrivals:
                found.setdefault(study, set()).add((sop, digest))
            return found

    def stop(self) -> None:
        self.release.set()
        self.ae.shutdown()


@pytest.fixture
def destination() -> Iterator[Destination]:
    scp = Destination()
    yield scp
    scp.stop()


# --- load ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_concurrent_senders_are_processed_apart_and_returned(
    tmp_path: Path, destination: Destination
) -> None:
    senders, slices = 20, 8
    studies = [series(tmp_path / f"ct{n}", generate_uid(), slices) for n in range(senders)]
    work = StudyCollector(WorkDirs(tmp_path / "work"), stable_seconds=0.5)
    dispatcher = StudyDispatcher(
        work, standin_processor, DicomSender(DicomDestination("PACS", "127.0.0.1", destination.port), "LNSC")
    )
    listener = StorageServer(work, ae_title="LNSC", port=0)
    stop = threading.Event()
    outcomes: list = []
    loop = threading.Thread(
        target=lambda: outcomes.extend(run_listener(listener, dispatcher, stop, poll_seconds=0.05))
    )
    rss_before = vm_rss_kib()
    started = time.monotonic()
    loop.start()
    try:
        assert listener.listening.wait(10)
        address = DicomDestination("LNSC", *listener.address)
        errors: list[BaseException] = []
        barrier = threading.Barrier(senders)

        def send(index: int) -> None:
            try:
                barrier.wait(30)
                DicomSender(address, f"MODALITY{index}")(studies[index].files)
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        received = time.monotonic()
        wait_for(lambda: len(destination.results()) == senders, 60, "all results arriving")
        finished = time.monotonic()
    finally:
        stop.set()
        loop.join(30)
    rss_after = vm_rss_kib()

    results = destination.results()
    for study in studies:
        ((_, digest),) = results[study.study_instance_uid]  # one result, of this study only
        assert digest == instance_digest(study.sop_instance_uids)
        assert len(list((work.dirs.done / study.study_instance_uid).iterdir())) == slices
    assert len(destination.arrivals) == senders  # each result sent once
    assert sorted(o.state for o in outcomes) == ["done"] * senders
    for folder in (work.dirs.incoming, work.dirs.processing, work.dirs.outbox, work.dirs.failed):
        assert list(folder.iterdir()) == [], folder
    growth_mib = (rss_after - rss_before) / 1024
    print(
        f"\nload: {senders} senders x {slices} instances received in {received - started:.2f} s, "
        f"all {senders} results back after {finished - started:.2f} s; listener RSS "
        f"{rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB ({growth_mib:+.1f} MiB)"
    )
    assert growth_mib < 300  # generous: a leak per instance or association would show far beyond it


# --- kill -9 ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ListenerProcess:
    """``python tests/test_pacs_support.py`` (the listener's CLI with the stand-in processor)."""

    def __init__(self, tmp_path: Path, destination_port: int, extra_env: dict[str, str]) -> None:
        self.work = tmp_path / "work"
        self.port = free_port()
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.command = [
            sys.executable,
            str(SUPPORT_SCRIPT),
            "--model",
            str(tmp_path),  # ignored by the stand-in
            "--work-dir",
            str(self.work),
            "--ae-title",
            "LNSC",
            "--port",
            str(self.port),
            "--destination",
            f"PACS@127.0.0.1:{destination_port}",
            "--stable-seconds",
            "3",
            "--send-retry-seconds",
            "0.5",
            "--send-retry-max-seconds",
            "1",
            "--keep-received",  # the tests look at the received instances in done/
            "inf",
        ]
        self.env = {**os.environ, **extra_env}
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.logs / f"run{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        wait_for(self.answers_echo, 60, "the listener answering C-ECHO")

    def answers_echo(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"the listener exited ({self.process.returncode}):\n{self.log()[-3000:]}")
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.connection_timeout = 2
        association = ae.associate("127.0.0.1", self.port, ae_title="LNSC")
        if not association.is_established:
            return False
        association.release()
        return True

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.kills += 1

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.logs.iterdir()))


def open_association(port: int):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    association = ae.associate(
        "127.0.0.1", port, ae_title="LNSC", evt_handlers=[(evt.EVT_CONN_OPEN, enable_tcp_nodelay)]
    )
    assert association.is_established
    return association


def settled(work: WorkDirs) -> bool:
    """Nothing is being received, processed or waiting to be sent."""
    return all(not any(folder.iterdir()) for folder in (work.incoming, work.processing, work.outbox))


@pytest.mark.slow
def test_kill_9_while_receiving_processing_and_sending_loses_nothing(
    tmp_path: Path, destination: Destination
) -> None:
    hold = tmp_path / "hold-processing"
    marks = tmp_path / "marks"
    marks.mkdir()
    listener = ListenerProcess(tmp_path, destination.port, {HOLD_ENV: str(hold), MARK_ENV: str(marks)})
    processed = series(tmp_path / "ct_p", generate_uid(), 6)  # killed while processed, then while sent
    received = series(tmp_path / "ct_r", generate_uid(), 8)  # killed while being received
    work = WorkDirs(listener.work)
    acknowledged: set[str] = set()
    started = time.monotonic()
    try:
        # 1. processing is held; a second study is half received when the listener is killed
        hold.touch()
        listener.start()
        DicomSender(DicomDestination("LNSC", "127.0.0.1", listener.port), "MODALITY")(processed.files)
        wait_for(lambda: (marks / f"{processed.study_instance_uid}.started").exists(), 30, "processing")
        association = open_association(listener.port)
        for path in received.files[:4]:
            assert association.send_c_store(path).Status == 0x0000
            acknowledged.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        listener.kill()  # mid-association and mid-processing
        association.abort()
        on_disk = {p.stem for p in (work.incoming / received.study_instance_uid).glob("*.dcm")}
        assert acknowledged <= on_disk  # every acknowledged instance was on disk before the ack

        # 2. restarted: the sender sends the whole study again (as a PACS retries); the processed
        #    study runs again and is killed while the destination holds its results
        hold.unlink()
        destination.hold.set()
        listener.start()
        DicomSender(DicomDestination("LNSC", "127.0.0.1", listener.port), "MODALITY")(received.files)
        assert destination.holding.wait(60), listener.log()[-3000:]
        listener.kill()
        destination.hold.clear()
        destination.release.set()
        assert (work.outbox / f"{processed.study_instance_uid}.json").exists()

        # 3. restarted: the queued results are sent again, the other study is processed and sent
        listener.start()
        wait_for(
            lambda: settled(work) and len(destination.results()) == 2, 60, "both studies done and delivered"
        )
        finished = time.monotonic()
    finally:
        listener.stop()
        destination.release.set()
    log = listener.log()

    results = destination.results()
    (p_result,) = results[processed.study_instance_uid]  # one result object: one run, resent
    assert p_result[1] == instance_digest(processed.sop_instance_uids)
    assert sorted(p.name for p in work.done.iterdir() if p.is_dir() and "_" not in p.name) == sorted(
        [processed.study_instance_uid, received.study_instance_uid]
    )
    assert len(list((work.done / processed.study_instance_uid).iterdir())) == 6
    r_runs = sorted(p for p in work.done.glob(f"{received.study_instance_uid}*") if p.is_dir())
    # normally one run; a second (superseding, with every instance) only if the timer beat the resend
    assert len(results[received.study_instance_uid]) == len(r_runs)
    assert len(list(r_runs[-1].iterdir())) == 8
    assert any(
        digest == instance_digest(received.sop_instance_uids)
        for _, digest in results[received.study_instance_uid]
    )
    assert list(work.failed.iterdir()) == [] and list(work.attempts.iterdir()) == []
    assert "LOAD1" not in log  # never a patient ID in the log
    arrivals = [sop for study, sop, _ in destination.arrivals if study == processed.study_instance_uid]
    print(
        f"\nkill -9: {listener.kills} kills, {listener.starts} starts; {len(acknowledged)} instances "
        f"acknowledged before the first kill, all kept; the held result arrived {len(arrivals)} times "
        f"as {len(set(arrivals))} object; settled {finished - started:.1f} s after the first start"
    )


@pytest.mark.slow
def test_a_study_that_kills_the_listener_is_failed_after_max_attempts(
    tmp_path: Path, destination: Destination
) -> None:
    poison = series(tmp_path / "ct_x", generate_uid(), 4)
    good = series(tmp_path / "ct_g", generate_uid(), 4)
    listener = ListenerProcess(tmp_path, destination.port, {POISON_ENV: poison.study_instance_uid})
    work = WorkDirs(listener.work)
    try:
        listener.start()
        for study in (poison, good):
            DicomSender(DicomDestination("LNSC", "127.0.0.1", listener.port), "MODALITY")(study.files)
        deadline = time.monotonic() + 90
        while not (settled(work) and (work.failed / f"{poison.study_instance_uid}.log").exists()):
            assert time.monotonic() < deadline, listener.log()[-3000:]
            if not listener.alive():  # the poison study killed it: a supervisor restarts it
                assert listener.starts <= 4, listener.log()[-3000:]
                listener.start()
            time.sleep(0.1)
        wait_for(lambda: good.study_instance_uid in destination.results(), 30, "the good study's results")
        poison_log = work.failed / f"{poison.study_instance_uid}.log"
        wait_for(lambda: "notice was delivered" in poison_log.read_text(), 30, "the poison study's notice")
    finally:
        listener.stop()
    reason = (work.failed / f"{poison.study_instance_uid}.log").read_text()
    assert "given up after 2 processing attempts" in reason and "killed or crashed" in reason
    assert len(list((work.failed / poison.study_instance_uid).iterdir())) == 4  # instances kept
    assert poison.study_instance_uid not in destination.results()
    (notice,) = destination.notices  # the PACS learns that the study was not analysed, and why
    assert notice.StudyInstanceUID == poison.study_instance_uid
    assert notice.DocumentTitle == "Analysis not performed"
    assert (work.done / good.study_instance_uid).is_dir()
    print(f"\npoison: the listener was killed by the study {listener.starts - 1} times, then gave it up")
