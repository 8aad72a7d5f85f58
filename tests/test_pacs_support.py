"""Shared pieces of the PACS listener tests, and a launcher for the listener with a stand-in processor.

Imported by the ``test_pacs_*`` modules (it holds no tests itself). Run as a script it is the
listener's command line with the app replaced by :func:`standin_processor`, for the tests that
kill the listener process (``python tests/test_pacs_support.py --model X --work-dir W ...``); the
stand-in is reachable only through :func:`deploy_app.pacs.main`'s ``make_processor`` argument,
which the command line cannot set.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

if __name__ == "__main__":  # as a script: the repository and the bundle on sys.path, as conftest does
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "bundle")]

from deploy_app.pacs_store import is_dicom_file

#: Set to a file path: the stand-in processor waits while that file exists (to kill it mid-way).
HOLD_ENV = "LNSC_TEST_PROCESSING_HOLD"
#: Set to a folder: the stand-in processor writes ``<run>.started`` there when it starts.
MARK_ENV = "LNSC_TEST_PROCESSING_MARKS"
#: Set to a StudyInstanceUID: processing that study kills the process (SIGKILL), as a poison study would.
POISON_ENV = "LNSC_TEST_POISON_STUDY"


class FakeClock:
    """A clock that moves only when told (monotonic or wall-clock seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingProcessor:
    """Writes one small result file per study; can be told to fail (always or the first times).

    Args:
        error: raised by every call (or the first ``failures`` calls).
        failures: how many calls raise ``error`` (None: all).
    """

    def __init__(self, error: BaseException | None = None, failures: int | None = None) -> None:
        self.error = error
        self.failures = failures
        self.calls: list[tuple[Path, list[str]]] = []

    def __call__(self, input_dir: Path, output_dir: Path) -> list[Path]:
        self.calls.append((input_dir, sorted(p.name for p in input_dir.iterdir())))
        if self.error is not None and (self.failures is None or len(self.calls) <= self.failures):
            raise self.error
        result = output_dir / "sr.dcm"
        result.write_bytes(b"\0" * 128 + b"DICM" + b"result of " + input_dir.name.encode())
        return [result]


class FlakySender:
    """A sender that fails while ``down`` is set and records what it delivered."""

    def __init__(self, down: bool = True) -> None:
        self.down = down
        self.attempts = 0
        self.delivered: list[tuple[str, ...]] = []

    def __call__(self, files) -> None:
        from deploy_app.pacs_net import SendError

        self.attempts += 1
        if self.down:
            raise SendError("PACS@127.0.0.1:104: could not open an association (refused)")
        self.delivered.append(tuple(Path(f).read_bytes().decode(errors="replace") for f in files))


def instance_digest(sop_instance_uids: list[str]) -> str:
    """What the stand-in result carries to say which instances it was made from."""
    return hashlib.sha256("\n".join(sorted(sop_instance_uids)).encode()).hexdigest()[:32]


def standin_processor(input_dir: Path, output_dir: Path) -> list[Path]:
    """One small DICOM result per study: a copy of the first instance as a new series.

    Refuses a folder that mixes studies; the result's ImageComments hold
    :func:`instance_digest` of the instances seen, so a test can tell which instances it came from.
    """
    marks = os.environ.get(MARK_ENV)
    if marks:
        (Path(marks) / f"{input_dir.name}.started").touch()
    if os.environ.get(POISON_ENV) and input_dir.name.split("_")[0] == os.environ[POISON_ENV]:
        os.kill(os.getpid(), signal.SIGKILL)
    hold = os.environ.get(HOLD_ENV)
    while hold and Path(hold).exists():  # the kill test kills the process here
        time.sleep(0.02)
    files = sorted(path for path in input_dir.iterdir() if is_dicom_file(path))
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    studies = {str(header.StudyInstanceUID) for header in headers}
    if len(studies) != 1:
        raise RuntimeError(f"{len(studies)} studies in one folder")
    result = pydicom.dcmread(files[0])
    result.SeriesInstanceUID = generate_uid()
    result.SOPInstanceUID = generate_uid()
    result.file_meta.MediaStorageSOPInstanceUID = result.SOPInstanceUID
    result.SeriesDescription = "stand-in result"
    result.ImageComments = instance_digest([str(header.SOPInstanceUID) for header in headers])
    target = output_dir / "result.dcm"
    result.save_as(target)
    return [target]


if __name__ == "__main__":
    from deploy_app import pacs

    raise SystemExit(pacs.main(sys.argv[1:], make_processor=lambda model: standin_processor))
