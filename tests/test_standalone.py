"""The repository stands alone: a copy of it with nothing beside it collects the same tests.

The working tree's files that git would commit (tracked, plus untracked but not ignored: what a
clone would hold once committed) are copied into a deep temporary folder that has no siblings, and
``pytest --collect-only`` runs there and in the repository at the same time. Both must collect the
same test ids without errors, and no file of the copy may point at a folder outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

#: Built from pieces so that this file does not contain what it looks for.
FORBIDDEN = tuple(
    text.encode()
    for text in (
        ".." + "/shared",
        "/work" + "/shared",
        "PAPER" + "_FACTS",
        "SEMANTIC" + "_SCHEMA.md",
        "DESIGN" + ".md",
        "REFERENCE" + "_CHECKPOINT.json",
    )
)
COLLECT_TIMEOUT_S = 300


def committable_files(root: Path) -> list[str]:
    """Paths (relative to ``root``) that git tracks or would add, existing in the working tree."""
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git working tree")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({name for name in listing.split("\0") if name and (root / name).is_file()})


def python() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def start_collection(root: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.Popen(
        [python(), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def collected(process: subprocess.Popen, where: str) -> list[str]:
    """The test ids a ``--collect-only -q`` run printed; fails on errors."""
    try:
        out, err = process.communicate(timeout=COLLECT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"collection in {where} took over {COLLECT_TIMEOUT_S} s")
    lines = out.splitlines()
    summary = next((line for line in reversed(lines) if line.strip()), "")
    assert process.returncode == 0 and "error" not in summary.lower(), (
        f"collection in {where} failed (exit {process.returncode}):\n{out[-6000:]}\n{err[-3000:]}"
    )
    return [line for line in lines if "::" in line]


@pytest.fixture(scope="module")
def standalone_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("standalone") / "deep" / "folder" / "repository"
    for name in committable_files(REPO_ROOT):
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target, follow_symlinks=False)
    assert sorted(path.name for path in copy.parent.iterdir()) == ["repository"]
    return copy


@pytest.mark.slow
def test_the_copy_collects_the_same_tests_without_errors(standalone_copy: Path) -> None:
    in_copy, in_repository = start_collection(standalone_copy), start_collection(REPO_ROOT)
    copy_ids, repository_ids = collected(in_copy, "the copy"), collected(in_repository, "the repository")
    assert len(copy_ids) > 500
    missing = sorted(set(repository_ids) - set(copy_ids))
    extra = sorted(set(copy_ids) - set(repository_ids))
    assert not missing and not extra, f"only in the repository: {missing[:20]}; in the copy: {extra[:20]}"
    assert len(copy_ids) == len(repository_ids)


def test_no_file_points_outside_the_repository(standalone_copy: Path) -> None:
    offending = []
    for path in sorted(standalone_copy.rglob("*")):
        if path.is_file():
            content, name = path.read_bytes(), path.relative_to(standalone_copy)
            offending += [f"{name}: {text.decode()}" for text in FORBIDDEN if text in content]
    assert not offending, "\n".join(offending)


def test_the_test_data_is_in_the_copy(standalone_copy: Path) -> None:
    data = standalone_copy / "tests" / "data"
    for name in (
        "README.md",
        "semantic_schema.json",
        "authors_planes/README.md",
        "authors_planes/ct.nii.gz",
        "authors_planes/nodules.csv",
        "authors_planes/planes_900001_0.npz",
        "authors_planes/planes_900001_1.npz",
        "../../training/data/reference_checkpoint.json",
    ):
        assert (data / name).is_file(), name
