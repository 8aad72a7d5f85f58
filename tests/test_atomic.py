"""scripts.atomic: a file is written whole or not at all, with the umask's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from scripts.atomic import atomic_path, process_umask, write_text_atomically


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_the_file_replaces_the_old_one_with_the_umask_mode(tmp_path: Path, durable: bool) -> None:
    previous = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        path = write_text_atomically(tmp_path / "new" / "report.txt", "d\u00e9j\u00e0\n", durable=durable)
    finally:
        os.umask(previous)
    assert path.read_bytes() == "d\u00e9j\u00e0\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["report.txt"]


def test_the_temporary_keeps_the_target_suffix_when_asked(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "ct.nii.gz", suffix=".nii.gz") as temporary:
        assert temporary.name.endswith(".nii.gz") and temporary.name.startswith(".ct.nii.gz.")
        temporary.write_bytes(b"x")
    assert (tmp_path / "ct.nii.gz").read_bytes() == b"x"
