"""The PACS listener (deploy_app.pacs): grouping, stability timer, dispatch, DICOM networking, Orthanc."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from conftest import CI_STRICT, REPO_ROOT
from demo.study import write_demo_study
from deploy_app import pacs, pacs_net
from deploy_app.inference import BundleModels
from deploy_app.pacs import (
    DicomDestination,
    DicomSender,
    SendError,
    StorageServer,
    StudyCollector,
    StudyDispatcher,
    WorkDirs,
    enable_tcp_nodelay,
    run_listener,
)
from deploy_app.sr_reader import read_measurement_report
from scripts.errors import UserInputError
from scripts.transforms import LoadCT, nine_planes_for_seeds
from training.demo_bundle import build_untrained_bundle
from training.dicom_ct import CTGeometry, SyntheticPatient, WrittenSeries, write_ct_series

STUDY_A = "1.2.826.0.1.3680043.8.498.1"
STUDY_B = "1.2.826.0.1.3680043.8.498.2"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingProcessor:
    """Writes one result file per study; can be told to fail."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls: list[tuple[Path, list[str]]] = []

    def __call__(self, input_dir: Path, output_dir: Path) -> list[Path]:
        self.calls.append((input_dir, sorted(p.name for p in input_dir.iterdir())))
        if self.error is not None:
            raise self.error
        result = output_dir / "sr.dcm"
        result.write_bytes(b"result of " + input_dir.name.encode())
        return [result]


def instance_bytes(sop_uid: str) -> bytes:
    return b"\0" * 128 + b"DICM" + sop_uid.encode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def collector(tmp_path: Path, clock: FakeClock) -> StudyCollector:
    return StudyCollector(WorkDirs(tmp_path / "work"), stable_seconds=10, clock=clock)


def test_instances_are_grouped_per_study_and_written_whole(collector: StudyCollector) -> None:
    collector.store(STUDY_A, "1.2.3.1", instance_bytes("1.2.3.1"))
    collector.store(STUDY_B, "1.2.3.2", instance_bytes("1.2.3.2"))
    collector.store(STUDY_A, "1.2.3.3", instance_bytes("1.2.3.3"))
    incoming = collector.dirs.incoming
    assert sorted(p.name for p in (incoming / STUDY_A).iterdir()) == ["1.2.3.1.dcm", "1.2.3.3.dcm"]
    assert [p.name for p in (incoming / STUDY_B).iterdir()] == ["1.2.3.2.dcm"]
    assert (incoming / STUDY_A / "1.2.3.3.dcm").read_bytes() == instance_bytes("1.2.3.3")
    assert collector.pending_studies() == {STUDY_A: 2, STUDY_B: 1}


@pytest.mark.parametrize(
    "study_uid, sop_uid", [("../../etc", "1.2"), ("1.2", "1.2/../x"), ("", "1.2"), ("1.2.a", "1")]
)
def test_uids_that_are_not_uids_never_become_paths(
    collector: StudyCollector, study_uid: str, sop_uid: str
) -> None:
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        collector.store(study_uid, sop_uid, b"x")
    assert list(collector.dirs.incoming.iterdir()) == []


def test_a_study_is_stable_only_after_a_quiet_period(collector: StudyCollector, clock: FakeClock) -> None:
    collector.store(STUDY_A, "1.1", b"a")
    clock.advance(6)
    collector.store(STUDY_B, "2.1", b"b")
    assert collector.stable_studies() == []
    clock.advance(5)
    assert collector.stable_studies() == [STUDY_A]
    collector.store(STUDY_A, "1.2", b"a")  # a late instance restarts the study's timer
    assert collector.stable_studies() == []
    clock.advance(5)
    assert collector.stable_studies() == [STUDY_B]
    clock.advance(5)
    assert collector.stable_studies() == [STUDY_B, STUDY_A]


