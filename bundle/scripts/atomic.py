"""Writing a file whole or not at all: the one helper every writer of the project uses.

:func:`atomic_path` hands the writer a hidden temporary file beside the target and renames it over
the target (``os.replace``) only when the writer finished without an error, so a reader, or a run
after a crash, sees the old file, no file or the complete new one, never a half-written one. The
temporary file gets the mode a plain ``open()`` would give under the process umask (``mkstemp``'s
owner-only 0600 would make outputs unreadable to the other users of a shared folder).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def process_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``):
    setting it to read it would race with files other threads (the PACS listener's) create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under the process umask."""
    return 0o666 & ~process_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; rename it into place on success.

    Args:
        path: the target; missing parent folders are created.
        suffix: the temporary file's suffix (a writer that picks the format from the name, such as
            nibabel's ``.nii.gz``, needs the target's).
        durable: fsync the file before the rename (state files and results: a power loss must not
            leave them empty).

    Yields:
        the temporary file (it exists, empty; the writer replaces or fills it by name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(handle, umask_file_mode())
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        if durable:
            descriptor = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomically(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` whole or not at all (see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomically(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write UTF-8 ``text`` (no newline translation) to ``path`` whole or not at all."""
    return write_bytes_atomically(path, text.encode("utf-8"), durable=durable)
