"""DICOM listener next to a PACS: receive studies, run the app on each, send the results back.

``python -m deploy_app.pacs --model BUNDLE --work-dir DIR [--destination AET@host:port]``

A pynetdicom Storage SCP (CT images, the SR and SEG objects that carry nodule seeds, and C-ECHO)
files every received instance under ``DIR/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm``
before acknowledging it; an instance whose Study, Series or SOP Instance UID is not a valid DICOM
UID is refused (status 0xC000 with an Error Comment naming the attribute), since those UIDs become
file and folder names. When a study has received nothing for ``--stable-seconds`` it is moved to
``DIR/processing/`` and the app runs on it into ``DIR/outputs/<run>/``. Its results then wait in
the persistent send queue ``DIR/outbox/`` until the destination AE has stored every one of them
(retried with exponential backoff from ``--send-retry-seconds`` up to
``--send-retry-max-seconds``); only then does the study go to ``DIR/done/``. A study the app
cannot analyse goes to ``DIR/failed/`` beside a ``<run>.log`` that says why; one failing study
never stops the listener.

* **Failures reach the PACS.** For a study that fails (no usable CT series, no seeds, every seed
  outside the scan, or given up after ``--max-attempts``) a one-page "Analysis not performed"
  Encapsulated PDF (:mod:`deploy_app.report.failure_notice`, a new DOC series in the same study,
  with the reason of each failing series) is written to ``DIR/outputs/<run>/`` and sent to the
  destination through the outbox like results. The study stays in ``DIR/failed/`` for inspection.
* **Received images are kept** ``--keep-received`` hours (default 0) after the study's results were
  delivered (``DIR/done/``), then deleted; ``DIR/done/<run>.json`` records what was received and
  sent and when, and the results stay in ``DIR/outputs/``. Failed studies are never deleted.

* **Late instances.** A study received again after it was analysed is merged with the instances of
  its latest earlier run and analysed again as ``<study uid>_2`` (``_3``, ...); the re-run writes
  new SR, PDF and SC series (new UIDs) and the log says that they supersede the earlier results.
* **Poison studies.** Each processing attempt is counted in ``DIR/attempts/`` before it starts, so
  an attempt that crashes or kills the listener counts; after ``--max-attempts`` (default 2) the
  study is given up (``failed/``, with the reason). An error in the data (a
  :class:`~scripts.errors.UserInputError`) fails the study at the first attempt.
* **Restarts.** Everything lives in the work directory: a restart (even after ``kill -9``) sends
  what waits in the outbox, runs again what was being processed, and keeps what was received. The
  stability timers of recovered studies start once the models are loaded.

Files and folders get the modes of the process umask (typically 0644/0755). The listener binds
127.0.0.1 by default, so only this machine can send to it; a real deployment binds 0.0.0.0 (or one
interface) and should name its PACS with ``--allowed-callers``. Every socket it opens or accepts
has TCP_NODELAY set (:mod:`deploy_app.pacs_net`).

The logic is plain Python with an injectable clock, processor and sender:
:mod:`deploy_app.pacs_store` (folders, collector, attempts), :mod:`deploy_app.pacs_dispatch`
(:class:`StudyDispatcher`), :mod:`deploy_app.pacs_outbox` (:class:`SendQueue`);
:class:`StorageServer` is the thin pynetdicom wrapper. Logs carry UIDs, AE titles and counts, never
patient names or IDs.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from deploy_app.pacs_dispatch import (
    NOTICE_FILE,
    FailureNoticeWriter,
    FailureNotifier,
    SeriesFailures,
    StudyDispatcher,
    StudyProcessor,
)
from deploy_app.pacs_net import (
    DEFAULT_AE_TITLE,
    DEFAULT_BIND,
    DEFAULT_PORT,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    STORAGE_CLASSES,
    DicomDestination,
    DicomSender,
    SendError,
    StorageServer,
    enable_tcp_nodelay,
    refusal,
)
from deploy_app.pacs_outbox import (
    DEFAULT_SEND_RETRY_MAX_SECONDS,
    DEFAULT_SEND_RETRY_SECONDS,
    QueuedSend,
    ResultSender,
    SendQueue,
)
from deploy_app.pacs_store import (
    DEFAULT_MAX_ATTEMPTS,
    ClaimedStudy,
    StudyCollector,
    StudyOutcome,
    WorkDirs,
    is_dicom_file,
)
from scripts.errors import UserInputError, exit_on_user_error

__all__ = [
    "DEFAULT_AE_TITLE",
    "DEFAULT_BIND",
    "DEFAULT_KEEP_RECEIVED_HOURS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PORT",
    "DEFAULT_SEND_RETRY_MAX_SECONDS",
    "DEFAULT_SEND_RETRY_SECONDS",
    "DEFAULT_STABLE_SECONDS",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "STORAGE_CLASSES",
    "ClaimedStudy",
    "DicomDestination",
    "DicomSender",
    "FailureNoticeWriter",
    "FailureNotifier",
    "NOTICE_FILE",
    "QueuedSend",
    "ResultSender",
    "SendError",
    "SendQueue",
    "SeriesFailures",
    "StorageServer",
    "StudyCollector",
    "StudyDispatcher",
    "StudyOutcome",
    "StudyProcessor",
    "WorkDirs",
    "app_processor",
    "build_parser",
    "enable_tcp_nodelay",
    "install_stop_signals",
    "is_dicom_file",
    "main",
    "refusal",
    "run_listener",
]

# Named, not __name__: under ``python -m deploy_app.pacs`` the module is __main__.
logger = logging.getLogger("deploy_app.pacs")

DEFAULT_STABLE_SECONDS = 10.0
DEFAULT_KEEP_RECEIVED_HOURS = 0.0


def app_processor(model_dir: Path) -> StudyProcessor:
    """The deploy app as a :data:`StudyProcessor`, with the bundle's models loaded once.

    A study where every CT series failed (no usable series, no seeds, ...) raises
    :class:`~deploy_app.pacs_dispatch.SeriesFailures` (a :class:`~scripts.errors.UserInputError`)
    with the app's message for each series; when some series succeed, the
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
            raise SeriesFailures([f"{f.series}: {f.message}" for f in outcome.failures])
        if not written:
            raise SeriesFailures(
                [f"no CT series in '{input_dir.name}' could be analysed (no results written)"]
            )
        return written

    return process


