"""Write a new output folder all or nothing: build it under a temporary name, then rename it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scripts.errors import UserInputError


@contextmanager
def new_output_folder(out_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``out_dir`` to fill; it becomes ``out_dir`` when the block
    succeeds and is deleted when it fails, so no half-written folder is ever left.

    Raises:
        UserInputError: ``out_dir`` exists already.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise UserInputError(f"{out_dir} already exists; remove it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes an owner-only folder
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
