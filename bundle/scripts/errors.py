"""User-facing errors: a mistake in the input gets one clear message, never a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserInputError(ValueError):
    """An input the user can fix (a path, a CSV row, a seed). The message says what and how."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command-line entry point: a :class:`UserInputError` prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return main(*args, **kwargs)
        except UserInputError as error:
            logging.getLogger("lung_nodule_ct_semantic_clip").debug("user input error", exc_info=True)
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
