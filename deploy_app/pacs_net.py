"""The PACS listener's DICOM networking: the Storage SCP that receives, the sender that delivers.

:class:`StorageServer` is the thin pynetdicom wrapper that feeds a
:class:`~deploy_app.pacs_store.StudyCollector`; :class:`DicomSender` C-STOREs result files to one
destination AE over a single association and raises :class:`SendError` unless every file was
stored.

Every socket opened or accepted here has TCP_NODELAY set: DICOM exchanges are small
request/response messages, and with Nagle's algorithm each one waits for the peer's delayed ACK
(about 40 ms).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
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

from deploy_app.pacs_store import StudyCollector
from deploy_app.uids import PATH_UID_KEYWORDS, InvalidUIDError, check_uid
from scripts.errors import UserInputError

logger = logging.getLogger("deploy_app.pacs")

DEFAULT_AE_TITLE = "LNSC"
DEFAULT_PORT = 11112
DEFAULT_BIND = "127.0.0.1"
DEFAULT_MAXIMUM_ASSOCIATIONS = 32

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
        maximum_associations: associations served at once (pynetdicom's default is 10; a PACS
            that sends several studies in parallel would see the rest rejected).
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
        maximum_associations: int = DEFAULT_MAXIMUM_ASSOCIATIONS,
    ) -> None:
        self.collector = collector
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = maximum_pdu_size
        self.ae.maximum_associations = maximum_associations
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
            (evt.EVT_CONN_OPEN, bind_store_answer_first),
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


_C_STORE_RQ = 0x0001


def bind_store_answer_first(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: put :func:`answer_store_without_instance_uid` first on the new
    association's ``EVT_DIMSE_RECV``.

    First, because pynetdicom stops calling an event's handlers at the first one that raises, and
    its own logging handler (bound when the association is created) raises on exactly the request
    ours must answer.
    """
    association = event.assoc
    bound = list(association.get_handlers(evt.EVT_DIMSE_RECV))
    for handler, _ in bound:
        association.unbind(evt.EVT_DIMSE_RECV, handler)
    association.bind(evt.EVT_DIMSE_RECV, answer_store_without_instance_uid)
    for handler, args in bound:
        association.bind(evt.EVT_DIMSE_RECV, handler, args)


def answer_store_without_instance_uid(event: Event) -> None:
    """``EVT_DIMSE_RECV`` handler: refuse a C-STORE request that has no Affected SOP Instance UID.

    pynetdicom's service layer drops such a request (the UID is type 1) without calling any
    C-STORE handler and without answering, so the sender would wait for its DIMSE timeout. This
    handler runs when the message is decoded, before that check, and sends the refusal itself; the
    request is then dropped by pynetdicom as before, so nothing is stored.
    """
    command = event.message.command_set
    if command.get("CommandField") != _C_STORE_RQ or command.get("AffectedSOPInstanceUID"):
        return
    caller = event.assoc.requestor.ae_title
    logger.error("C-STORE from %s: the request has no AffectedSOPInstanceUID; refused", caller)
    response = C_STORE()
    response.MessageIDBeingRespondedTo = command.get("MessageID")
    response.AffectedSOPClassUID = command.get("AffectedSOPClassUID")
    response.Status = STATUS_CANNOT_UNDERSTAND
    response.ErrorComment = "AffectedSOPInstanceUID is not a valid DICOM UID"
    event.assoc.dimse.send_msg(response, event.message.context_id)


def refusal(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: at most 64 characters) for the caller."""
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:64]
    return response


def _log_rejection(event: Event) -> None:
    requestor = event.assoc.requestor
    logger.warning("rejected an association from %s (%s)", requestor.ae_title, requestor.address)
