"""The PACS listener's persistent send queue: results wait in ``outbox/`` until delivered.

Every processed study goes through the outbox before it is sent: its received instances move to
``outbox/<run>/`` beside a small state file ``outbox/<run>.json`` (the result files, relative to
``outputs/<run>/``; attempts; the next attempt's time; the last error). A delivery that fails
(destination down, association refused, a file not stored) stays there and is tried again after an
exponential backoff, ``retry_seconds * 2**(attempts - 1)`` capped at ``retry_max_seconds``. Only a
delivered study moves to ``done/``; the outbox is never given up on and never mixed with
``failed/``, which holds studies the app could not analyse.

The queue survives restarts: at start every entry is due at once (a restart often follows a fix of
the destination). A run killed during a send is sent again whole, with the same SOP Instance UIDs,
so the destination ends with one copy of each result object (a re-stored SOP Instance replaces
itself) and the results of one run only.

When a study is re-analysed (late instances) while the results of its earlier run still wait,
those are superseded: taken out of the queue, never sent, and filed in ``done/`` beside a
``<run>.log`` that says so.

A study the app could not analyse stays in ``failed/<run>/``; its "analysis not performed" notice
(:mod:`deploy_app.report.failure_notice`) goes through the same queue as a *notice* entry
(``"notice": true`` in the state file, no instances moved into the outbox): retried like results,
and once delivered noted in ``failed/<run>.log``; the study stays in ``failed/``. A notice still
waiting when a later run of the study is queued with results is superseded by them (never sent).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy_app.pacs_net import SendError
from deploy_app.pacs_store import (
    ClaimedStudy,
    ReceivedRetention,
    StudyOutcome,
    WorkDirs,
    append_text_atomically,
    is_dicom_file,
    parse_run_name,
    read_json,
    write_json_atomically,
    write_text_atomically,
)

logger = logging.getLogger("deploy_app.pacs")

#: Sends the given DICOM files somewhere; raises :class:`SendError` when that fails.
ResultSender = Callable[[Sequence[Path]], None]

DEFAULT_SEND_RETRY_SECONDS = 30.0
DEFAULT_SEND_RETRY_MAX_SECONDS = 3600.0


@dataclass
class QueuedSend:
    """One run's results waiting for delivery (the content of ``outbox/<run>.json``).

    Args:
        run_name: the run's folder name.
        study_uid: the StudyInstanceUID.
        files: the result files, relative to ``outputs/<run>/``.
        attempts: delivery attempts made so far.
        next_attempt: when to try next (seconds since the epoch: it must survive a restart).
        last_error: why the latest attempt failed.
        notice: the "analysis not performed" notice of a failed study (its instances stay in
            ``failed/<run>/``), not results.
    """

    run_name: str
    study_uid: str
    files: tuple[str, ...]
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    notice: bool = False

    @property
    def what(self) -> str:
        """How the log names the files: results or the notice."""
        return "the analysis-not-performed notice" if self.notice else "results"

    @classmethod
    def from_state(cls, content: dict) -> QueuedSend | None:
        """Read a state file's content; None when it does not have the expected shape."""
        try:
            entry = cls(
                run_name=str(content["run_name"]),
                study_uid=str(content["study_uid"]),
                files=tuple(str(name) for name in content["files"]),
                attempts=int(content.get("attempts", 0)),
                next_attempt=float(content.get("next_attempt", 0.0)),
                last_error=content.get("last_error"),
                notice=bool(content.get("notice", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None
        # the file names come from the work dir's own state file; still, never leave outputs/<run>
        if any(Path(name).is_absolute() or ".." in Path(name).parts for name in entry.files):
            return None
        return entry


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, SendError) else f"{type(error).__name__}: {error}"


class SendQueue:
    """The outbox: enqueue processed runs, send what is due, retry with backoff.

    Used by the dispatch thread only (not thread-safe).

    Args:
        dirs: the listener's folders.
        sender: delivers files; raises :class:`SendError` (or any error) when that fails.
        retry_seconds: the wait after the first failed attempt; doubled after each further one.
        retry_max_seconds: the longest wait between attempts.
        clock: wall-clock seconds (``time.time``; injectable for tests).
        duration_clock: monotonic seconds, for the durations in the log.
        retention: records each run filed in ``done/`` (for ``--keep-received``), if given.
    """

    def __init__(
        self,
        dirs: WorkDirs,
        sender: ResultSender,
        *,
        retry_seconds: float = DEFAULT_SEND_RETRY_SECONDS,
        retry_max_seconds: float = DEFAULT_SEND_RETRY_MAX_SECONDS,
        clock: Callable[[], float] = time.time,
        duration_clock: Callable[[], float] = time.monotonic,
        retention: ReceivedRetention | None = None,
    ) -> None:
        if retry_seconds <= 0 or retry_max_seconds < retry_seconds:
            raise ValueError(
                f"send retry: base {retry_seconds} s must be positive and at most the maximum "
                f"{retry_max_seconds} s"
            )
        self.dirs = dirs
        self.sender = sender
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        self._clock = clock
        self._duration_clock = duration_clock
        self.retention = retention
        self._entries: dict[str, QueuedSend] = {}

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        return min(self.retry_seconds * 2 ** max(attempts - 1, 0), self.retry_max_seconds)

    def entries(self) -> list[QueuedSend]:
        """What waits for delivery, the next due first."""
        return sorted(self._entries.values(), key=lambda entry: (entry.next_attempt, entry.run_name))

    def recover(self) -> None:
        """Load what an earlier run left in the outbox; every entry is due now."""
        now = self._clock()
        outbox = self.dirs.outbox
        for state_path in sorted(outbox.glob("*.json")):
            run_name = state_path.name[: -len(".json")]
            if parse_run_name(run_name) is None:
                continue
            if not (outbox / run_name).exists() and (self.dirs.done / run_name).exists():
                state_path.unlink()  # delivered; the listener stopped before it removed the state
                continue
            entry = QueuedSend.from_state(read_json(state_path) or {}) or self._rebuild(run_name)
            if entry is None:
                continue
            entry.next_attempt = now
            self._entries[run_name] = entry
        for folder in sorted(outbox.iterdir()):
            if folder.is_dir() and folder.name not in self._entries and parse_run_name(folder.name):
                entry = self._rebuild(folder.name)
                if entry is not None:
                    entry.next_attempt = now
                    self._entries[folder.name] = entry
        for entry in self.entries():
            logger.info(
                "study %s: %s of run %s wait in the outbox (%d attempts so far); sending now",
                entry.study_uid,
                entry.what,
                entry.run_name,
                entry.attempts,
            )

    def _rebuild(self, run_name: str) -> QueuedSend | None:
        """A state for an outbox folder whose state file is missing or unreadable."""
        parsed = parse_run_name(run_name)
        output_dir = self.dirs.outputs / run_name
        files = sorted(
            str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if is_dicom_file(path)
        )
        if parsed is None or not files:
            logger.error("outbox entry %s has no readable state and no result files; left alone", run_name)
            return None
        # a failed study's notice: its instances stay in failed/, never in the outbox
        notice = (self.dirs.failed / run_name).is_dir() and not (self.dirs.outbox / run_name).exists()
        entry = QueuedSend(run_name, parsed[0], tuple(files), notice=notice)
        self._save(entry)
        return entry

    def enqueue(self, claimed: ClaimedStudy, written: Sequence[Path]) -> QueuedSend:
        """Queue a processed run: state file first, then the instances, so a kill loses neither."""
        output_dir = self.dirs.outputs / claimed.run_name
        files = tuple(str(Path(path).resolve().relative_to(output_dir.resolve())) for path in written)
        entry = QueuedSend(claimed.run_name, claimed.study_uid, files, next_attempt=self._clock())
        self._save(entry)
        os.replace(claimed.input_dir, self.dirs.outbox / claimed.run_name)
        self._entries[entry.run_name] = entry
        for older in [e for e in self.entries() if e.study_uid == entry.study_uid and e is not entry]:
            self._supersede_unsent(older, entry.run_name)
        return entry

    def enqueue_notice(self, run_name: str, study_uid: str, written: Sequence[Path]) -> QueuedSend:
        """Queue the notice of a failed run (in ``outputs/<run>/``); its instances stay in ``failed/``.

        A notice supersedes nothing: results of an earlier run of the study still waiting stay valid.
        """
        output_dir = self.dirs.outputs / run_name
        files = tuple(str(Path(path).resolve().relative_to(output_dir.resolve())) for path in written)
        entry = QueuedSend(run_name, study_uid, files, next_attempt=self._clock(), notice=True)
        self._save(entry)
        self._entries[entry.run_name] = entry
        return entry

    def _supersede_unsent(self, older: QueuedSend, newer_run: str) -> None:
        if older.notice:
            (self.dirs.outbox / f"{older.run_name}.json").unlink(missing_ok=True)
            del self._entries[older.run_name]
            append_text_atomically(
                self.dirs.failed / f"{older.run_name}.log",
                f"study {older.study_uid}: the analysis-not-performed notice of run {older.run_name} was "
                f"superseded by the results of run {newer_run} before it could be delivered; it was "
                "never sent\n",
            )
            logger.warning(
                "study %s: the queued analysis-not-performed notice of run %s is superseded by the "
                "results of run %s and will not be sent",
                older.study_uid,
                older.run_name,
                newer_run,
            )
            return
        folder = self.dirs.outbox / older.run_name
        if folder.exists():
            os.replace(folder, self.dirs.done / older.run_name)
        write_text_atomically(
            self.dirs.done / f"{older.run_name}.log",
            f"study {older.study_uid}: the results of run {older.run_name} were superseded by run "
            f"{newer_run} before they could be delivered; they were never sent\n",
        )
        (self.dirs.outbox / f"{older.run_name}.json").unlink(missing_ok=True)
        del self._entries[older.run_name]
        if self.retention is not None and (self.dirs.done / older.run_name).is_dir():
            # its instances were merged into the newer run: deleting them loses nothing
            self.retention.record(older.run_name, older.study_uid, "superseded")
        logger.warning(
            "study %s: the queued results of run %s are superseded by run %s and will not be sent",
            older.study_uid,
            older.run_name,
            newer_run,
        )

    def due(self) -> list[QueuedSend]:
        """The entries whose next attempt is now or past."""
        now = self._clock()
        return [entry for entry in self.entries() if entry.next_attempt <= now]

    def send_due(self, stop: threading.Event | None = None) -> list[StudyOutcome]:
        """Try every due entry once (until ``stop`` is set)."""
        outcomes = []
        for entry in self.due():
            if stop is not None and stop.is_set():
                break
            outcomes.append(self.send(entry))
        return outcomes

    def send(self, entry: QueuedSend) -> StudyOutcome:
        """One delivery attempt; files the run in ``done/`` on success, reschedules it otherwise."""
        files = tuple(self.dirs.outputs / entry.run_name / name for name in entry.files)
        started = self._duration_clock()
        try:
            self.sender(files)
        except Exception as error:
            entry.attempts += 1
            entry.last_error = _reason(error)
            wait = self.backoff(entry.attempts)
            entry.next_attempt = self._clock() + wait
            self._save(entry)
            if not isinstance(error, SendError):
                logger.error("study %s: sending failed unexpectedly", entry.study_uid, exc_info=error)
            logger.warning(
                "study %s: %s of run %s not delivered (attempt %d): %s; next attempt in %.0f s "
                "(they wait in %s)",
                entry.study_uid,
                entry.what,
                entry.run_name,
                entry.attempts,
                entry.last_error,
                wait,
                self.dirs.outbox,
            )
            return StudyOutcome(
                entry.study_uid,
                "queued",
                self.dirs.outbox / entry.run_name,
                files,
                entry.last_error,
                self._duration_clock() - started,
                entry.run_name,
            )
        if entry.notice:
            return self._notice_delivered(entry, files, started)
        sent_before = [
            run.name
            for run in self.dirs.earlier_runs(entry.study_uid)
            if run.parent == self.dirs.done
            and run.name != entry.run_name
            and not (self.dirs.done / f"{run.name}.log").exists()  # superseded before it was sent
        ]
        folder = self.dirs.done / entry.run_name
        if (self.dirs.outbox / entry.run_name).exists():
            os.replace(self.dirs.outbox / entry.run_name, folder)
        (self.dirs.outbox / f"{entry.run_name}.json").unlink(missing_ok=True)
        del self._entries[entry.run_name]
        if self.retention is not None:
            self.retention.record(entry.run_name, entry.study_uid, "delivered", entry.files)
        logger.info(
            "study %s done: %d result files of run %s sent%s",
            entry.study_uid,
            len(files),
            entry.run_name,
            f" after {entry.attempts + 1} attempts" if entry.attempts else "",
        )
        if sent_before:
            logger.warning(
                "study %s: the results of run %s supersede those sent earlier for run %s "
                "(new SR series; the earlier results stay in the PACS unless removed there)",
                entry.study_uid,
                entry.run_name,
                ", ".join(sent_before),
            )
        return StudyOutcome(
            entry.study_uid,
            "done",
            folder,
            files,
            None,
            self._duration_clock() - started,
            entry.run_name,
        )

    def _notice_delivered(self, entry: QueuedSend, files: tuple[Path, ...], started: float) -> StudyOutcome:
        (self.dirs.outbox / f"{entry.run_name}.json").unlink(missing_ok=True)
        del self._entries[entry.run_name]
        attempts = f" after {entry.attempts + 1} attempts" if entry.attempts else ""
        append_text_atomically(
            self.dirs.failed / f"{entry.run_name}.log",
            f"study {entry.study_uid}: the analysis-not-performed notice was delivered{attempts}\n",
        )
        logger.info(
            "study %s: the analysis-not-performed notice of run %s was delivered%s",
            entry.study_uid,
            entry.run_name,
            attempts,
        )
        return StudyOutcome(
            entry.study_uid,
            "notified",
            self.dirs.failed / entry.run_name,
            files,
            None,
            self._duration_clock() - started,
            entry.run_name,
        )

    def _save(self, entry: QueuedSend) -> None:
        content = asdict(entry)
        content["files"] = list(entry.files)
        write_json_atomically(self.dirs.outbox / f"{entry.run_name}.json", content)