def test_dispatch_processes_stable_studies_sends_and_files_them(
    collector: StudyCollector, clock: FakeClock
) -> None:
    processor, sent = RecordingProcessor(), []
    dispatcher = StudyDispatcher(collector, processor, sender=sent.append, clock=clock)
    collector.store(STUDY_A, "1.1", b"a")
    collector.store(STUDY_A, "1.2", b"a")
    assert dispatcher.dispatch_stable() == []
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()

    dirs = collector.dirs
    assert outcome.succeeded and outcome.reason is None
    assert outcome.folder == dirs.done / STUDY_A
    assert sorted(p.name for p in outcome.folder.iterdir()) == ["1.1.dcm", "1.2.dcm"]
    assert processor.calls == [(dirs.processing / STUDY_A, ["1.1.dcm", "1.2.dcm"])]
    assert outcome.outputs == (dirs.outputs / STUDY_A / "sr.dcm",)
    assert sent == [outcome.outputs]
    assert list(dirs.incoming.iterdir()) == [] and list(dirs.processing.iterdir()) == []
    assert collector.pending_studies() == {}


@pytest.mark.parametrize("failing", ["processor", "unexpected"])
def test_a_failing_study_is_filed_with_its_reason_and_the_next_one_still_runs(
    collector: StudyCollector, clock: FakeClock, failing: str
) -> None:
    errors = {
        "processor": UserInputError("no CT series with at least 16 slices"),
        "unexpected": RuntimeError("bug"),
    }
    failing_processor = RecordingProcessor(errors[failing])
    # one attempt: the retries of unexpected errors are tested in test_pacs_queue.py
    dispatcher = StudyDispatcher(
        collector, failing_processor, sender=lambda files: None, clock=clock, max_attempts=1
    )
    collector.store(STUDY_A, "1.1", b"a")
    clock.advance(1)
    collector.store(STUDY_B, "2.1", b"b")
    clock.advance(10)
    first, second = dispatcher.dispatch_stable()

    dirs = collector.dirs
    assert not first.succeeded and first.folder == dirs.failed / STUDY_A
    assert [p.name for p in first.folder.iterdir()] == ["1.1.dcm"]
    expected = {"processor": "at least 16 slices", "unexpected": "RuntimeError: bug"}
    assert expected[failing] in first.reason
    assert expected[failing] in (dirs.failed / f"{STUDY_A}.log").read_text()
    assert second.study_uid == STUDY_B and second.folder.parent == dirs.failed  # tried, not skipped
    assert len(failing_processor.calls) == 2

    dispatcher.processor, dispatcher.sender = RecordingProcessor(), lambda files: None
    collector.store(STUDY_A, "1.1", b"a")  # the study sent again after a fix
    clock.advance(10)
    (retry,) = dispatcher.dispatch_stable()
    assert retry.succeeded and retry.folder == dirs.done / f"{STUDY_A}_2"
    assert retry.outputs == (dirs.outputs / f"{STUDY_A}_2" / "sr.dcm",)


def test_instances_arriving_while_a_study_is_processed_start_a_new_batch(
    collector: StudyCollector, clock: FakeClock
) -> None:
    def processor(input_dir: Path, output_dir: Path) -> list[Path]:
        collector.store(STUDY_A, "1.9", b"late")
        return []

    dispatcher = StudyDispatcher(collector, processor, clock=clock)
    collector.store(STUDY_A, "1.1", b"a")
    clock.advance(10)
    (outcome,) = dispatcher.dispatch_stable()
    assert outcome.succeeded and [p.name for p in outcome.folder.iterdir()] == ["1.1.dcm"]
    assert collector.pending_studies() == {STUDY_A: 1}
    assert [p.name for p in (collector.dirs.incoming / STUDY_A).iterdir()] == ["1.9.dcm"]


