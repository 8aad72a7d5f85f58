"""``python -m deploy_app.map_stage OUT``: an application folder ready for ``monai-deploy package``.

The packager takes one folder with a ``__main__.py`` and a ``requirements.txt``. The app imports the
bundle's code (``bundle/scripts``, put on ``sys.path`` by ``deploy_app/__init__.py``), so the folder
gets the app, the bundle (code, configs, docs; no models: those come with ``--models``) and the
project's pinned requirements. It holds no ``training/`` code: the app never imports it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from scripts.bundle_files import copy_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = '''"""MAP entry point: the deploy app's command line (see deploy_app/__main__.py)."""

import sys

from deploy_app.__main__ import main

sys.exit(main())
'''


def stage(destination: str | Path) -> Path:
    """Write the application folder ``destination`` (must not exist)."""
    destination = Path(destination)
    if destination.exists():
        raise FileExistsError(f"'{destination}' exists; choose a new folder")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    destination.mkdir(parents=True)
    shutil.copytree(REPO_ROOT / "deploy_app", destination / "deploy_app", ignore=ignore)
    copy_bundle(destination / "bundle")
    shutil.copyfile(REPO_ROOT / "requirements.txt", destination / "requirements.txt")
    (destination / "__main__.py").write_text(ENTRY_POINT)
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy_app.map_stage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out", type=Path, help="new folder to write")
    args = parser.parse_args(argv)
    try:
        folder = stage(args.out)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"application folder: {folder}")
    print(
        f"package it with: monai-deploy package {folder} --config {folder}/deploy_app/app.yaml "
        "--tag lnsc-clip:0.1.0 --models BUNDLE_FOLDER --platform x86_64"
    )


if __name__ == "__main__":
    main()
