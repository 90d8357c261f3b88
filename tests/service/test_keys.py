"""``advface keys list`` / ``revoke``: ids and state only, and a revoked key gets 401."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.service.backend import Backend

from .conftest import assert_error, cli_key


def test_keys_list_and_revoke(tmp_path: Path, toy: Backend) -> None:
    from fastapi.testclient import TestClient

    from advface.service.app import create_app
    from advface.service.settings import ServiceSettings

    db_url = f"sqlite:///{tmp_path / 'keys.db'}"
    k1, k2 = cli_key(db_url, "acme"), cli_key(db_url, "globex")
    run = CliRunner().invoke
    r = run(cli_app, ["keys", "list", "--db-url", db_url])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    assert [(x["key_id"], x["tenant"], x["revoked"]) for x in rows] == [
        (k1.split("_")[1], "acme", False),
        (k2.split("_")[1], "globex", False),
    ]
    assert all(x["created_at"] for x in rows)
    for secret in (k1.split("_", 2)[2], k2.split("_", 2)[2]):
        assert secret not in r.output
    r = run(cli_app, ["keys", "revoke", rows[0]["key_id"], "--db-url", db_url])
    assert r.exit_code == 0, r.output
    r = run(cli_app, ["keys", "list", "--db-url", db_url])
    assert [json.loads(line)["revoked"] for line in r.output.strip().splitlines()] == [True, False]
    assert run(cli_app, ["keys", "revoke", "0" * 12, "--db-url", db_url]).exit_code == 2
    assert run(cli_app, ["keys", "revoke", k2, "--db-url", db_url]).exit_code == 2  # a token
    app = create_app(
        ServiceSettings(db_url=db_url, backend="toy"), backend=toy, rebuild_in_background=False
    )
    with TestClient(app) as c:
        assert_error(c.get("/v1/subjects", headers={"X-API-Key": k1}), 401, "invalid_api_key")
        assert c.get("/v1/subjects", headers={"X-API-Key": k2}).status_code == 200
    app.state.service.store.close()


def test_commands_on_an_existing_database_refuse_a_missing_one(tmp_path: Path) -> None:
    """A mistyped --db-url is an error that creates nothing (no empty database, no folder)."""
    missing = tmp_path / "typo" / "svc.db"
    url = f"sqlite:///{missing}"
    key_file = tmp_path / "new.key"
    run = CliRunner().invoke
    for args in (
        ["keys", "list"],
        ["keys", "revoke", "0" * 12],
        ["keys", "rekey-tenant", "acme"],
        ["keys", "rotate-master", "--new-key-file", str(key_file)],
        ["reembed", "--backend", "toy"],
        ["migrate", "--protection", "none", "--backend", "toy"],
    ):
        r = run(cli_app, [*args, "--db-url", url])
        assert r.exit_code == 2 and "no database at" in r.output, (args, r.output)
    assert not missing.parent.exists() and not key_file.exists()
    r = run(cli_app, ["keys", "create", "acme", "--db-url", url])  # a new deployment's first key
    assert r.exit_code == 0 and "creating a new database" in r.output and missing.is_file()


def test_rotate_master_without_a_current_key_writes_no_new_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))  # no default master.key
    monkeypatch.delenv("ADVFACE_MASTER_KEY", raising=False)
    monkeypatch.delenv("ADVFACE_MASTER_KEY_FILE", raising=False)
    url = f"sqlite:///{tmp_path / 'svc.db'}"
    cli_key(url)
    key_file = tmp_path / "new.key"
    r = CliRunner().invoke(
        cli_app, ["keys", "rotate-master", "--new-key-file", str(key_file), "--db-url", url]
    )
    assert r.exit_code == 2 and "no current master key" in r.output, r.output
    assert not key_file.exists()


def test_a_database_that_cannot_be_opened_is_an_error(tmp_path: Path) -> None:
    """A URL SQLAlchemy cannot parse, an unreachable server or a file that is no database:
    ``error: cannot open database <url without password>: ...`` and exit 2, nothing created."""
    import importlib.util

    not_db = tmp_path / "notes.db"
    not_db.write_text("not a database")
    urls = {
        "foo": "Could not parse SQLAlchemy URL",
        "nosuch://h/x": "Can't load plugin",
        "postgresql://u:secret@127.0.0.1:1/x": "connection",  # nothing listens on port 1
        "postgresql://u:secret@h:port/x": "invalid literal",
        f"sqlite:///{not_db}": "file is not a database",
    }
    if importlib.util.find_spec("MySQLdb") is None:
        urls["mysql://u:secret@h/x"] = "driver is not installed"
    run = CliRunner().invoke
    for url, reason in urls.items():
        for args in (
            ["keys", "list"],
            ["keys", "create", "acme"],
            ["keys", "revoke", "0" * 12],
            ["keys", "rekey-tenant", "acme"],
            ["keys", "rotate-master", "--new-key-file", str(tmp_path / "new.key")],
            ["reembed", "--backend", "toy"],
            ["migrate", "--protection", "none", "--backend", "toy"],
            ["serve", "--backend", "toy"],
        ):
            if args[0] == "keys" and args[1] == "rotate-master":
                args = [*args, "--master-key-file", str(_key_file(tmp_path))]
            r = run(cli_app, [*args, "--db-url", url])
            assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (url, args, r.output)
            assert "error: cannot open database" in r.output and reason in r.output, (url, args)
            assert "secret" not in r.output and "Traceback" not in r.output, r.output
    # No database, no new key file; the cache folder holds no master key from serve either.
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"master.key", "notes.db"}
    assert not (tmp_path / "cache" / "master.key").exists()


def _key_file(folder: Path) -> Path:
    from advface.service import crypto

    path = folder / "master.key"
    if not path.exists():
        crypto.write_key_file(path)
    return path


def test_keys_create_checks_the_name_before_creating_a_database(tmp_path: Path) -> None:
    db = tmp_path / "svc.db"
    r = CliRunner().invoke(cli_app, ["keys", "create", "", "--db-url", f"sqlite:///{db}"])
    assert r.exit_code == 2 and "error: tenant name must be 1..128 characters" in r.output
    assert not db.exists()


def test_a_database_error_during_a_command_is_an_error_not_a_traceback(
    tmp_path: Path, monkeypatch
) -> None:
    """The database fails after it opened (locked, full, connection lost): ``error: database
    <url>: reason``, exit 1, and the store is closed."""
    from sqlalchemy.exc import OperationalError

    from advface.service.store import Store

    db_url = f"sqlite:///{tmp_path / 'keys.db'}"
    cli_key(db_url, "acme")
    closed = []

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("SELECT ...", {}, Exception("database is locked"))

    monkeypatch.setattr(Store, "list_keys", fail)
    monkeypatch.setattr(Store, "create_key", fail)
    close = Store.close
    monkeypatch.setattr(Store, "close", lambda self: (closed.append(1), close(self)))
    run = CliRunner().invoke
    for args in (["keys", "list"], ["keys", "create", "globex"]):
        r = run(cli_app, [*args, "--db-url", db_url])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output)
        assert f"error: database {db_url}: database is locked" in r.output, r.output
        assert "Traceback" not in r.output
    assert len(closed) == 2
