"""DICOM listener next to a PACS: receive studies, run the app on each, send the results back.

``python -m deploy_app.pacs --model BUNDLE --work-dir DIR [--destination AET@host:port]``

A pynetdicom Storage SCP (CT images, the SR and SEG objects that carry nodule seeds, and C-ECHO)
files every received instance under ``DIR/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm``; an
instance whose Study, Series or SOP Instance UID is not a valid DICOM UID is refused (status 0xC000
with an Error Comment naming the attribute), since those UIDs become file and folder names. When a
study has received nothing for ``--stable-seconds`` it is moved to ``DIR/processing/``, the app
runs on it into ``DIR/outputs/<study>/``, every DICOM file the app wrote is C-STOREd to the
destination AE, and the study folder goes to ``DIR/done/`` (or ``DIR/failed/`` beside a
``<study>.log`` that says why; one failing study never stops the listener). A study received again
later is processed again under the name ``<study uid>_2`` and so on.

The listener binds 127.0.0.1 by default, so only this machine can send to it; a real deployment
binds 0.0.0.0 (or one interface) and should name its PACS with ``--allowed-callers``.

Every socket it opens or accepts has TCP_NODELAY set: DICOM exchanges are small request/response
messages, and with Nagle's algorithm each one waits for the peer's delayed ACK (about 40 ms).

The logic (grouping, stability timer, dispatch, sending) is plain Python with an injectable clock,
processor and sender (:class:`StudyCollector`, :class:`StudyDispatcher`); :class:`StorageServer`
is the thin pynetdicom wrapper. Logs carry UIDs, AE titles and counts, never patient names or IDs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pydicom
from pydicom import Dataset
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
    SegmentationStorage,
    Verification,
)

from deploy_app.uids import PATH_UID_KEYWORDS, InvalidUIDError, check_uid, is_valid_uid, path_inside
from scripts.errors import UserInputError, exit_on_user_error, find_user_error, user_message

# Named, not __name__: under ``python -m deploy_app.pacs`` the module is __main__.
logger = logging.getLogger("deploy_app.pacs")

#: Input folder, output folder -> the DICOM files written (the app, or a stand-in in tests).
StudyProcessor = Callable[[Path, Path], list[Path]]
#: Sends the given DICOM files somewhere; raises :class:`SendError` when that fails.
ResultSender = Callable[[Sequence[Path]], None]

DEFAULT_AE_TITLE = "LNSC"
DEFAULT_PORT = 11112
DEFAULT_BIND = "127.0.0.1"
DEFAULT_STABLE_SECONDS = 10.0

#: What the app reads: the CT series and the objects that carry nodule seeds (TID 1500 SR, SEG).
STORAGE_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

# C-STORE status codes (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
_WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})

_RUN_SUFFIX = re.compile(r"^(?P<uid>[0-9.]+)(_(?P<n>[0-9]+))?$")
_DESTINATION = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})$")


class SendError(RuntimeError):
    """The results could not be delivered to the destination AE."""


def enable_tcp_nodelay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket.

    Bound on both sides (server and requestor) it runs after the TCP connection is made and before
    the first PDU is sent, for accepted and for opened sockets alike.
    """
    association_socket = event.assoc.dul.socket
    raw = association_socket.socket if association_socket is not None else None
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connection_handlers(tcp_nodelay: bool) -> list[tuple]:
    return [(evt.EVT_CONN_OPEN, enable_tcp_nodelay)] if tcp_nodelay else []


@dataclass(frozen=True)
class DicomDestination:
    """A remote AE: title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DicomDestination:
        """Parse ``AET@host:port`` (e.g. ``ORTHANC@pacs.example.org:4242``).

        Raises:
            UserInputError: the text has another shape or the port is out of range.
        """
        match = _DESTINATION.match(text.strip())
        if match is None or not 0 < int(match.group("port")) < 65536:
            raise UserInputError(
                f"destination '{text}' is not AET@host:port (AE title up to 16 characters, port 1-65535), "
                "e.g. ORTHANC@127.0.0.1:4242"
            )
        return cls(match.group("aet").strip(), match.group("host"), int(match.group("port")))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class WorkDirs:
    """The listener's folders under one work directory."""

    root: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def processing(self) -> Path:
        return self.root / "processing"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    def create(self) -> None:
        for folder in (self.incoming, self.processing, self.outputs, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)

    def unused_run_name(self, study_uid: str) -> str:
        """``study_uid``, or ``study_uid_<n>`` when an earlier run of the same study left folders."""
        taken = (self.processing, self.outputs, self.done, self.failed)
        name, n = study_uid, 1
        while any((folder / name).exists() for folder in taken):
            n += 1
            name = f"{study_uid}_{n}"
        return name


