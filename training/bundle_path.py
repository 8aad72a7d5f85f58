"""Put the bundle root on ``sys.path`` so ``scripts.*`` imports resolve, as ``monai.bundle`` does."""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"


def use_bundle(bundle_root: str | Path = BUNDLE_ROOT) -> Path:
    """Make ``scripts.*`` of ``bundle_root`` importable; returns the resolved root."""
    root = Path(bundle_root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
