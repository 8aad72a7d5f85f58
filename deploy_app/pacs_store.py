"""What the PACS listener keeps on disk: its folders, the received instances and per-study state.

Everything the listener must not lose lies under one work directory, so that a restart (or a
``kill -9``) resumes where the previous run stopped:

* ``incoming/<study>/``: instances being received, one ``<SOPInstanceUID>.dcm`` each, written
  atomically (a temporary file renamed into place) before the C-STORE is acknowledged;
* ``processing/<run>/``: the study the app is running on (``<run>`` is the study UID, or
  ``<study>_<n>`` for its n-th run);
* ``attempts/<study>.json``: how many processing attempts the study has had, written *before* each
  attempt starts, so an attempt that kills the process still counts;
* ``outputs/<run>/``: what the app wrote;
* ``outbox/<run>/`` with ``outbox/<run>.json``: processed studies whose results are not yet
  delivered, and the send state (:mod:`deploy_app.pacs_outbox`);
* ``done/<run>/`` and ``failed/<run>/`` (with ``failed/<run>.log``): finished studies;
* ``done/<run>.json`` (with ``--keep-received``, :class:`ReceivedRetention`): when the run was
  delivered, what was received and sent, and when its received instances were deleted; the
  emptied ``done/<run>/`` folder stays, so run names stay unique.

A study received again after it was analysed (late instances) is merged with the instances of its
latest earlier run, so the re-run sees all of them; the earlier folders are kept as they were (or
as ``--keep-received`` left them: a run whose instances were deleted has nothing to merge).

Files and folders get the modes of the process umask (typically 0644/0755), never the 0600/0700 of
:mod:`tempfile`, so that a reader running as another user can read them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deploy_app.uids import check_uid, is_valid_uid, path_inside
from scripts.atomic import umask_file_mode, write_bytes_atomically
from scripts.errors import UserInputError

logger = logging.getLogger("deploy_app.pacs")

DEFAULT_MAX_ATTEMPTS = 2

_RUN_NAME = re.compile(r"^(?P<uid>[0-9.]+)(_(?P<n>[0-9]+))?$")

#: What became of a study: delivered (or kept, without a destination), given up, results waiting
#: in the outbox, or given back to ``incoming/`` for another processing attempt; ``notified``: the
#: "analysis not performed" notice of a failed study was delivered by a later attempt.
OutcomeState = Literal["done", "failed", "queued", "retrying", "notified"]


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under the process umask."""
    return umask_file_mode()


def write_text_atomically(path: Path, text: str) -> None:
    """UTF-8 text, whole or not at all, made durable (state files: a power loss must not empty them)."""
    write_bytes_atomically(path, text.encode("utf-8"), durable=True)


def append_text_atomically(path: Path, text: str) -> None:
    """Add ``text`` to the end of a small text file (a run's log), rewriting it whole."""
    try:
        before = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        before = ""
    write_text_atomically(path, before + text)