@dataclass(frozen=True)
class ClaimedStudy:
    """A study taken out of ``incoming/`` for processing."""

    study_uid: str
    run_name: str
    input_dir: Path
    instances: int


@dataclass
class _Pending:
    last_received: float
    instances: int = 0


class StudyCollector:
    """Files received instances per study and says which studies have been quiet long enough.

    Thread-safe: pynetdicom calls :meth:`store` from one thread per association while the dispatch
    loop calls :meth:`stable_studies` and :meth:`claim`.

    Args:
        work_dirs: the listener's folders (created if missing).
        stable_seconds: a study is complete when nothing arrived for it for this long.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self, work_dirs: WorkDirs, stable_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if stable_seconds < 0:
            raise UserInputError(f"--stable-seconds must be zero or positive, got {stable_seconds}")
        self.dirs = work_dirs
        self.stable_seconds = stable_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self.dirs.create()
        self._recover()

    def _recover(self) -> None:
        """Pick up what an earlier run left: half-received studies and studies it was processing."""
        for leftover in sorted(self.dirs.processing.iterdir()):
            match = _RUN_SUFFIX.match(leftover.name)
            if not leftover.is_dir() or match is None or not is_valid_uid(match.group("uid")):
                continue
            target = self.dirs.incoming / match.group("uid")
            target.mkdir(exist_ok=True)
            for instance in leftover.iterdir():
                os.replace(instance, target / instance.name)
            leftover.rmdir()
            logger.warning(
                "study %s was being processed when the listener stopped; queued again", target.name
            )
        now = self._clock()
        for study in sorted(self.dirs.incoming.iterdir()):
            if not study.is_dir() or not is_valid_uid(study.name):
                continue
            for partial in study.glob(".*.tmp"):
                partial.unlink()
            count = sum(1 for _ in study.glob("*.dcm"))
            self._pending[study.name] = _Pending(last_received=now, instances=count)
            logger.info("study %s: %d instances from an earlier run are queued", study.name, count)

    def store(self, study_uid: str, sop_instance_uid: str, encoded: bytes) -> Path:
        """Write one received instance (DICOM file bytes) atomically; restarts the study's timer.

        Raises:
            InvalidUIDError: a UID is not a valid DICOM UID (it would be unsafe as a path).
        """
        check_uid(study_uid, "StudyInstanceUID", "received instance")
        check_uid(sop_instance_uid, "SOPInstanceUID", "received instance")
        with self._lock:
            # Under the lock so that a claim never moves the folder while a file is half written.
            folder = path_inside(self.dirs.incoming, study_uid)
            folder.mkdir(exist_ok=True)
            target = path_inside(folder, f"{sop_instance_uid}.dcm")
            resent = target.exists()
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(encoded)
                os.replace(temporary, target)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            pending = self._pending.setdefault(study_uid, _Pending(last_received=self._clock()))
            pending.last_received = self._clock()
            pending.instances += 0 if resent else 1
        return target

    def pending_studies(self) -> dict[str, int]:
        """Studies still being received or waiting: UID -> instances received."""
        with self._lock:
            return {uid: pending.instances for uid, pending in self._pending.items()}

    def stable_studies(self) -> list[str]:
        """Studies that received nothing for ``stable_seconds``, the longest-quiet first."""
        now = self._clock()
        with self._lock:
            quiet = [
                (pending.last_received, uid)
                for uid, pending in self._pending.items()
                if now - pending.last_received >= self.stable_seconds
            ]
        return [uid for _, uid in sorted(quiet)]

    def claim(self, study_uid: str) -> ClaimedStudy:
        """Move a study from ``incoming/`` to ``processing/<run name>/``; later arrivals start anew."""
        with self._lock:
            pending = self._pending.pop(study_uid)
            run_name = self.dirs.unused_run_name(study_uid)
            input_dir = self.dirs.processing / run_name
            os.replace(self.dirs.incoming / study_uid, input_dir)
        return ClaimedStudy(study_uid, run_name, input_dir, pending.instances)

    def requeue(self, claimed: ClaimedStudy) -> None:
        """Give an abandoned study back to ``incoming/`` (merged with anything that arrived since)."""
        with self._lock:
            target = self.dirs.incoming / claimed.study_uid
            target.mkdir(exist_ok=True)
            for instance in claimed.input_dir.iterdir():
                os.replace(instance, target / instance.name)
            claimed.input_dir.rmdir()
            pending = self._pending.setdefault(claimed.study_uid, _Pending(last_received=self._clock()))
            pending.instances += claimed.instances


@dataclass(frozen=True)
class StudyOutcome:
    """What happened to one study.

    Args:
        study_uid: the StudyInstanceUID.
        succeeded: processed and (when a destination is set) delivered.
        folder: where the received instances now are (``done/<run>`` or ``failed/<run>``).
        outputs: the DICOM files the app wrote (kept in ``outputs/<run>``).
        reason: why it failed (None on success).
        seconds: processing plus sending time.
    """

    study_uid: str
    succeeded: bool
    folder: Path
    outputs: tuple[Path, ...] = ()
    reason: str | None = None
    seconds: float = 0.0


def _failure_reason(error: BaseException) -> str:
    user_error = find_user_error(error)
    if user_error is not None:
        return user_message(user_error)
    if isinstance(error, SendError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass
class StudyDispatcher:
    """Runs the processor on every stable study, sends the results and files the study.

    Args:
        collector: where studies arrive.
        processor: input folder, output folder -> the DICOM files written.
        sender: delivers the written files (None: keep them in ``outputs/`` only).
        clock: seconds, for the durations in the log and the outcomes.
    """

    collector: StudyCollector
    processor: StudyProcessor
    sender: ResultSender | None = None
    clock: Callable[[], float] = time.monotonic

    def dispatch_stable(
        self, stop: threading.Event | None = None, limit: int | None = None
    ) -> list[StudyOutcome]:
        """Process the studies that are stable now, oldest first.

        Args:
            stop: when set, no further study is started.
            limit: process at most this many studies.

        Returns:
            one outcome per processed study.
        """
        done: list[StudyOutcome] = []
        for study_uid in self.collector.stable_studies():
            if (stop is not None and stop.is_set()) or (limit is not None and len(done) >= limit):
                break
            done.append(self.process(study_uid))
        return done

    def process(self, study_uid: str) -> StudyOutcome:
        """Claim, process, send and file one study; failures are logged and filed, never raised.

        A ``KeyboardInterrupt`` (a second Ctrl-C) abandons the study: it goes back to ``incoming/``
        for the next run, and the interrupt propagates.
        """
        dirs = self.collector.dirs
        try:
            claimed = self.collector.claim(study_uid)
        except OSError as error:  # the folder vanished or the disk failed: report it, keep listening
            logger.error("study %s cannot be moved to %s: %s", study_uid, dirs.processing, error)
            return StudyOutcome(study_uid, False, dirs.incoming / study_uid, reason=str(error))
        logger.info("study %s: processing %d received instances", study_uid, claimed.instances)
        output_dir = dirs.outputs / claimed.run_name
        started = self.clock()
        written: tuple[Path, ...] = ()
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            written = tuple(self.processor(claimed.input_dir, output_dir))
            if self.sender is not None and written:
                self.sender(written)
            elif not written:
                logger.warning("study %s: the app wrote no DICOM files; nothing to send", study_uid)
        except Exception as error:
            seconds = self.clock() - started
            reason = _failure_reason(error)
            folder = dirs.failed / claimed.run_name
            os.replace(claimed.input_dir, folder)
            _write_text_atomically(dirs.failed / f"{claimed.run_name}.log", f"study {study_uid}: {reason}\n")
            if find_user_error(error) is None and not isinstance(error, SendError):
                logger.error("study %s failed after %.1f s", study_uid, seconds, exc_info=error)
            logger.error("study %s failed: %s (instances in %s)", study_uid, reason, folder)
            outcome = StudyOutcome(study_uid, False, folder, written, reason, seconds)
        except BaseException:
            self.collector.requeue(claimed)
            shutil.rmtree(output_dir, ignore_errors=True)
            logger.warning("study %s abandoned; it stays queued in %s", study_uid, dirs.incoming)
            raise
        else:
            seconds = self.clock() - started
            folder = dirs.done / claimed.run_name
            os.replace(claimed.input_dir, folder)
            where = "sent" if self.sender is not None and written else "kept"
            logger.info(
                "study %s done in %.1f s: %d result files %s (%s)",
                study_uid,
                seconds,
                len(written),
                where,
                output_dir,
            )
            outcome = StudyOutcome(study_uid, True, folder, written, None, seconds)
        return outcome


def _write_text_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


class DicomSender:
    """C-STOREs files to one destination AE over a single association.

    Args:
        destination: the remote AE.
        ae_title: our calling AE title.
        tcp_nodelay: set TCP_NODELAY on the connection (off only to measure what it saves).
        connection_timeout: seconds to wait for the TCP connection.
    """

    def __init__(
        self,
        destination: DicomDestination,
        ae_title: str = DEFAULT_AE_TITLE,
        *,
        tcp_nodelay: bool = True,
        connection_timeout: float = 10.0,
    ) -> None:
        self.destination = destination
        self.ae_title = ae_title
        self.tcp_nodelay = tcp_nodelay
        self.connection_timeout = connection_timeout

    def __call__(self, files: Sequence[Path]) -> None:
        """Send every file; raises :class:`SendError` unless the destination stored all of them."""
        headers = [(Path(f), pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
        contexts = _requested_contexts(header for _, header in headers)
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = self.connection_timeout
        ae.requested_contexts = contexts
        destination = self.destination
        association = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=_connection_handlers(self.tcp_nodelay),
        )
        if not association.is_established:
            raise SendError(
                f"could not open an association with {destination} (refused, rejected or aborted)"
            )
        failures: list[str] = []
        try:
            for path, header in headers:
                status = association.send_c_store(path)
                code = getattr(status, "Status", None)
                if code is None:
                    failures.append(f"{path.name}: no response (connection lost or timed out)")
                    break
                if code in _WARNING_STATUSES:
                    logger.warning(
                        "%s stored %s with warning status 0x%04X", destination, header.SOPInstanceUID, code
                    )
                elif code != STATUS_SUCCESS:
                    failures.append(f"{path.name}: status 0x{code:04X}")
        finally:
            if association.is_established:
                association.release()
        if failures:
            raise SendError(
                f"{destination} did not store {len(failures)} of {len(headers)} files: {failures[0]}"
            )
        logger.info("sent %d files to %s", len(headers), destination)


def _requested_contexts(headers: Iterable[pydicom.Dataset]) -> list[PresentationContext]:
    """One presentation context per SOP class, proposing each file's own transfer syntax."""
    syntaxes: dict[str, list[str]] = {}
    for header in headers:
        syntax = str(header.file_meta.TransferSyntaxUID)
        proposed = syntaxes.setdefault(str(header.SOPClassUID), [])
        if syntax not in proposed:
            proposed.append(syntax)
    if len(syntaxes) > 128:
        raise SendError(f"{len(syntaxes)} SOP classes do not fit in one association (at most 128)")
    return [build_context(sop_class, proposed) for sop_class, proposed in syntaxes.items()]


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM Part 10 file (preamble followed by ``DICM``)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def app_processor(model_dir: Path) -> StudyProcessor:
    """The deploy app as a :data:`StudyProcessor`, with the bundle's models loaded once.

    A study where every CT series failed (no usable series, no seeds, ...) raises
    :class:`~scripts.errors.UserInputError` with the app's messages; when some series succeed, the
    others' failures are logged and the written files are returned. Only DICOM files are returned
    (the app also keeps the plain PDF beside them).
    """
    # The app pulls in torch, MONAI and Holoscan: import them only when serving.
    from deploy_app.app import process_folder
    from deploy_app.inference import BundleModels

    models = BundleModels.load(model_dir)

    def process(input_dir: Path, output_dir: Path) -> list[Path]:
        outcome = process_folder(input_dir, output_dir, models=models)
        for failure in outcome.failures:
            logger.warning("%s: %s", failure.series, failure.message)
        written = [path for path in outcome.files if is_dicom_file(path)]
        if not written and outcome.failures:
            raise UserInputError("; ".join(f"{f.series}: {f.message}" for f in outcome.failures))
        if not written:
            raise UserInputError(f"no CT series in '{input_dir.name}' could be analysed (no results written)")
        return written

    return process


