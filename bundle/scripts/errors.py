"""User-facing errors: a mistake in the input gets one clear message, never a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


class UserInputError(ValueError):
    """An input the user can fix (a path, a CSV row, a seed). The message says what and how."""


def find_user_error(error: BaseException | None) -> UserInputError | None:
    """The :class:`UserInputError` behind ``error`` (MONAI and ignite wrap transform errors), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def user_message(error: UserInputError) -> str:
    """The message, without the traceback text a DataLoader worker folds into re-raised errors."""
    text = str(error)
    marker = f"{UserInputError.__name__}: "
    return text.rsplit(marker, 1)[-1].strip() if "Original Traceback" in text else text


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command-line entry point: a :class:`UserInputError` prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            logger.debug("user input error", exc_info=True)
            print(f"error: {user_message(user_error)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def _report_user_errors(
    exc_type: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    user_error = find_user_error(error)
    if user_error is None:
        _previous_excepthook(exc_type, error, traceback)
    else:
        print(f"error: {user_message(user_error)}", file=sys.stderr)


_previous_excepthook = sys.excepthook


def install_excepthook() -> None:
    """Show uncaught user mistakes as one ``error: ...`` line (e.g. under ``monai.bundle run``).

    Other exceptions keep the previous hook and their full traceback.
    """
    sys.excepthook = _report_user_errors