def test_an_interrupted_study_goes_back_to_the_queue(collector: StudyCollector, clock: FakeClock) -> None:
    dispatcher = StudyDispatcher(collector, RecordingProcessor(KeyboardInterrupt()), clock=clock)
    collector.store(STUDY_A, "1.1", b"a")
    clock.advance(10)
    with pytest.raises(KeyboardInterrupt):
        dispatcher.dispatch_stable()
    dirs = collector.dirs
    assert [p.name for p in (dirs.incoming / STUDY_A).iterdir()] == ["1.1.dcm"]
    assert list(dirs.processing.iterdir()) == [] and list(dirs.outputs.iterdir()) == []
    assert collector.pending_studies() == {STUDY_A: 1}
    assert list(dirs.attempts.iterdir()) == []  # the operator's interrupt is not the study's fault


def test_a_restart_picks_up_what_the_previous_run_left(tmp_path: Path, clock: FakeClock) -> None:
    dirs = WorkDirs(tmp_path / "work")
    dirs.create()
    (dirs.processing / STUDY_A).mkdir()
    (dirs.processing / STUDY_A / "1.1.dcm").write_bytes(b"a")
    (dirs.incoming / STUDY_B).mkdir()
    (dirs.incoming / STUDY_B / "2.1.dcm").write_bytes(b"b")
    (dirs.incoming / STUDY_B / ".2.2.dcm.x.tmp").write_bytes(b"half")
    collector = StudyCollector(dirs, stable_seconds=10, clock=clock)
    assert collector.pending_studies() == {STUDY_A: 1, STUDY_B: 1}
    assert [p.name for p in (dirs.incoming / STUDY_B).iterdir()] == ["2.1.dcm"]
    clock.advance(600)  # loading the models: the recovered studies' timers have not started yet
    assert collector.stable_studies() == []
    StudyDispatcher(collector, RecordingProcessor(), clock=clock).start()
    clock.advance(9)
    assert collector.stable_studies() == []
    clock.advance(1)
    assert sorted(collector.stable_studies()) == sorted([STUDY_A, STUDY_B])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ORTHANC@127.0.0.1:4242", ("ORTHANC", "127.0.0.1", 4242)),
        ("PACS_1@pacs.example.org:104", ("PACS_1", "pacs.example.org", 104)),
    ],
)
def test_destination_parses(text: str, expected: tuple) -> None:
    destination = DicomDestination.parse(text)
    assert (destination.ae_title, destination.host, destination.port) == expected
    assert str(destination) == text


@pytest.mark.parametrize(
    "text", ["ORTHANC", "ORTHANC@host", "@host:104", "A@h:0", "A@h:70000", "WAYTOOLONGAETITLE17@h:1"]
)
def test_bad_destinations_are_user_errors(text: str) -> None:
    with pytest.raises(UserInputError, match="AET@host:port"):
        DicomDestination.parse(text)


# --- DICOM networking between pynetdicom AEs on 127.0.0.1 -------------------------------------


def nodelay(sock: socket.socket | None) -> int:
    assert sock is not None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def tiny_series(directory: Path, study_uid: str | None = None, slices: int = 4) -> WrittenSeries:
    geometry = CTGeometry(shape=(slices, 8, 8), pixel_spacing=(1.0, 1.0), slice_spacing=2.0)
    volume = np.arange(np.prod(geometry.shape), dtype=np.int16).reshape(geometry.shape)
    return write_ct_series(
        volume, geometry, directory, patient=SyntheticPatient("PACS1"), study_uid=study_uid
    )


@pytest.fixture
def server_sockets() -> list[int]:
    return []


@pytest.fixture
def server(collector: StudyCollector, server_sockets: list[int]) -> Iterator[StorageServer]:
    def record(event) -> None:
        server_sockets.append(nodelay(event.assoc.dul.socket.socket))

    storage = StorageServer(
        collector,
        ae_title="LNSC_TEST",
        port=0,
        allowed_callers=["ORTHANC", "TESTSCU"],
        evt_handlers=[(evt.EVT_ACCEPTED, record)],
    )
    storage.start()
    yield storage
    storage.stop()