def write_json_atomically(path: Path, content: dict) -> None:
    """Write a small state file (JSON) whole or not at all, made durable."""
    write_text_atomically(path, json.dumps(content, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict | None:
    """A state file's content; None when it is missing or unreadable (logged)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.error("state file %s cannot be read (%s); ignored", path, error)
        return None
    if not isinstance(content, dict):
        logger.error("state file %s does not hold a JSON object; ignored", path)
        return None
    return content


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is a DICOM Part 10 file (preamble followed by ``DICM``)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def parse_run_name(name: str) -> tuple[str, int] | None:
    """``<study>`` -> (study, 1), ``<study>_<n>`` -> (study, n); None for anything else."""
    match = _RUN_NAME.match(name)
    if match is None or not is_valid_uid(match.group("uid")):
        return None
    return match.group("uid"), int(match.group("n") or 1)


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
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts"

    def create(self) -> None:
        for folder in (
            self.incoming,
            self.processing,
            self.outputs,
            self.outbox,
            self.done,
            self.failed,
            self.attempts,
        ):
            folder.mkdir(parents=True, exist_ok=True)

    def unused_run_name(self, study_uid: str) -> str:
        """``study_uid``, or ``study_uid_<n>`` when an earlier run of the same study left folders."""
        taken = (self.processing, self.outputs, self.outbox, self.done, self.failed)
        name, n = study_uid, 1
        while any((folder / name).exists() for folder in taken):
            n += 1
            name = f"{study_uid}_{n}"
        return name

    def earlier_runs(self, study_uid: str) -> list[Path]:
        """The finished or queued run folders of a study (done, failed, outbox), oldest first."""
        runs: list[tuple[int, Path]] = []
        for folder in (self.done, self.failed, self.outbox):
            for entry in folder.glob(f"{study_uid}*"):
                parsed = parse_run_name(entry.name)
                if parsed is not None and parsed[0] == study_uid and entry.is_dir():
                    runs.append((parsed[1], entry))
        return [path for _, path in sorted(runs)]


@dataclass(frozen=True)
class ClaimedStudy:
    """A study taken out of ``incoming/`` for processing.

    Args:
        study_uid: the StudyInstanceUID.
        run_name: ``<study>`` or ``<study>_<n>``, the name of its folders for this run.
        input_dir: ``processing/<run>``.
        instances: all instances the run sees (received now plus merged from an earlier run).
        received: the instances received since the earlier run (all of them for a first run).
        merged_from: the earlier run whose instances were merged in (None for a first run).
        merged_from_kept: whether that run still had its received instances (False when
            ``--keep-received`` had deleted them: only the new instances are analysed).
    """

    study_uid: str
    run_name: str
    input_dir: Path
    instances: int
    received: int = 0
    merged_from: str | None = None
    merged_from_kept: bool = True


@dataclass(frozen=True)
class StudyOutcome:
    """What happened to one study.

    Args:
        study_uid: the StudyInstanceUID.
        state: ``done`` (processed and delivered, or kept without a destination), ``failed``,
            ``queued`` (processed, or failed with a notice: the files wait in the outbox for the
            destination), ``retrying`` (processing failed and the study is queued for another
            attempt) or ``notified`` (a failed study's notice was delivered by a later attempt).
        folder: where the received instances now are.
        outputs: the DICOM files the app wrote (kept in ``outputs/<run>``); for a failed study, its
            "analysis not performed" notice when one was written.
        reason: why it failed or is waiting (None on success).
        seconds: processing plus sending time.
        run_name: the run's folder name.
    """

    study_uid: str
    state: OutcomeState
    folder: Path
    outputs: tuple[Path, ...] = ()
    reason: str | None = None
    seconds: float = 0.0
    run_name: str = ""

    @property
    def succeeded(self) -> bool:
        """Processed and (when a destination is set) delivered."""
        return self.state == "done"

    @property
    def final(self) -> bool:
        """Nothing more will happen to this run's study by itself (done, failed or notified)."""
        return self.state in ("done", "failed", "notified")


class AttemptLog:
    """Processing attempts per study, on disk (``attempts/<study>.json``).

    An attempt is counted before it starts, so one that kills the listener (an out-of-memory kill,
    a segfault in a native library, ``kill -9``) is counted too; the record is removed once the
    study is processed or given up.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, study_uid: str) -> Path:
        return path_inside(self.folder, f"{study_uid}.json")

    def count(self, study_uid: str) -> tuple[int, str | None]:
        """Attempts started so far and the last recorded error (None: none recorded)."""
        record = read_json(self._path(study_uid)) or {}
        attempts = record.get("attempts", 0)
        error = record.get("last_error")
        return (attempts if isinstance(attempts, int) else 0), (error if isinstance(error, str) else None)

    def begin(self, study_uid: str, run_name: str) -> int:
        """Count one more attempt (durably, before it starts); returns its number."""
        attempts, error = self.count(study_uid)
        self._write(study_uid, attempts + 1, error, run_name)
        return attempts + 1

    def record_error(self, study_uid: str, run_name: str, reason: str) -> None:
        """Keep why the latest attempt failed (for the log when the study is given up)."""
        attempts, _ = self.count(study_uid)
        self._write(study_uid, attempts, reason, run_name)

    def undo(self, study_uid: str, run_name: str) -> None:
        """Take back the latest attempt (abandoned by the operator, not the study's fault)."""
        attempts, error = self.count(study_uid)
        if attempts <= 1 and error is None:
            self.forget(study_uid)
        else:
            self._write(study_uid, max(attempts - 1, 0), error, run_name)

    def forget(self, study_uid: str) -> None:
        self._path(study_uid).unlink(missing_ok=True)

    def _write(self, study_uid: str, attempts: int, error: str | None, run_name: str) -> None:
        write_json_atomically(
            self._path(study_uid),
            {"study": study_uid, "run": run_name, "attempts": attempts, "last_error": error},
        )


@dataclass
class _Pending:
    #: None: recovered from an earlier run; the timer starts with :meth:`StudyCollector.start_timers`.
    last_received: float | None
    instances: int = 0


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the archive and the re-run share the bytes; both stay intact
    except OSError:
        shutil.copy2(source, target)


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
        """Pick up what an earlier run left: half-received studies and studies it was processing.

        Their stability timers start only with :meth:`start_timers`: loading the models can take
        longer than the timer, and a sender whose association the restart cut needs that time to
        send the rest before the study counts as complete.
        """
        for leftover in sorted(self.dirs.processing.iterdir()):
            parsed = parse_run_name(leftover.name)
            if not leftover.is_dir() or parsed is None:
                continue
            if (self.dirs.outbox / f"{leftover.name}.json").exists():
                # processed and queued for sending; the move into the outbox was cut short
                os.replace(leftover, self.dirs.outbox / leftover.name)
                continue
            target = self.dirs.incoming / parsed[0]
            target.mkdir(exist_ok=True)
            for instance in leftover.iterdir():
                os.replace(instance, target / instance.name)
            leftover.rmdir()
            # an interrupted attempt's results are incomplete and were never sent; removing them
            # also lets the next attempt reuse the run name
            shutil.rmtree(self.dirs.outputs / leftover.name, ignore_errors=True)
            logger.warning(
                "study %s was being processed when the listener stopped; queued again", target.name
            )
        for study in sorted(self.dirs.incoming.iterdir()):
            if not study.is_dir() or not is_valid_uid(study.name):
                continue
            for partial in study.glob(".*.tmp"):
                partial.unlink()
            count = sum(1 for _ in study.glob("*.dcm"))
            self._pending[study.name] = _Pending(last_received=None, instances=count)
            logger.info("study %s: %d instances from an earlier run are queued", study.name, count)

    def start_timers(self) -> None:
        """Start the stability timers of the studies recovered at start (once the app is ready)."""
        now = self._clock()
        with self._lock:
            for pending in self._pending.values():
                if pending.last_received is None:
                    pending.last_received = now

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
            write_bytes_atomically(target, encoded)
            pending = self._pending.setdefault(study_uid, _Pending(last_received=None))
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
                if pending.last_received is not None and now - pending.last_received >= self.stable_seconds
            ]
        return [uid for _, uid in sorted(quiet)]

    def claim(self, study_uid: str) -> ClaimedStudy:
        """Move a study from ``incoming/`` to ``processing/<run name>/``; later arrivals start anew.

        When the study was processed before, the instances of its latest earlier run are linked in
        beside the new ones (a re-sent instance replaces its earlier copy), so the run sees the
        whole study.
        """
        with self._lock:
            pending = self._pending.pop(study_uid)
            run_name = self.dirs.unused_run_name(study_uid)
            input_dir = self.dirs.processing / run_name
            os.replace(self.dirs.incoming / study_uid, input_dir)
        received = sum(1 for _ in input_dir.glob("*.dcm"))
        earlier = self.dirs.earlier_runs(study_uid)
        merged_from, merged_from_kept = None, True
        if earlier:
            merged_from = earlier[-1].name
            instances = list(earlier[-1].glob("*.dcm"))
            merged_from_kept = bool(instances)
            for instance in instances:
                if not (input_dir / instance.name).exists():
                    _link_or_copy(instance, input_dir / instance.name)
        total = sum(1 for _ in input_dir.glob("*.dcm"))
        if pending.instances != received:
            logger.debug("study %s: %d instances counted, %d on disk", study_uid, pending.instances, received)
        return ClaimedStudy(study_uid, run_name, input_dir, total, received, merged_from, merged_from_kept)

    def requeue(self, claimed: ClaimedStudy) -> None:
        """Give a study back to ``incoming/`` (merged with anything that arrived since)."""
        with self._lock:
            target = self.dirs.incoming / claimed.study_uid
            target.mkdir(exist_ok=True)
            moved = 0
            for instance in claimed.input_dir.iterdir():
                if (target / instance.name).exists():  # arrived again since: the newer copy wins
                    instance.unlink()
                else:
                    os.replace(instance, target / instance.name)
                    moved += 1
            claimed.input_dir.rmdir()
            pending = self._pending.setdefault(claimed.study_uid, _Pending(last_received=self._clock()))
            pending.instances += moved


class ReceivedRetention:
    """Deletes the received instances of finished runs (``done/``) ``keep_seconds`` after they finished.

    Each run filed in ``done/`` (delivered, kept without a destination, or superseded before it was
    sent) gets a record ``done/<run>.json`` when it gets there: the study, how it finished, when
    (wall-clock seconds, so the schedule survives restarts), the result files sent (relative to
    ``outputs/<run>/``, where the results stay) and the SOP Instance UIDs received. Once due, the
    instances in ``done/<run>/`` are deleted, the emptied folder stays (run names stay unique) and the
    record gets ``received_deleted_at``: the record, the results in ``outputs/<run>/`` and the log
    remain as the proof of what was received and delivered. ``failed/`` is never touched: failed
    studies are kept for inspection.

    A ``done/<run>/`` folder without a record (finished before retention was configured, or the
    listener was killed between the move and the record) is recorded at :meth:`recover` with the
    folder's modification time as its finishing time.

    Used by the dispatch thread only (not thread-safe).

    Args:
        dirs: the listener's folders.
        keep_seconds: how long the instances are kept after the run finished (0: deleted at the next
            :meth:`purge_due`; ``inf``: never).
        clock: wall-clock seconds (``time.time``; injectable for tests).
    """

    def __init__(self, dirs: WorkDirs, keep_seconds: float, clock: Callable[[], float] = time.time) -> None:
        if not keep_seconds >= 0:  # also refuses NaN
            raise ValueError(f"keep_seconds must be zero or positive, got {keep_seconds}")
        self.dirs = dirs
        self.keep_seconds = keep_seconds
        self._clock = clock
        self._due: dict[str, float] = {}

    def _record_path(self, run_name: str) -> Path:
        return path_inside(self.dirs.done, f"{run_name}.json")

    def record(
        self,
        run_name: str,
        study_uid: str,
        how: str,
        results: tuple[str, ...] = (),
        *,
        at: float | None = None,
    ) -> None:
        """Record that a run is in ``done/`` (how: ``delivered``, ``kept``, ``superseded`` ...)."""
        finished = self._clock() if at is None else at
        folder = self.dirs.done / run_name
        received = sorted(path.name[: -len(".dcm")] for path in folder.glob("*.dcm"))
        write_json_atomically(
            self._record_path(run_name),
            {
                "run_name": run_name,
                "study_uid": study_uid,
                "finished": how,
                "finished_at": finished,
                "results": list(results),
                "received_instances": received,
                "received_deleted_at": None,
            },
        )
        self._due[run_name] = finished + self.keep_seconds

    def recover(self) -> None:
        """Schedule the runs in ``done/`` whose instances are still kept (records from earlier runs)."""
        for folder in sorted(self.dirs.done.iterdir()):
            parsed = parse_run_name(folder.name)
            if parsed is None or not folder.is_dir():
                continue
            record = read_json(self._record_path(folder.name))
            if record is None:
                self.record(folder.name, parsed[0], "unrecorded", at=folder.stat().st_mtime)
                continue
            if record.get("received_deleted_at") is not None:
                continue
            finished = record.get("finished_at")
            if not isinstance(finished, (int, float)):
                finished = folder.stat().st_mtime
            self._due[folder.name] = float(finished) + self.keep_seconds

    def due(self) -> list[str]:
        """The runs whose instances are to be deleted now, the earliest due first."""
        now = self._clock()
        return [run for run, due in sorted(self._due.items(), key=lambda item: item[1]) if due <= now]

    def purge_due(self) -> list[str]:
        """Delete the received instances of every due run; returns the runs purged."""
        purged = []
        for run_name in self.due():
            try:
                self.purge(run_name)
            except OSError as error:  # a disk error: try again at the next poll, keep listening
                logger.error("the received instances of run %s cannot be deleted: %s", run_name, error)
                continue
            purged.append(run_name)
        return purged

    def purge(self, run_name: str) -> None:
        """Delete the received instances of one run in ``done/`` and note it in its record."""
        folder = self.dirs.done / run_name
        deleted = 0
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                deleted += 1
        record = read_json(self._record_path(run_name)) or {"run_name": run_name}
        record["received_deleted_at"] = self._clock()
        record["received_deleted"] = deleted
        write_json_atomically(self._record_path(run_name), record)
        del self._due[run_name]
        logger.info(
            "run %s: %d received instances deleted (%s after it was finished; the record is %s)",
            run_name,
            deleted,
            _hours(self.keep_seconds),
            self._record_path(run_name),
        )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"
