"""Result folders that are either complete or absent, even when the process is killed.

A series' outputs are written into a hidden staging folder beside their final place
(``.<name>.<random>.tmp``), which is renamed into place only when every writer succeeded. Results
already there are renamed aside first (``.<name>.<random>.old``), then the new folder is renamed in,
then the old one is deleted: a kill at any moment leaves the old results or the new ones, never
neither. :func:`recover_interrupted` tidies up after such a kill at the start of the next run.

Folders and files get the modes the process umask gives (typically 0755/0644), not the 0700 of
:func:`tempfile.mkdtemp`, so that a PACS gateway or a reader running as another user can read them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from scripts.atomic import process_umask

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"


def apply_umask(path: Path) -> None:
    """Give ``path`` and everything under it the modes a plain ``mkdir``/``open`` would have."""
    mask = process_umask()
    os.chmod(path, 0o777 & ~mask)
    for root, folders, files in os.walk(path):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def new_staging_folder(output_folder: Path, name: str) -> Path:
    """A fresh, empty staging folder for ``output_folder / name``, with umask modes."""
    output_folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_folder, prefix=f".{name}.", suffix=STAGING_SUFFIX))
    apply_umask(staging)
    return staging


def place_results(staging: Path, target: Path) -> None:
    """Move the complete ``staging`` folder to ``target``, replacing what is there without a gap.

    Args:
        staging: a folder from :func:`new_staging_folder` beside ``target``.
        target: the final folder; existing results there are replaced.
    """
    apply_umask(staging)
    if not target.exists():
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=ASIDE_SUFFIX))
    os.replace(target, aside)  # onto the empty folder: a rename on POSIX, so atomic
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def _result_name(hidden: Path, suffix: str) -> str:
    """``.<name>.<random><suffix>`` -> ``<name>`` (the random part that mkdtemp adds has no dot)."""
    return hidden.name[1 : -len(suffix)].rsplit(".", 1)[0]


def recover_interrupted(output_folder: Path, started_before: float) -> list[str]:
    """Undo what a killed run left in ``output_folder``; each action is logged.

    Staging folders (incomplete results) are removed. A folder renamed aside is put back when its
    replacement never arrived, and removed otherwise. Only entries last changed before
    ``started_before`` (a :func:`time.time` value) are touched, so the staging folders of a run that
    is still writing into the same folder are left alone.

    Returns:
        one line per action, as logged.
    """
    if not output_folder.is_dir():
        return []
    actions = []
    for entry in sorted(output_folder.glob(".*")):
        suffix = next((s for s in (STAGING_SUFFIX, ASIDE_SUFFIX) if entry.name.endswith(s)), None)
        if suffix is None or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            if entry.stat().st_mtime >= started_before:
                continue
            if suffix == STAGING_SUFFIX:
                shutil.rmtree(entry)
                actions.append(f"removed the incomplete results '{entry.name}' left by an interrupted run")
                continue
            target = output_folder / _result_name(entry, suffix)
            if target.exists():
                shutil.rmtree(entry)
                actions.append(f"removed '{entry.name}', results replaced by an interrupted run")
            else:
                os.replace(entry, target)
                actions.append(f"restored '{target.name}' from '{entry.name}' after an interrupted run")
        except OSError as error:
            actions.append(f"could not tidy '{entry.name}' after an interrupted run: {error.strerror}")
    for action in actions:
        logger.warning("%s: %s", output_folder, action)
    return actions