def test_echo_is_answered_on_a_no_delay_socket(server: StorageServer, server_sockets: list[int]) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    host, port = server.address
    association = ae.associate(
        host, port, ae_title="LNSC_TEST", evt_handlers=[(evt.EVT_CONN_OPEN, enable_tcp_nodelay)]
    )
    assert association.is_established
    assert nodelay(association.dul.socket.socket) == 1
    assert association.send_c_echo().Status == 0x0000
    association.release()
    assert server_sockets == [1]


def test_unknown_calling_ae_titles_are_rejected(server: StorageServer, tmp_path: Path) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    host, port = server.address
    association = ae.associate(host, port, ae_title="LNSC_TEST")
    assert association.is_rejected
    with pytest.raises(SendError, match="could not open an association"):
        DicomSender(DicomDestination("LNSC_TEST", host, port), "INTRUDER")(tiny_series(tmp_path / "ct").files)


@pytest.mark.parametrize("tcp_nodelay", [True, False])
def test_store_round_trip_into_the_listener(
    server: StorageServer,
    server_sockets: list[int],
    collector: StudyCollector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tcp_nodelay: bool,
) -> None:
    client_sockets: list[int] = []

    class RecordingAE(AE):
        def associate(self, *args, **kwargs):
            association = super().associate(*args, **kwargs)
            client_sockets.append(nodelay(association.dul.socket.socket))
            return association

    monkeypatch.setattr(pacs_net, "AE", RecordingAE)
    series = tiny_series(tmp_path / "ct", study_uid=STUDY_A)
    DicomSender(DicomDestination("LNSC_TEST", *server.address), "TESTSCU", tcp_nodelay=tcp_nodelay)(
        series.files
    )

    assert client_sockets == [int(tcp_nodelay)]
    assert server_sockets == [1]  # the listener sets it on what it accepts, whatever the peer does
    received = sorted((collector.dirs.incoming / STUDY_A).iterdir())
    assert [p.name for p in received] == sorted(f"{uid}.dcm" for uid in series.sop_instance_uids)
    for original in series.files:
        sent = pydicom.dcmread(original)
        copy = pydicom.dcmread(collector.dirs.incoming / STUDY_A / f"{sent.SOPInstanceUID}.dcm")
        assert copy.StudyInstanceUID == STUDY_A
        np.testing.assert_array_equal(copy.pixel_array, sent.pixel_array)
    assert collector.pending_studies() == {STUDY_A: 4}


def test_a_store_without_a_study_uid_is_refused(
    server: StorageServer, collector: StudyCollector, tmp_path: Path
) -> None:
    series = tiny_series(tmp_path / "ct")
    broken = pydicom.dcmread(series.files[0])
    del broken.StudyInstanceUID
    broken.save_as(series.files[0])
    with pytest.raises(SendError, match="status 0xC000"):
        DicomSender(DicomDestination("LNSC_TEST", *server.address), "TESTSCU")([series.files[0]])
    assert list(collector.dirs.incoming.iterdir()) == []


