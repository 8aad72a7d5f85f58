"""The PACS listener's dispatch: run the app on every stable study, queue and send its results.

One study at a time, in the dispatch thread:

1. claim it (``incoming/`` -> ``processing/<run>``), merged with the instances of its latest
   earlier run when it was analysed before (late instances: the new results supersede the earlier
   ones, which the log says);
2. count the attempt in ``attempts/<study>.json`` *before* running the app, so that an attempt
   that kills the process counts; a study that has had ``max_attempts`` is given up (``failed/``
   with the reason in ``failed/<run>.log``) instead of being run again;
3. run the processor into ``outputs/<run>``. A :class:`~scripts.errors.UserInputError` (the data
   cannot be analysed) fails the study at once; any other error is retried (the study goes back to
   ``incoming/``) until ``max_attempts``;
4. queue the results in the outbox and make the first delivery attempt
   (:class:`~deploy_app.pacs_outbox.SendQueue`); a study is ``done`` only once delivered.

A study that fails for good (an error in its data, or given up after ``max_attempts``) stays in
``failed/`` for inspection; the ``notifier`` (:class:`FailureNoticeWriter` in the listener) writes
an "analysis not performed" notice into ``outputs/<run>/``, which is queued and sent like results,
so that the PACS shows why the study has none. A notice that cannot be made is logged; the
listener goes on.

With ``keep_received_hours`` the received instances of studies in ``done/`` are deleted that long
after they got there (:class:`~deploy_app.pacs_store.ReceivedRetention`, checked at every poll by
:meth:`StudyDispatcher.purge_received`); those in ``failed/`` never are.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from deploy_app.pacs_outbox import (
    DEFAULT_SEND_RETRY_MAX_SECONDS,
    DEFAULT_SEND_RETRY_SECONDS,
    ResultSender,
    SendQueue,
)
from deploy_app.pacs_store import (
    DEFAULT_MAX_ATTEMPTS,
    AttemptLog,
    ClaimedStudy,
    ReceivedRetention,
    StudyCollector,
    StudyOutcome,
    append_text_atomically,
    write_text_atomically,
)
from scripts.errors import UserInputError, find_user_error, user_message

logger = logging.getLogger("deploy_app.pacs")

#: Input folder, output folder -> the DICOM files written (the app, or a stand-in in tests).
StudyProcessor = Callable[[Path, Path], list[Path]]

#: Failed study's folder (``failed/<run>``), output folder (``outputs/<run>``), the reasons (one
#: per failing series, plain words), the run name -> the notice file written there.
FailureNotifier = Callable[[Path, Path, Sequence[str], str], Path]

NOTICE_FILE = "analysis_not_performed.dcm"
"""The notice's file name in ``outputs/<run>/``."""


class SeriesFailures(UserInputError):
    """No series of a study could be analysed; one message per failing series.

    Args:
        messages: ``"<series>: <why>"`` for each series (the notice lists them one by one).
    """

    def __init__(self, messages: Sequence[str]) -> None:
        self.messages = tuple(messages)
        super().__init__("; ".join(self.messages))


def _failure_reason(error: BaseException) -> str:
    user_error = find_user_error(error)
    if user_error is not None:
        return user_message(user_error)
    return f"{type(error).__name__}: {error}"


def _failure_reasons(error: BaseException) -> list[str]:
    """The reasons the notice lists: each failing series' message, or the one message."""
    user_error = find_user_error(error)
    if isinstance(user_error, SeriesFailures) and user_error.messages:
        return list(user_error.messages)
    return [_failure_reason(error)]


def _given_up_reason(attempts: int, last_error: str) -> str:
    return (
        f"The analysis failed {attempts} times in a row with an internal error (not a problem of the "
        f"images that it could name), so it was given up. The last error: {last_error}"
    )


def _reference_header(study_dir: Path):
    """A header to build the notice from: a CT instance's, else any instance of the study's."""
    from deploy_app.dicom_io import iter_dicom_headers

    for _, header in iter_dicom_headers(study_dir, sop_classes={CTImageStorage, EnhancedCTImageStorage}):
        if "StudyInstanceUID" in header:
            return header
    for _, header in iter_dicom_headers(study_dir):
        if "StudyInstanceUID" in header:
            return header
    raise ValueError(f"no readable DICOM instance with a StudyInstanceUID in {study_dir}")


