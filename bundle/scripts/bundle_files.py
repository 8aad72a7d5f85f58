"""Where this bundle lives on disk, and how to copy it.

The bundle knows its own root: tools that stage a deployable bundle (cross-validation, the demo, the
MAP staging folder) copy it from here rather than guessing a path relative to themselves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding ``configs/``, ``scripts/``, ``docs/`` and ``models/``."""


def copy_bundle(
    destination: str | Path, bundle_root: str | Path = BUNDLE_ROOT, *, exist_ok: bool = False
) -> Path:
    """Copy the bundle's code, configs and docs (not its models or caches) into ``destination``.

    The copy is the skeleton of a deployable bundle: tools then add ``models/...`` to it.

    Args:
        destination: a new folder (or, with ``exist_ok``, an existing one, e.g. a staging folder).
        bundle_root: the bundle to copy.
        exist_ok: copy into an existing folder.
    """
    destination = Path(destination)
    shutil.copytree(
        Path(bundle_root),
        destination,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models", "eval", "logs", "runs", ".*"),
        dirs_exist_ok=exist_ok,
    )
    return destination
