"""Process memory: give freed heap pages back to the system, and read the peak resident size.

glibc keeps memory that a program frees inside its heap for later use; after freeing many tensors
or DICOM pixel buffers of a few MB each (copies of fold weights, a series' pixel data), holes of
hundreds of MB stay resident until ``malloc_trim`` returns their pages. Elsewhere (musl, macOS)
:func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> bool:
    """Return the free pages of the C heap to the system (glibc ``malloc_trim(0)``).

    Returns:
        whether anything could be asked of the allocator (False where it has no such call).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def peak_resident_bytes() -> int | None:
    """This process's peak resident set size (``VmHWM``), or None where /proc is missing.

    Unlike ``getrusage``'s ``ru_maxrss``, which a child process inherits from the parent that
    started it, ``VmHWM`` belongs to the process's own address space.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None
