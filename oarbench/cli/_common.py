"""Helpers shared by the CLI commands: error reporting and console output."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn the library's ``ValueError``/``FileNotFoundError`` into a clean CLI error.

    The message (which names the file and the problem) goes to stderr and the
    exit code is 1 (click's ClickException); tracebacks are kept for bugs.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
