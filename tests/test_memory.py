"""scripts.memory: returning freed heap pages, and the peak resident size of a process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import scripts.memory as memory
from conftest import BUNDLE_ROOT

MB = 1 << 20


def _run_child(code: str) -> int:
    code = f"import sys; sys.path.insert(0, {str(BUNDLE_ROOT)!r})\n" + code
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(result.stdout)


def _child_peak(allocate_mb: int) -> int:
    return _run_child(
        "from scripts.memory import peak_resident_bytes\n"
        f"block = bytearray({allocate_mb} * (1 << 20))  # zero-filled: every page touched\n"
        "print(peak_resident_bytes())\n"
    )


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux's")
def test_peak_resident_size_is_the_processs_own() -> None:
    # the children start from this large pytest process, yet each reports only its own peak
    assert _child_peak(0) < 200 * MB
    assert _child_peak(300) >= 300 * MB


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_is_given_back_with_glibc() -> None:
    released = _run_child(
        "import os\n"
        "from scripts.memory import release_freed_memory\n"
        "def resident():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "blocks = [bytearray(64 << 10) for _ in range(1024)]  # 64 MB below the mmap threshold: heap\n"
        "pin = bytearray(64 << 10)  # above them, so freeing them leaves a hole, not a shorter heap\n"
        "del blocks\n"
        "before = resident()\n"
        "assert release_freed_memory()\n"
        "print(before - resident())\n"
    )
    assert released >= 48 * MB


def test_without_malloc_trim_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False
