"""DICOM UIDs that become file and folder names, checked before they touch the file system.

A UID arrives from whoever sent the data set, so ``..``, ``/etc`` or ``a/b`` are possible values.
Two checks guard every path built from a header value, in the app and in the PACS listener:

1. :func:`check_uid`: the value is a valid DICOM UID (pydicom's ``RE_VALID_UID``, matched in full:
   digits and dots, no leading zeros, at most 64 characters), so it cannot name a parent folder or
   a sub-folder. ``UID.is_valid`` itself is not used: ``UID()`` strips spaces and the pattern's ``$``
   accepts a trailing newline, so the value checked would not be the value used;
2. :func:`path_inside`: the resolved target lies directly inside its resolved root, in case a
   future caller forgets the first check.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import RE_VALID_UID

from scripts.errors import UserInputError

#: The UIDs of a received instance that name folders or files (study and series folders, files).
PATH_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

_SHOWN_CHARACTERS = 80


class InvalidUIDError(UserInputError):
    """A header value that must be a DICOM UID is not one.

    Args:
        keyword: the attribute, e.g. ``SeriesInstanceUID``.
        value: what the data set holds (None when the attribute is missing).
        where: who holds it, e.g. ``series 3 'Chest' instance 12`` (no patient data).
    """

    def __init__(self, keyword: str, value: object, where: str) -> None:
        self.keyword = keyword
        self.value = value
        shown = "missing" if value is None else shown_value(value)
        super().__init__(
            f"{where}: {keyword} is {shown}, not a valid DICOM UID (digits and dots, at most 64 "
            "characters); it names files and folders, so the data set is refused. Fix the sending "
            "system or the exported files."
        )


def short_text(value: object) -> str:
    """``str(value)``, cut to a length a log line can hold (the full length is said)."""
    text = str(value)
    if len(text) <= _SHOWN_CHARACTERS:
        return text
    return f"{text[:_SHOWN_CHARACTERS]}... ({len(text)} characters)"


def shown_value(value: object) -> str:
    """``repr`` of a hostile header value, cut to a length a log line can hold."""
    text = repr(str(value))
    return (
        text
        if len(text) <= _SHOWN_CHARACTERS
        else f"{text[:_SHOWN_CHARACTERS]}... ({len(str(value))} characters)"
    )


def is_valid_uid(value: object) -> bool:
    """True for a valid DICOM UID, which is safe as one file or folder name."""
    return isinstance(value, str) and len(value) <= 64 and RE_VALID_UID.fullmatch(value) is not None


def check_uid(value: object, keyword: str, where: str) -> str:
    """``value`` as a string when it is a valid DICOM UID.

    Args:
        value: the header value (a ``str``/``UID``, or None when missing).
        keyword: the attribute named in the error.
        where: who holds it, named in the error.

    Raises:
        InvalidUIDError: missing, empty, too long, or not digits and dots.
    """
    if not is_valid_uid(value):
        raise InvalidUIDError(keyword, value, where)
    return str(value)


def path_inside(root: Path, name: str) -> Path:
    """``root / name`` after checking that it resolves to an entry directly inside ``root``.

    Raises:
        UserInputError: ``name`` would leave ``root`` or name a sub-folder.
    """
    resolved_root = root.resolve()
    target = (root / name).resolve()
    if target.parent != resolved_root or name in ("", ".", ".."):
        raise UserInputError(f"{shown_value(name)} would not lie directly inside '{root}'; refused")
    return root / name