class StorageServer:
    """The pynetdicom Storage SCP (and Verification SCP) that feeds a :class:`StudyCollector`.

    Args:
        collector: where received instances go.
        ae_title: our AE title (the called AE title peers use).
        bind: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port (0: an ephemeral one, see :attr:`address`).
        allowed_callers: when non-empty, associations from other calling AE titles are rejected.
        tcp_nodelay: set TCP_NODELAY on accepted sockets.
        maximum_pdu_size: the largest PDU we accept (bytes; 0: no limit). pynetdicom's default;
            16 KiB to unlimited made no measurable difference for 100 slices of 512 x 512.
        evt_handlers: more pynetdicom ``(event, handler)`` pairs (monitoring; not C-STORE/C-ECHO).
    """

    def __init__(
        self,
        collector: StudyCollector,
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        bind: str = DEFAULT_BIND,
        port: int = DEFAULT_PORT,
        allowed_callers: Sequence[str] = (),
        tcp_nodelay: bool = True,
        maximum_pdu_size: int = 16382,
        evt_handlers: Sequence[tuple] = (),
    ) -> None:
        self.collector = collector
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = maximum_pdu_size
        self.ae.require_calling_aet = list(allowed_callers)
        for storage_class in STORAGE_CLASSES:
            self.ae.add_supported_context(storage_class, DEFAULT_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._bind = (bind, port)
        self._tcp_nodelay = tcp_nodelay
        self._extra_handlers = list(evt_handlers)
        self._server = None
        #: Set while the server accepts associations (for callers that start it in another thread).
        self.listening = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        """The address and port the server listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Start listening in a background thread; returns the bound address."""
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REJECTED, _log_rejection),
            *_connection_handlers(self._tcp_nodelay),
            *self._extra_handlers,
        ]
        try:
            self._server = self.ae.start_server(self._bind, block=False, evt_handlers=handlers)
        except OSError as error:
            raise UserInputError(
                f"cannot listen on {self._bind[0]}:{self._bind[1]} ({error.strerror or error}); "
                "choose another --port or --bind"
            ) from error
        self.listening.set()
        logger.info(
            "listening as %s on %s:%d (%s)",
            self.ae.ae_title,
            *self.address,
            "callers: " + ",".join(self.ae.require_calling_aet)
            if self.ae.require_calling_aet
            else "any caller",
        )
        return self.address

    def stop(self) -> None:
        """Stop listening and abort open associations (their studies stay in ``incoming/``)."""
        if self._server is not None:
            self.listening.clear()
            self.ae.shutdown()
            self._server = None

    def _handle_store(self, event: Event) -> int | Dataset:
        caller = event.assoc.requestor.ae_title
        try:
            dataset = event.dataset
            uids = {keyword: dataset.get(keyword) for keyword in PATH_UID_KEYWORDS}
            affected_sop_instance_uid = event.request.AffectedSOPInstanceUID
        except Exception as error:  # a data set pydicom cannot decode
            logger.error("C-STORE from %s: cannot read the data set (%s)", caller, error)
            return refusal(STATUS_CANNOT_UNDERSTAND, "the data set cannot be decoded")
        try:
            for keyword, value in uids.items():
                check_uid(value, keyword, f"C-STORE from {caller}")
            check_uid(affected_sop_instance_uid, "AffectedSOPInstanceUID", f"C-STORE from {caller}")
        except InvalidUIDError as error:
            logger.error("%s", error)
            return refusal(STATUS_CANNOT_UNDERSTAND, f"{error.keyword} is not a valid DICOM UID")
        if str(affected_sop_instance_uid) != str(uids["SOPInstanceUID"]):
            # the file is named after the request's UID, the app reads the data set's: they must agree
            logger.error(
                "C-STORE from %s: the request's AffectedSOPInstanceUID and the data set's SOPInstanceUID "
                "differ; refused",
                caller,
            )
            return refusal(STATUS_CANNOT_UNDERSTAND, "SOPInstanceUID differs from AffectedSOPInstanceUID")
        study_uid = str(uids["StudyInstanceUID"])
        try:
            self.collector.store(study_uid, str(affected_sop_instance_uid), event.encoded_dataset())
        except OSError as error:
            logger.error("study %s: cannot write a received instance: %s", study_uid, error)
            return refusal(STATUS_OUT_OF_RESOURCES, "the received instance cannot be stored")
        return STATUS_SUCCESS