def test_the_listener_processes_a_study_and_sends_the_results_on(tmp_path: Path) -> None:
    """Two listeners: A receives a study, processes it, and sends the result to B."""
    destination = StudyCollector(WorkDirs(tmp_path / "b"), stable_seconds=0)
    receiver = StorageServer(destination, ae_title="PACS", port=0)
    receiver.start()
    try:
        work = StudyCollector(WorkDirs(tmp_path / "a"), stable_seconds=0.2)

        def processor(input_dir: Path, output_dir: Path) -> list[Path]:
            first = pydicom.dcmread(sorted(input_dir.iterdir())[0])
            first.SOPInstanceUID = pydicom.uid.generate_uid()
            first.SeriesInstanceUID = pydicom.uid.generate_uid()
            first.SeriesDescription = "result"
            first.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
            result = output_dir / "result.dcm"
            first.save_as(result)
            return [result]

        sender = DicomSender(DicomDestination("PACS", *receiver.address), "LNSC")
        dispatcher = StudyDispatcher(work, processor, sender)
        listener = StorageServer(work, ae_title="LNSC", port=0)
        stop = threading.Event()
        outcomes: list = []
        thread = threading.Thread(
            target=lambda: outcomes.extend(
                run_listener(listener, dispatcher, stop, once=True, poll_seconds=0.05)
            )
        )
        thread.start()
        try:
            assert listener.listening.wait(10)
            series = tiny_series(tmp_path / "ct", study_uid=STUDY_A)
            DicomSender(DicomDestination("LNSC", *listener.address), "MODALITY")(series.files)
            thread.join(timeout=30)
        finally:
            stop.set()
            thread.join(timeout=10)
        (outcome,) = outcomes
        assert outcome.succeeded and len(list(outcome.folder.iterdir())) == 4
        assert not listener.listening.is_set()  # stopped after one study (--once)
        (returned,) = (destination.dirs.incoming / STUDY_A).iterdir()
        assert pydicom.dcmread(returned).SeriesDescription == "result"
    finally:
        receiver.stop()


