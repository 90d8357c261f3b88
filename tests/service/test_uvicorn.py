"""The uvicorn runner: slow request heads are cut off, access logs carry no query strings
and no ids."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from advface.service.process import ServerProcess

from .conftest import cli_key


def test_live_server_cuts_slow_headers_and_redacts_query_strings_and_ids(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'svc.db'}"
    key = cli_key(db_url)
    log = tmp_path / "server.log"
    secret = "afk_0123456789ab_" + "S" * 43
    with ServerProcess(
        db_url=db_url,
        backend="toy",
        log_path=log,
        log_level="info",
        ready_timeout=120,
        extra_args=["--header-timeout", "1"],
    ) as srv:
        r = httpx.get(
            f"{srv.url}/v1/subjects",
            params={"api_key": secret, "cursor": "private-subject"},
            headers={"X-API-Key": key},
        )
        assert r.status_code == 200
        for method, path in (
            ("DELETE", "/v1/subjects/private.person@example.com"),
            ("POST", "/v1/subjects/private.person@example.com/verify"),
            ("GET", "/v1/templates/privatetemplate0"),
        ):
            assert httpx.request(method, srv.url + path, headers={"X-API-Key": key}).is_error
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            assert s.recv(1024) == b""  # closed by the server, not left open
    text = log.read_text()
    assert "/v1/subjects?[redacted]" in text
    assert secret not in text and "private-subject" not in text
    # Nor in the path: the route with its ids replaced.
    assert '"DELETE /v1/subjects/{id} HTTP/1.1" 404' in text
    assert '"POST /v1/subjects/{id}/verify HTTP/1.1"' in text
    assert '"GET /v1/templates/{id} HTTP/1.1" 404' in text
    assert "private.person" not in text and "privatetemplate0" not in text