def refusal(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: at most 64 characters) for the caller."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response


def _log_rejection(event: Event) -> None:
    requestor = event.assoc.requestor
    logger.warning("rejected an association from %s (%s)", requestor.ae_title, requestor.address)


def run_listener(
    server: StorageServer,
    dispatcher: StudyDispatcher,
    stop: threading.Event,
    *,
    once: bool = False,
    poll_seconds: float = 0.5,
) -> list[StudyOutcome]:
    """Serve until ``stop`` is set (or, with ``once``, until one study was processed).

    The study being processed when ``stop`` is set is finished first; studies still arriving stay
    in ``incoming/`` and are picked up by the next run.

    Returns:
        the outcomes of the studies processed.
    """
    outcomes: list[StudyOutcome] = []
    server.start()
    try:
        while not stop.wait(poll_seconds):
            outcomes += dispatcher.dispatch_stable(stop, limit=1 if once else None)
            if once and outcomes:
                break
    finally:
        server.stop()
        pending = dispatcher.collector.pending_studies()
        if pending:
            logger.info(
                "stopped with %d studies still queued in %s", len(pending), dispatcher.collector.dirs.incoming
            )
    succeeded = sum(outcome.succeeded for outcome in outcomes)
    logger.info("listener stopped: %d studies done, %d failed", succeeded, len(outcomes) - succeeded)
    return outcomes


