"""Database URLs and engines: the psycopg driver for PostgreSQL URLs, the file behind a SQLite
URL (created private to its owner) and engines configured for durability."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url


def normalise_url(url: str) -> str:
    """Use the psycopg (v3) driver for plain ``postgresql://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; ``None`` for other databases and in-memory SQLite."""
    u = make_url(normalise_url(url))
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    if u.database.startswith("file:"):
        return None  # URI filenames: SQLite parses them itself
    return Path(u.database)


def make_private_sqlite(path: Path) -> None:
    """Create the database file (and its folder) readable by the owner only.

    It holds the API key digests and the protected templates. SQLite creates the ``-wal`` and
    ``-shm`` files with the main file's mode, so 0600 here makes all three 0600; files left
    with a wider mode by an earlier version are tightened.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if f.exists() and f.stat().st_mode & 0o077:
            f.chmod(0o600)


def make_engine(url: str, timeout: float = 10.0) -> Engine:
    """Create an engine; SQLite gets WAL, synchronous=FULL, foreign keys and a busy timeout.

    ``timeout``: seconds to wait for a locked SQLite file or a PostgreSQL connection. SQL
    parameters are hidden from errors, so no subject id or key digest reaches a log.
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            make_private_sqlite(path)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": timeout},
            hide_parameters=True,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit is fsynced, so an acknowledged enrollment survives power loss.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            # Deleted rows are overwritten with zeros, not left in free pages (a deleted
            # subject's wrapped key must not survive in the file).
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,  # a dropped connection is replaced instead of failing a request
        pool_size=5,
        max_overflow=5,
        pool_timeout=timeout,
        hide_parameters=True,
        connect_args={"connect_timeout": max(1, round(timeout))},
    )
