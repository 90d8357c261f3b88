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