def install_stop_signals(stop: threading.Event) -> None:
    """First SIGINT/SIGTERM: finish the current study, then stop. A second one abandons it."""

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.info("%s received: stopping after the current study", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def _caller_list(text: str) -> list[str]:
    callers = [title.strip() for title in text.split(",") if title.strip()]
    too_long = [title for title in callers if len(title) > 16]
    if too_long:
        raise argparse.ArgumentTypeError(f"AE title '{too_long[0]}' is longer than 16 characters")
    return callers


def _destination_argument(text: str) -> DicomDestination:
    try:
        return DicomDestination.parse(text)
    except UserInputError as error:  # argparse would replace a ValueError's message with its own
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy_app.pacs",
        description="DICOM listener: receive CT studies, run the app, send the SR and report back.",
    )
    parser.add_argument("--model", "-m", type=Path, required=True, help="the model bundle folder")
    parser.add_argument(
        "--work-dir", type=Path, required=True, help="incoming/, outputs/, done/, failed/ go here"
    )
    parser.add_argument(
        "--ae-title", default=DEFAULT_AE_TITLE, help=f"our AE title (default {DEFAULT_AE_TITLE})"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"listening port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help=f"listening address (default {DEFAULT_BIND}: this machine only; 0.0.0.0 for a real deployment)",
    )
    parser.add_argument(
        "--destination",
        type=_destination_argument,
        default=None,
        metavar="AET@HOST:PORT",
        help="where the results are C-STOREd (default: nowhere; results stay in outputs/)",
    )
    parser.add_argument(
        "--allowed-callers",
        type=_caller_list,
        default=[],
        metavar="AE1,AE2",
        help="accept associations only from these calling AE titles (default: any)",
    )
    parser.add_argument(
        "--stable-seconds",
        type=float,
        default=DEFAULT_STABLE_SECONDS,
        help="a study is complete after this many seconds without new instances "
        f"(default {DEFAULT_STABLE_SECONDS:g})",
    )
    parser.add_argument(
        "--once", action="store_true", help="exit after the first study (exit status 1 if it failed)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    # Libraries (pynetdicom, the SDK, highdicom) log every step at INFO: keep them to warnings
    # unless --verbose; the app's own loggers say what happens to each study.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("deploy_app").setLevel(logging.INFO)
    if not args.model.is_dir():
        raise UserInputError(f"--model '{args.model}' is not a folder; give the model bundle folder")
    if not 0 <= args.port < 65536:
        raise UserInputError(f"--port {args.port} is not a TCP port (0-65535)")
    collector = StudyCollector(WorkDirs(args.work_dir), args.stable_seconds)
    processor = app_processor(args.model)
    sender = DicomSender(args.destination, args.ae_title) if args.destination is not None else None
    dispatcher = StudyDispatcher(collector, processor, sender)
    server = StorageServer(
        collector,
        ae_title=args.ae_title,
        bind=args.bind,
        port=args.port,
        allowed_callers=args.allowed_callers,
    )
    stop = threading.Event()
    install_stop_signals(stop)
    try:
        outcomes = run_listener(server, dispatcher, stop, once=args.once)
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130
    return 1 if args.once and outcomes and not outcomes[0].succeeded else 0


if __name__ == "__main__":
    raise SystemExit(main())
