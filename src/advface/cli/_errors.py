"""How every command reports bad input: ``error: <message>`` on stderr and a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

# The library raises these for bad input (wrong values, missing files, occupied outputs).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


@contextmanager
def user_errors(code: int = 2) -> Iterator[None]:
    """Turn a user error raised inside the block into a message and exit status ``code``."""
    try:
        yield
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code) from exc