def test_a_study_that_fails_in_the_listener_sends_its_notice_to_the_destination(tmp_path: Path) -> None:
    """The listener fails a study without seeds; the destination receives the notice in that study."""
    stored: list[pydicom.Dataset] = []

    def on_store(event) -> int:
        stored.append(event.dataset)
        return 0x0000

    destination = AE(ae_title="PACS")
    destination.add_supported_context(pydicom.uid.EncapsulatedPDFStorage, pydicom.uid.ExplicitVRLittleEndian)
    destination_server = destination.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        work = StudyCollector(WorkDirs(tmp_path / "a"), stable_seconds=0.2)

        def processor(input_dir: Path, output_dir: Path) -> list[Path]:
            raise pacs.SeriesFailures([f"series 1 'tiny' ({input_dir.name}): no nodule seeds were found"])

        sender = DicomSender(DicomDestination("PACS", *destination_server.server_address[:2]), "LNSC")
        dispatcher = StudyDispatcher(
            work,
            processor,
            sender,
            notifier=pacs.FailureNoticeWriter(model_name="tiny", model_version="0.0.1"),
            keep_received_hours=0,
        )
        listener = StorageServer(work, ae_title="LNSC", port=0)
        stop = threading.Event()
        outcomes: list = []
        thread = threading.Thread(
            target=lambda: outcomes.extend(
                run_listener(listener, dispatcher, stop, once=True, poll_seconds=0.05)
            )
        )
        thread.start()
        try:
            assert listener.listening.wait(10)
            series = tiny_series(tmp_path / "ct", study_uid=STUDY_A)
            DicomSender(DicomDestination("LNSC", *listener.address), "MODALITY")(series.files)
            thread.join(timeout=30)
        finally:
            stop.set()
            thread.join(timeout=10)
    finally:
        destination_server.shutdown()
    (outcome,) = outcomes
    assert outcome.state == "failed" and len(list(outcome.folder.iterdir())) == 4  # kept
    (notice,) = stored
    assert notice.SOPClassUID == pydicom.uid.EncapsulatedPDFStorage and notice.StudyInstanceUID == STUDY_A
    assert notice.DocumentTitle == "Analysis not performed" and notice.PatientID == "PACS1"
    assert bytes(notice.EncapsulatedDocument).startswith(b"%PDF-")
    assert "notice was delivered" in (work.dirs.failed / f"{STUDY_A}.log").read_text()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_untrained_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def test_the_app_processor_returns_only_dicom_and_fails_studies_without_results(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    study = write_demo_study(tmp_path / "study", seed=2, n_nodules=1)
    process = pacs.app_processor(tiny_bundle)
    written = process(tmp_path / "study", tmp_path / "out")
    assert sorted(path.name for path in written) == ["nodule_1_sc.dcm", "report_pdf.dcm", "sr.dcm"]
    assert (written[0].parent / "report.pdf").is_file()  # written by the app, not sent to the PACS
    study.seed_sr.unlink()
    with pytest.raises(pacs.SeriesFailures, match="seed") as failure:
        process(tmp_path / "study", tmp_path / "out_without_seeds")
    assert isinstance(failure.value, UserInputError) and len(failure.value.messages) == 1
    # the notice the listener sends for it names the series and says why, in the app's words
    notice = pacs.FailureNoticeWriter(tiny_bundle)(
        tmp_path / "study", tmp_path / "notice", failure.value.messages, "run"
    )
    ds = pydicom.dcmread(notice)
    assert ds.StudyInstanceUID == study.series.study_instance_uid and ds.Modality == "DOC"
    assert ds.ManufacturerModelName == pacs.FailureNoticeWriter(tiny_bundle).identity()[0]


SIGTERM_SCRIPT = """
import logging, sys, threading, time
from pathlib import Path
from deploy_app import pacs, pacs_net

logging.basicConfig(level=logging.INFO)

def slow_processor(input_dir, output_dir):
    print("processing", flush=True)
    time.sleep(1.0)
    return []

def announce_port():
    if server.listening.wait(30):
        print("port", server.address[1], flush=True)

collector = pacs.StudyCollector(pacs.WorkDirs(Path(sys.argv[1])), stable_seconds=0.1)
server = pacs.StorageServer(collector, ae_title="LNSC", port=0)
stop = threading.Event()
pacs.install_stop_signals(stop)
threading.Thread(target=announce_port).start()
outcomes = pacs.run_listener(server, pacs.StudyDispatcher(collector, slow_processor), stop, poll_seconds=0.05)
print("outcomes", [o.succeeded for o in outcomes], flush=True)
"""


def test_sigterm_finishes_the_current_study_then_stops(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "work")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(process.stdout.readline().split()[1])
        DicomSender(DicomDestination("LNSC", "127.0.0.1", port), "MODALITY")(
            tiny_series(tmp_path / "ct").files
        )
        assert process.stdout.readline().strip() == "processing"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr[-2000:]
    assert stdout.strip() == "outcomes [True]"
    assert "SIGTERM received" in stderr
    assert len(list((tmp_path / "work" / "done").iterdir())) == 1
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


# --- Integration with a real Orthanc (only inside a private network namespace) ----------------

ORTHANC = shutil.which("Orthanc")
ORTHANC_AET = "ORTHANC"
LISTENER_AET = "LNSC_TEST"


def require_isolated_orthanc() -> str:
    """Orthanc binds every interface: run it only in the private network namespace of ``make test``."""
    problems = []
    if os.environ.get("LNSC_PRIVATE_NETNS") != "1":
        problems.append("not in a private network namespace (LNSC_PRIVATE_NETNS=1 is set by `make test`)")
    if ORTHANC is None:
        problems.append("Orthanc is not installed (apt-get install orthanc)")
    if problems:
        (pytest.fail if CI_STRICT else pytest.skip)("; ".join(problems))
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:  # LNSC_PRIVATE_NETNS=1 but not isolated: never expose Orthanc
        pytest.fail(
            f"LNSC_PRIVATE_NETNS=1 but network interfaces {interfaces} are visible; refusing to start Orthanc"
        )
    return str(ORTHANC)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class OrthancRest:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60
    ) -> object:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = response.read()
        return json.loads(content) if response.headers.get_content_type() == "application/json" else content


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[OrthancRest, int]]:
    executable = require_isolated_orthanc()
    http_port, dicom_port = free_ports(2)
    root = tmp_path / "orthanc"
    root.mkdir()
    config = {
        "Name": "lnsc-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "TcpNoDelay": True,  # HTTP sockets; DCMTK's DICOM sockets follow the TCP_NODELAY variable
        "Plugins": [],
        "SaveJobs": False,
        "DicomModalities": {},
    }
    (root / "config.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [executable, str(root / "config.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    rest = OrthancRest(http_port)
    try:
        for _ in range(300):
            if process.poll() is not None:
                pytest.fail(
                    f"Orthanc exited ({process.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}"
                )
            try:
                rest.request("GET", "/system", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("Orthanc did not answer on its REST port within 30 s")
        yield rest, dicom_port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_orthanc_sends_a_study_and_gets_the_sr_and_report_back(
    orthanc, tiny_bundle: Path, tmp_path: Path
) -> None:
    rest, orthanc_dicom_port = orthanc
    study = write_demo_study(tmp_path / "study", seed=5, n_nodules=2)
    bundle = tiny_bundle
    for path in [*study.series.files, study.seed_sr]:
        uploaded = rest.request("POST", "/instances", path.read_bytes())
    study_id = uploaded["ParentStudy"]
    sent = {
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for path in [*study.series.files, study.seed_sr]
    }

    (listener_port,) = free_ports(1)
    rest.request("PUT", "/modalities/lnsc", {"AET": LISTENER_AET, "Host": "127.0.0.1", "Port": listener_port})
    work = tmp_path / "work"
    command = [
        sys.executable,
        "-m",
        "deploy_app.pacs",
        "--model",
        str(bundle),
        "--work-dir",
        str(work),
        "--ae-title",
        LISTENER_AET,
        "--port",
        str(listener_port),
        "--allowed-callers",
        ORTHANC_AET,
        "--destination",
        f"{ORTHANC_AET}@127.0.0.1:{orthanc_dicom_port}",
        "--stable-seconds",
        "1",
        "--once",
    ]
    listener = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for _ in range(600):  # the listener imports torch and loads the bundle first
            assert listener.poll() is None, listener.communicate()[0][-3000:]
            try:
                rest.request("POST", "/modalities/lnsc/echo", {}, timeout=5)
                break
            except urllib.error.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the listener did not answer Orthanc's C-ECHO within 60 s")
        rest.request("POST", "/modalities/lnsc/store", {"Resources": [study_id], "Synchronous": True})
        log, _ = listener.communicate(timeout=120)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert listener.returncode == 0, log[-3000:]
    assert "PACS1" not in log and "PHANTOM-DEMO" not in log  # never a patient ID in the log
    # --keep-received 0 (the default): the received images are deleted once delivered; the record stays
    study_uid = study.series.study_instance_uid
    assert list((work / "done" / study_uid).iterdir()) == []
    record = json.loads((work / "done" / f"{study_uid}.json").read_text())
    assert set(record["received_instances"]) == sent and record["finished"] == "delivered"

    by_modality: dict[str, list[str]] = {}
    for series in rest.request("GET", f"/studies/{study_id}/series"):
        for instance_id in series["Instances"]:
            tags = rest.request("GET", f"/instances/{instance_id}/simplified-tags")
            if tags["SOPInstanceUID"] not in sent:
                by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(instance_id)
    assert len(by_modality.get("SR", [])) == 1 and len(by_modality.get("DOC", [])) == 1, by_modality
    report = tmp_path / "returned_sr.dcm"
    report.write_bytes(rest.request("GET", f"/instances/{by_modality['SR'][0]}/file"))
    nodules = read_measurement_report(report)
    assert len(nodules) == 2
    volume = LoadCT()(str(study.series.directory))
    planes = nine_planes_for_seeds(volume, [seed.position_lps for seed in study.seeds])
    (predictor,) = BundleModels.load(bundle).predictors
    expected = predictor(planes)["malignancy"].numpy()
    np.testing.assert_allclose([n.malignancy for n in nodules], expected, atol=1e-5)
    for nodule, seed in zip(nodules, study.seeds, strict=True):
        np.testing.assert_allclose(nodule.position_lps, seed.position_lps, atol=1e-3)