def run_listener(
    server: StorageServer,
    dispatcher: StudyDispatcher,
    stop: threading.Event,
    *,
    once: bool = False,
    poll_seconds: float = 0.5,
) -> list[StudyOutcome]:
    """Serve until ``stop`` is set (or, with ``once``, until one study was processed).

    The recovered studies' stability timers start here, once the processor is ready. Each poll
    processes the stable studies, then retries the deliveries that are due, and deletes the
    received instances of delivered studies kept long enough (``--keep-received``). The study being
    processed when ``stop`` is set is finished first; studies still arriving stay in ``incoming/``
    and undelivered results in ``outbox/``, both picked up by the next run. With ``once``, the
    first study's outcome ends the loop whether it was delivered, failed or queued for delivery
    (a study queued for another processing attempt is processed again first).

    Returns:
        the outcomes of the studies processed and of the delivery attempts made.
    """
    outcomes: list[StudyOutcome] = []
    server.start()
    dispatcher.start()
    try:
        while not stop.wait(poll_seconds):
            outcomes += dispatcher.dispatch_stable(stop, limit=1 if once else None)
            dispatcher.purge_received()
            if once and any(outcome.state != "retrying" for outcome in outcomes):
                break
            outcomes += dispatcher.send_due(stop)
            dispatcher.purge_received()
    finally:
        server.stop()
        pending = dispatcher.collector.pending_studies()
        if pending:
            logger.info(
                "stopped with %d studies still queued in %s", len(pending), dispatcher.collector.dirs.incoming
            )
        if dispatcher.queue is not None and dispatcher.queue.entries():
            logger.warning(
                "stopped with the results of %d studies not yet delivered (in %s); "
                "they are sent at the next start",
                len(dispatcher.queue.entries()),
                dispatcher.collector.dirs.outbox,
            )
    counts = {state: sum(o.state == state for o in outcomes) for state in ("done", "failed", "queued")}
    logger.info(
        "listener stopped: %d studies done, %d failed, %d delivery attempts failed",
        counts["done"],
        counts["failed"],
        counts["queued"],
    )
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


