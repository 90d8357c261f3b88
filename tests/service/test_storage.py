"""Storage hardening: private database files, no SQL parameters in errors."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from advface.service.store import Store

from .conftest import cli_key


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_database_files_and_key_store_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "service.db"
        cli_key(f"sqlite:///{path}")  # the key store is created by `advface keys create`
        store = Store(f"sqlite:///{path}")
        store.create_subject(1, "someone")  # a write: -wal and -shm exist now
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert _mode(path.parent) == 0o700
        store.close()
        # A database left world-readable by an earlier version is tightened on open.
        old_db = tmp_path / "old.db"
        sqlite3.connect(old_db).close()
        old_db.chmod(0o644)
        Store(f"sqlite:///{old_db}").close()
        assert _mode(old_db) == 0o600
    finally:
        os.umask(old)


def test_sql_parameters_are_hidden_from_database_errors(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    with store.engine.connect() as conn, pytest.raises(OperationalError) as e:
        from sqlalchemy import text

        conn.execute(text("SELECT * FROM no_such_table WHERE x = :x"), {"x": "private-param"})
    assert "private-param" not in str(e.value)
    store.close()
