"""Shared test set-up: the bundle root on ``sys.path`` (as ``monai.bundle`` does) and no hub access."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
#: Test data kept in the repository (see tests/data/README.md); tests read nothing outside it.
TEST_DATA = REPO_ROOT / "tests" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: As in the Makefile: with CI=true (1, yes) a missing test tool fails instead of skipping.
CI_STRICT = os.environ.get("CI", "").lower() in {"true", "1", "yes"}


def require_tool(name: str) -> str:
    """Path of a Debian test tool (dciodvfy, dsrdump, Orthanc ...): skipped locally, failed under CI."""
    path = shutil.which(name)
    if path is None:
        if CI_STRICT:
            pytest.fail(f"{name} is missing and CI is set (make tools installs dicom3tools, dcmtk, orthanc)")
        pytest.skip(f"{name} is not installed (as root: make tools)")
    return path
