"""DICOM file input/output shared by the deploy app's writers and readers.

Every DICOM object the app writes goes through :func:`write_dataset`: the file is written under a
temporary name in the destination folder and renamed when complete, so a crash or a full disk never
leaves a half-written file where a PACS forwarder or a user would pick it up.
:func:`iter_dicom_headers` walks an input folder and skips anything that is not DICOM.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, VR

from scripts.atomic import atomic_path

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


def _declare_explicit_little_endian(ds: pydicom.Dataset) -> bool:
    """Mark the in-memory items of ``ds`` that need no VR correction as explicit VR little endian.

    pydicom re-runs its ambiguous-VR correction on every nested item of a dataset built in memory
    (once per nesting level: most of the time it takes to write an SR of thousands of content items).
    The correction changes nothing in an item without an ambiguous VR ('US or SS', 'OB or OW' ...) or
    an unparsed element, so such items are declared as already encoded the way they will be written;
    the bytes written are the same. Returns whether ``ds`` and everything below it was so declared.
    """
    unambiguous = True
    for element in ds.elements():
        if not isinstance(element, DataElement) or element.VR in AMBIGUOUS_VR:
            unambiguous = False
        elif element.VR == VR.SQ:
            for item in element.value:
                unambiguous = _declare_explicit_little_endian(item) and unambiguous
    if unambiguous and ds.original_encoding == (None, None):
        ds.set_original_encoding(False, True, ds._character_set)
    return unambiguous


def prepare_for_writing(ds: pydicom.Dataset) -> None:
    """What :func:`write_dataset` does to ``ds`` before pydicom encodes it: the file meta, and the
    explicit VR little endian declaration of its in-memory items (same bytes, written faster)."""
    _ensure_file_meta(ds)
    if ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
        _declare_explicit_little_endian(ds)


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
    prepare_for_writing(ds)
    with atomic_path(path, durable=True) as temporary:
        ds.save_as(temporary, enforce_file_format=True)
    return path


def iter_dicom_headers(
    folder: str | Path,
    specific_tags: Sequence[str] | None = None,
    sop_classes: Collection[str] | None = None,
) -> Iterator[tuple[Path, pydicom.Dataset]]:
    """Yield ``(path, header)`` for every DICOM file below ``folder``, in sorted path order.

    Files that are not DICOM (README files, CSV, JSON, images, hidden temporary files of an
    interrupted copy) are skipped silently; a DICOM file that cannot be parsed is skipped with a
    warning naming it.

    Args:
        folder: the folder to walk (recursively).
        specific_tags: read only these attributes (keywords), e.g. ``["SOPClassUID",
            "StudyInstanceUID"]``, to classify many files quickly; ``None`` reads the whole header.
        sop_classes: yield only instances of these SOP classes. The class is taken from the file
            meta (MediaStorageSOPClassUID), so the hundreds of CT slices beside an SR are passed
            over without parsing their datasets, and checked against the dataset's SOPClassUID.

    Yields:
        The path and its header (pixel data is never read).
    """
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        try:
            if sop_classes is not None and _file_meta_sop_class(path) not in (None, *sop_classes):
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific_tags)
        except InvalidDicomError:
            continue
        except Exception as error:  # a truncated or corrupt DICOM file: report it, keep going
            logger.warning("skipping %s: not a readable DICOM file (%s)", path, error)
            continue
        if sop_classes is not None and str(header.get("SOPClassUID", "")) not in sop_classes:
            continue
        yield path, header


def _file_meta_sop_class(path: Path) -> str | None:
    """MediaStorageSOPClassUID of a Part 10 file (None when its file meta does not say)."""
    sop_class = read_file_meta_info(path).get("MediaStorageSOPClassUID")
    return str(sop_class) if sop_class else None