class FailureNoticeWriter:
    """The listener's :data:`FailureNotifier`: the "analysis not performed" Encapsulated PDF.

    Built from a received CT header of the study (or, when no CT was received, from any received
    instance: they all carry the patient and study), with the model bundle's name and version
    (read from its ``configs/metadata.json`` at the first notice; "unknown" when it has none).

    Args:
        model_dir: the bundle (or model set) folder given to ``--model``.
        model_name: the bundle's name (default: read from ``model_dir``).
        model_version: the bundle's version (default: read from ``model_dir``).
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        model_name: str | None = None,
        model_version: str | None = None,
    ) -> None:
        self.model_dir = model_dir
        self._identity = (model_name, model_version) if model_name and model_version else None

    def identity(self) -> tuple[str, str]:
        """(name, version) of the model bundle."""
        if self._identity is None:
            self._identity = ("unknown", "unknown")
            if self.model_dir is not None:
                from scripts.deployed import locate_models, read_bundle_identity

                found = read_bundle_identity(locate_models(self.model_dir)[0], required=False)
                self._identity = (found.name, found.version)
        return self._identity

    def __call__(self, study_dir: Path, output_dir: Path, reasons: Sequence[str], run_name: str) -> Path:
        from deploy_app.dicom_io import write_dataset
        from deploy_app.report.failure_notice import failure_notice

        name, version = self.identity()
        notice = failure_notice(
            _reference_header(study_dir), reasons, model_name=name, model_version=version, reference=run_name
        )
        return write_dataset(notice, output_dir / NOTICE_FILE)


@dataclass
class StudyDispatcher:
    """Runs the processor on every stable study, sends the results and files the study.

    Args:
        collector: where studies arrive.
        processor: input folder, output folder -> the DICOM files written.
        sender: delivers the written files (None: keep them in ``outputs/`` only).
        clock: monotonic seconds, for the durations in the log and the outcomes.
        max_attempts: processing attempts per study (crashes and kills included) before it is
            given up.
        send_retry_seconds: the wait after the first failed delivery, doubled after each further one.
        send_retry_max_seconds: the longest wait between delivery attempts.
        wall_clock: seconds since the epoch, for the outbox's and the retention's schedules (they
            survive restarts).
        notifier: writes the "analysis not performed" notice of a failed study, which is then sent
            like results (None: no notice).
        keep_received_hours: delete the received instances of a study in ``done/`` this many hours
            after it got there (0: at the next poll; None: never).
    """

    collector: StudyCollector
    processor: StudyProcessor
    sender: ResultSender | None = None
    clock: Callable[[], float] = time.monotonic
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    send_retry_seconds: float = DEFAULT_SEND_RETRY_SECONDS
    send_retry_max_seconds: float = DEFAULT_SEND_RETRY_MAX_SECONDS
    wall_clock: Callable[[], float] = time.time
    notifier: FailureNotifier | None = None
    keep_received_hours: float | None = None
    queue: SendQueue | None = field(init=False, default=None)
    retention: ReceivedRetention | None = field(init=False, default=None)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        self.attempts = AttemptLog(self.collector.dirs.attempts)
        if self.keep_received_hours is not None:
            self.retention = ReceivedRetention(
                self.collector.dirs, self.keep_received_hours * 3600.0, clock=self.wall_clock
            )
        if self.sender is not None:
            self.queue = SendQueue(
                self.collector.dirs,
                self.sender,
                retry_seconds=self.send_retry_seconds,
                retry_max_seconds=self.send_retry_max_seconds,
                clock=self.wall_clock,
                duration_clock=self.clock,
                retention=self.retention,
            )

    def start(self) -> None:
        """Start the recovered studies' timers and load the outbox (idempotent).

        Called when the listener starts serving, after the processor (the models) is ready, so
        that the stability timer of a study recovered from an earlier run starts then.
        """
        if self._started:
            return
        self._started = True
        self.collector.start_timers()
        if self.retention is not None:
            self.retention.recover()
        if self.queue is not None:
            self.queue.recover()
        elif any(self.collector.dirs.outbox.glob("*.json")):
            logger.warning(
                "results wait in %s but no destination is set; they are sent once one is",
                self.collector.dirs.outbox,
            )

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
        self.start()
        done: list[StudyOutcome] = []
        for study_uid in self.collector.stable_studies():
            if (stop is not None and stop.is_set()) or (limit is not None and len(done) >= limit):
                break
            done.append(self.process(study_uid))
        return done

    def send_due(self, stop: threading.Event | None = None) -> list[StudyOutcome]:
        """Retry the queued deliveries that are due; one outcome per attempt."""
        self.start()
        return self.queue.send_due(stop) if self.queue is not None else []

    def purge_received(self) -> list[str]:
        """Delete the received instances of the runs in ``done/`` kept long enough; the runs purged."""
        self.start()
        return self.retention.purge_due() if self.retention is not None else []

    def process(self, study_uid: str) -> StudyOutcome:
        """Claim, process, queue, send and file one study; failures are logged and filed, never raised.

        A ``KeyboardInterrupt`` (a second Ctrl-C) abandons the study: it goes back to ``incoming/``
        (the attempt is not counted) and the interrupt is raised.
        """
        dirs = self.collector.dirs
        try:
            claimed = self.collector.claim(study_uid)
        except OSError as error:  # the folder vanished or the disk failed: report it, keep listening
            logger.error("study %s cannot be moved to %s: %s", study_uid, dirs.processing, error)
            return StudyOutcome(study_uid, "failed", dirs.incoming / study_uid, reason=str(error))
        if claimed.merged_from is not None and not claimed.merged_from_kept:
            logger.warning(
                "study %s: %d instances arrived after run %s, whose received instances are no longer "
                "kept (--keep-received); analysing the %d new instances alone as run %s, whose results "
                "supersede those of run %s",
                study_uid,
                claimed.received,
                claimed.merged_from,
                claimed.instances,
                claimed.run_name,
                claimed.merged_from,
            )
        elif claimed.merged_from is not None:
            logger.warning(
                "study %s: %d instances arrived after run %s; re-analysing all %d instances as run %s, "
                "whose results supersede those of run %s",
                study_uid,
                claimed.received,
                claimed.merged_from,
                claimed.instances,
                claimed.run_name,
                claimed.merged_from,
            )
        made, last_error = self.attempts.count(study_uid)
        if made >= self.max_attempts:
            why = last_error or "the listener stopped (killed or crashed) during the attempt"
            return self._fail(
                claimed,
                f"given up after {made} processing attempts; the last: {why}",
                0.0,
                [_given_up_reason(made, why)],
            )
        attempt = self.attempts.begin(study_uid, claimed.run_name)
        logger.info(
            "study %s: processing %d instances (attempt %d of %d)",
            study_uid,
            claimed.instances,
            attempt,
            self.max_attempts,
        )
        output_dir = dirs.outputs / claimed.run_name
        started = self.clock()
        try:
            # what an interrupted attempt of this run left must not be sent with the new results
            shutil.rmtree(output_dir, ignore_errors=True)
            output_dir.mkdir(parents=True)
            written = tuple(self.processor(claimed.input_dir, output_dir))
        except Exception as error:
            seconds = self.clock() - started
            reason = _failure_reason(error)
            if find_user_error(error) is not None:
                return self._fail(claimed, reason, seconds, _failure_reasons(error))
            logger.error(
                "study %s: attempt %d failed after %.1f s", study_uid, attempt, seconds, exc_info=error
            )
            if attempt >= self.max_attempts:
                return self._fail(
                    claimed,
                    f"given up after {attempt} processing attempts; the last: {reason}",
                    seconds,
                    [_given_up_reason(attempt, reason)],
                )
            self.attempts.record_error(study_uid, claimed.run_name, reason)
            shutil.rmtree(output_dir, ignore_errors=True)
            self.collector.requeue(claimed)
            logger.warning(
                "study %s: attempt %d of %d failed (%s); queued again",
                study_uid,
                attempt,
                self.max_attempts,
                reason,
            )
            return StudyOutcome(
                study_uid, "retrying", dirs.incoming / study_uid, (), reason, seconds, claimed.run_name
            )
        except BaseException:
            self.attempts.undo(study_uid, claimed.run_name)
            self.collector.requeue(claimed)
            shutil.rmtree(output_dir, ignore_errors=True)
            logger.warning("study %s abandoned; it stays queued in %s", study_uid, dirs.incoming)
            raise
        seconds = self.clock() - started
        if self.queue is None or not written:
            self.attempts.forget(study_uid)
            folder = dirs.done / claimed.run_name
            os.replace(claimed.input_dir, folder)
            if self.retention is not None:
                self.retention.record(
                    claimed.run_name,
                    study_uid,
                    "kept" if self.queue is None else "nothing to send",
                    tuple(str(path.resolve().relative_to(output_dir.resolve())) for path in written),
                )
            if not written:
                logger.warning("study %s: the app wrote no DICOM files; nothing to send", study_uid)
            logger.info(
                "study %s done in %.1f s: %d result files kept (%s)",
                study_uid,
                seconds,
                len(written),
                output_dir,
            )
            return StudyOutcome(study_uid, "done", folder, written, None, seconds, claimed.run_name)
        entry = self.queue.enqueue(claimed, written)
        self.attempts.forget(study_uid)  # after the enqueue: a kill in between re-runs the study
        logger.info("study %s processed in %.1f s: %d result files to send", study_uid, seconds, len(written))
        sent = self.queue.send(entry)
        return StudyOutcome(
            study_uid, sent.state, sent.folder, written, sent.reason, seconds + sent.seconds, claimed.run_name
        )

    def _fail(
        self, claimed: ClaimedStudy, reason: str, seconds: float, reasons: Sequence[str]
    ) -> StudyOutcome:
        """File the study in ``failed/`` (kept for inspection), then write and send its notice."""
        dirs = self.collector.dirs
        folder = dirs.failed / claimed.run_name
        os.replace(claimed.input_dir, folder)
        write_text_atomically(
            dirs.failed / f"{claimed.run_name}.log", f"study {claimed.study_uid}: {reason}\n"
        )
        self.attempts.forget(claimed.study_uid)
        logger.error("study %s failed: %s (instances in %s)", claimed.study_uid, reason, folder)
        notice = self._write_notice(claimed, folder, reasons)
        if notice is None:
            return StudyOutcome(claimed.study_uid, "failed", folder, (), reason, seconds, claimed.run_name)
        if self.queue is None:
            logger.info(
                "study %s: analysis-not-performed notice kept in %s (no destination)",
                claimed.study_uid,
                notice.parent,
            )
            return StudyOutcome(
                claimed.study_uid, "failed", folder, (notice,), reason, seconds, claimed.run_name
            )
        try:
            entry = self.queue.enqueue_notice(claimed.run_name, claimed.study_uid, [notice])
            sent = self.queue.send(entry)
        except Exception as error:  # a full or failing disk: report it, keep listening
            logger.error(
                "study %s: the analysis-not-performed notice could not be queued (%s: %s)",
                claimed.study_uid,
                type(error).__name__,
                error,
            )
            return StudyOutcome(
                claimed.study_uid, "failed", folder, (notice,), reason, seconds, claimed.run_name
            )
        if sent.state == "notified":
            logger.info(
                "study %s: analysis-not-performed notice sent (run %s)", claimed.study_uid, claimed.run_name
            )
        else:
            logger.warning(
                "study %s: analysis-not-performed notice queued for sending (run %s)",
                claimed.study_uid,
                claimed.run_name,
            )
        return StudyOutcome(
            claimed.study_uid, "failed", folder, (notice,), reason, seconds + sent.seconds, claimed.run_name
        )

    def _write_notice(self, claimed: ClaimedStudy, folder: Path, reasons: Sequence[str]) -> Path | None:
        """The notice written into ``outputs/<run>/`` (None: no notifier, or it failed: logged)."""
        if self.notifier is None:
            return None
        output_dir = self.collector.dirs.outputs / claimed.run_name
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            notice = self.notifier(folder, output_dir, reasons, claimed.run_name)
            append_text_atomically(
                self.collector.dirs.failed / f"{claimed.run_name}.log",
                f"study {claimed.study_uid}: analysis-not-performed notice written: {notice}\n",
            )
        except Exception as error:  # a notice must never stop the listener
            logger.error(
                "study %s: the analysis-not-performed notice could not be written (%s: %s); "
                "nothing is sent for it",
                claimed.study_uid,
                type(error).__name__,
                error,
            )
            logger.debug("notice failure", exc_info=error)
            return None
        return notice
