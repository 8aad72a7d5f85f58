"""Put the bundle root on ``sys.path`` so ``scripts.*`` imports resolve, as ``monai.bundle`` does."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"


def use_bundle(bundle_root: str | Path = BUNDLE_ROOT) -> Path:
    """Make ``scripts.*`` of ``bundle_root`` importable; returns the resolved root."""
    root = Path(bundle_root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


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
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models", "eval", "logs", ".*"),
        dirs_exist_ok=exist_ok,
    )
    return destination
