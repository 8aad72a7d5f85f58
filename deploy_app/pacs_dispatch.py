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
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    StudyCollector,
    StudyOutcome,
    write_text_atomically,
)
from scripts.errors import find_user_error, user_message

logger = logging.getLogger("deploy_app.pacs")

#: Input folder, output folder -> the DICOM files written (the app, or a stand-in in tests).
StudyProcessor = Callable[[Path, Path], list[Path]]


def _failure_reason(error: BaseException) -> str:
    user_error = find_user_error(error)
    if user_error is not None:
        return user_message(user_error)
    return f"{type(error).__name__}: {error}"


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
        wall_clock: seconds since the epoch, for the outbox's schedule (it survives restarts).
    """

    collector: StudyCollector
    processor: StudyProcessor
    sender: ResultSender | None = None
    clock: Callable[[], float] = time.monotonic
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    send_retry_seconds: float = DEFAULT_SEND_RETRY_SECONDS
    send_retry_max_seconds: float = DEFAULT_SEND_RETRY_MAX_SECONDS
    wall_clock: Callable[[], float] = time.time
    queue: SendQueue | None = field(init=False, default=None)
    _started: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        self.attempts = AttemptLog(self.collector.dirs.attempts)
        if self.sender is not None:
            self.queue = SendQueue(
                self.collector.dirs,
                self.sender,
                retry_seconds=self.send_retry_seconds,
                retry_max_seconds=self.send_retry_max_seconds,
                clock=self.wall_clock,
                duration_clock=self.clock,
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
        if claimed.merged_from is not None:
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
            return self._fail(claimed, f"given up after {made} processing attempts; the last: {why}", 0.0)
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
                return self._fail(claimed, reason, seconds)
            logger.error(
                "study %s: attempt %d failed after %.1f s", study_uid, attempt, seconds, exc_info=error
            )
            if attempt >= self.max_attempts:
                return self._fail(
                    claimed, f"given up after {attempt} processing attempts; the last: {reason}", seconds
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

    def _fail(self, claimed: ClaimedStudy, reason: str, seconds: float) -> StudyOutcome:
        dirs = self.collector.dirs
        folder = dirs.failed / claimed.run_name
        os.replace(claimed.input_dir, folder)
        write_text_atomically(
            dirs.failed / f"{claimed.run_name}.log", f"study {claimed.study_uid}: {reason}\n"
        )
        self.attempts.forget(claimed.study_uid)
        logger.error("study %s failed: %s (instances in %s)", claimed.study_uid, reason, folder)
        return StudyOutcome(claimed.study_uid, "failed", folder, (), reason, seconds, claimed.run_name)
