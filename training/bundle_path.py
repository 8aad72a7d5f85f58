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


def copy_bundle(destination: str | Path, bundle_root: str | Path = BUNDLE_ROOT) -> Path:
    """Copy the bundle's code, configs and docs (not its models or caches) into a new ``destination``.

    The copy is the skeleton of a deployable bundle: tools then add ``models/...`` to it.
    """
    destination = Path(destination)
    shutil.copytree(
        Path(bundle_root),
        destination,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "models", "eval", "logs", ".*"),
    )
    return destination