def _hours_argument(text: str) -> float:
    try:
        hours = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of hours") from error
    if math.isnan(hours) or hours < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more hours, got '{text}'")
    return hours


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
        "--work-dir",
        type=Path,
        required=True,
        help="incoming/, processing/, outputs/, outbox/, done/, failed/, attempts/ go here",
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
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="processing attempts per study, crashes and kills of the listener included, before the "
        f"study is moved to failed/ (default {DEFAULT_MAX_ATTEMPTS})",
    )
    parser.add_argument(
        "--send-retry-seconds",
        type=float,
        default=DEFAULT_SEND_RETRY_SECONDS,
        help="wait after a failed delivery to --destination, doubled after each further failure "
        f"(default {DEFAULT_SEND_RETRY_SECONDS:g})",
    )
    parser.add_argument(
        "--send-retry-max-seconds",
        type=float,
        default=DEFAULT_SEND_RETRY_MAX_SECONDS,
        help=f"the longest wait between delivery attempts (default {DEFAULT_SEND_RETRY_MAX_SECONDS:g})",
    )
    parser.add_argument(
        "--keep-received",
        type=_hours_argument,
        default=DEFAULT_KEEP_RECEIVED_HOURS,
        metavar="HOURS",
        help="delete a study's received images this many hours after its results were delivered "
        "(done/; done/<run>.json records the delivery); 0: right after (the default); inf: never. "
        "Failed studies are always kept",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="exit after the first study (exit status 1 unless it was processed and delivered; "
        "undelivered results stay in outbox/ for the next start)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


@exit_on_user_error
def main(
    argv: Sequence[str] | None = None,
    *,
    make_processor: Callable[[Path], StudyProcessor] = app_processor,
    make_notifier: Callable[[Path], FailureNotifier] = FailureNoticeWriter,
) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        make_processor: builds the processor from ``--model`` (the app; tests pass a stand-in,
            which the command line cannot).
        make_notifier: builds the writer of the "analysis not performed" notice from ``--model``.
    """
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
    if args.max_attempts < 1:
        raise UserInputError(f"--max-attempts must be at least 1, got {args.max_attempts}")
    if not 0 < args.send_retry_seconds <= args.send_retry_max_seconds:
        raise UserInputError(
            f"--send-retry-seconds ({args.send_retry_seconds:g}) must be positive and at most "
            f"--send-retry-max-seconds ({args.send_retry_max_seconds:g})"
        )
    # The models first: the collector's recovery moves folders, which should not happen when the
    # listener cannot start anyway (and the recovered timers start only in run_listener).
    processor = make_processor(args.model)
    collector = StudyCollector(WorkDirs(args.work_dir), args.stable_seconds)
    sender = DicomSender(args.destination, args.ae_title) if args.destination is not None else None
    dispatcher = StudyDispatcher(
        collector,
        processor,
        sender,
        max_attempts=args.max_attempts,
        send_retry_seconds=args.send_retry_seconds,
        send_retry_max_seconds=args.send_retry_max_seconds,
        notifier=make_notifier(args.model),
        keep_received_hours=args.keep_received,
    )
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
    if not args.once:
        return 0
    first = next((outcome for outcome in outcomes if outcome.state != "retrying"), None)
    return 0 if first is not None and first.succeeded else 1


if __name__ == "__main__":
    raise SystemExit(main())
