"""Locations the library reads and writes: data root and cache directory."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "ADVFACE_DATA_ROOT"
CACHE_DIR_ENV = "ADVFACE_CACHE_DIR"


def data_root(explicit: str | Path | None = None, *, must_exist: bool = True) -> Path:
    """Return the dataset root: ``explicit``, else ``$ADVFACE_DATA_ROOT``.

    Raises ``FileNotFoundError`` with a hint when neither is set or the folder is missing.
    """
    value = explicit if explicit is not None else os.environ.get(DATA_ROOT_ENV)
    if not value:
        raise FileNotFoundError(
            f"no data root: pass --data-root or set {DATA_ROOT_ENV} "
            "(a folder holding lfw/, cfp/, celeba/)"
        )
    root = Path(value).expanduser().resolve()
    if must_exist and not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    return root


def cache_dir(explicit: str | Path | None = None) -> Path:
    """Return (and create) the cache directory: ``explicit``, ``$ADVFACE_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/advface`` (``~/.cache/advface``)."""
    value = explicit if explicit is not None else os.environ.get(CACHE_DIR_ENV)
    if value:
        root = Path(value).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "advface"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()
