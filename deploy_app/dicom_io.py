"""DICOM file input/output shared by the deploy app's writers and readers.

Every DICOM object the app writes goes through :func:`write_dataset`: the file is written under a
temporary name in the destination folder and renamed when complete, so a crash or a full disk never
leaves a half-written file where a PACS forwarder or a user would pick it up.
:func:`iter_dicom_headers` walks an input folder and skips anything that is not DICOM.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

logger = logging.getLogger(__name__)


def _ensure_file_meta(ds: pydicom.Dataset) -> None:
    """Give ``ds`` the file meta elements a Part 10 file needs (kept when already present)."""
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta


def write_dataset(ds: pydicom.Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, atomically.

    The bytes go to a temporary file in the destination folder, are flushed to disk, and the file is
    then renamed over ``path`` (``os.replace``), so readers see either the old file, no file, or the
    complete new one. Missing parent folders are created.

    Args:
        ds: the dataset (a highdicom SOP instance or any pydicom dataset with SOP Class/Instance UIDs).
        path: destination file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _ensure_file_meta(ds)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make the file owner-only)
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            ds.save_as(stream, enforce_file_format=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def iter_dicom_headers(
    folder: str | Path, specific_tags: Sequence[str] | None = None
) -> Iterator[tuple[Path, pydicom.Dataset]]:
    """Yield ``(path, header)`` for every DICOM file below ``folder``, in sorted path order.

    Files that are not DICOM (README files, CSV, JSON, images, hidden temporary files of an
    interrupted copy) are skipped silently; a DICOM file that cannot be parsed is skipped with a
    warning naming it.

    Args:
        folder: the folder to walk (recursively).
        specific_tags: read only these attributes (keywords), e.g. ``["SOPClassUID",
            "StudyInstanceUID"]``, to classify many files quickly; ``None`` reads the whole header.

    Yields:
        The path and its header (pixel data is never read).
    """
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific_tags)
        except InvalidDicomError:
            continue
        except Exception as error:  # a truncated or corrupt DICOM file: report it, keep going
            logger.warning("skipping %s: not a readable DICOM file (%s)", path, error)
            continue
        yield path, header
