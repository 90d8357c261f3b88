"""Service hardening: sane ids, auth before bodies, upload cap, rate limits, body timeouts,
typed database errors, the error envelope in OpenAPI and the offline docs page."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy.exc import OperationalError

from advface.service import payload
from advface.service.backend import Backend
from advface.service.errors import ErrorEnvelope
from advface.service.guard import TokenBucket
from advface.service.store import Store

from .conftest import Harness, asgi_request, assert_error, feature_map, make_harness


@pytest.mark.parametrize("bad", [".", "..", "...", "a/b", "", "x" * 129, "tab\there", "nl\n"])
def test_server_rejects_insane_subject_ids(harness: Harness, bad: str) -> None:
    c = harness.client
    r = c.post("/v1/subjects", json={"subject_id": bad}, headers=harness.h())
    assert_error(r, 422, "validation_error")
    assert c.get("/v1/subjects", headers=harness.h()).json()["items"] == []


@pytest.mark.parametrize("segment", ["%2E", "%2E%2E", "%2e%2e%2e", "bad%09id"])
def test_path_ids_get_a_typed_422(harness: Harness, segment: str) -> None:
    c, z = harness.client, payload.encode(feature_map(1))
    url = f"/v1/subjects/{segment}"
    for r in (
        c.post(f"{url}/verify", content=z, headers=harness.h()),
        c.post(f"{url}/templates", content=z, headers=harness.h()),
        c.delete(url, headers=harness.h()),
    ):
        assert_error(r, 422, "invalid_subject_id")
    assert_error(c.get("/v1/templates/%2E%2E", headers=harness.h()), 422, "invalid_template_id")


def test_unauthenticated_upload_is_refused_before_its_body_is_read(harness: Harness) -> None:
    reads: list[int] = []

    async def receive() -> dict[str, Any]:
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": False}

    app = harness.client.app
    for headers, code in (({}, "missing_api_key"), ({"X-API-Key": "afk_nope"}, "invalid_api_key")):
        headers = {"content-length": "4000000", **headers}
        status, _, body = anyio.run(asgi_request, app, "POST", "/v1/identify", headers, receive)
        assert (status, body["error"]["code"]) == (401, code)
    assert reads == []


def test_concurrent_uploads_are_capped(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy, max_concurrent_uploads=1)
    try:
        h.subject("u")
        assert h.enroll("u", feature_map(1)).status_code == 201
        data = payload.encode(feature_map(1))
        headers = {"X-API-Key": h.key, "content-type": "application/octet-stream"}
        results: dict[str, Any] = {}

        async def scenario() -> None:
            reading, release = anyio.Event(), anyio.Event()

            async def slow() -> dict[str, Any]:
                reading.set()
                await release.wait()
                return {"type": "http.request", "body": data, "more_body": False}

            async def fast() -> dict[str, Any]:
                return {"type": "http.request", "body": data, "more_body": False}

            async def first() -> None:
                results["first"] = await asgi_request(
                    h.client.app, "POST", "/v1/subjects/u/verify", headers, slow
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await reading.wait()  # the first upload holds the only slot
                path = "/v1/subjects/u/verify"
                results["second"] = await asgi_request(h.client.app, "POST", path, headers, fast)
                release.set()

        anyio.run(scenario)
        status, hdrs, body = results["second"]
        assert (status, body["error"]["code"]) == (503, "too_many_uploads")
        assert int(hdrs["retry-after"]) >= 1
        assert results["first"][0] == 200 and results["first"][2]["match"]
        # The slot is free again.
        assert h.verify("u", feature_map(1)).status_code == 200
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_slow_bodies_time_out(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy, read_timeout=0.05)
    try:
        calls = 0

        async def trickle() -> dict[str, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"AFZ1", "more_body": True}
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        headers = {"X-API-Key": h.key, "content-type": "application/octet-stream"}
        status, _, body = anyio.run(
            asgi_request, h.client.app, "POST", "/v1/identify", headers, trickle
        )
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        assert h.state() == (0, 0)
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_rate_limit_per_key(db_url: str, toy: Backend) -> None:
    # A refill of one token per 1000 s: nothing refills while the test runs.
    h, cm = make_harness(db_url, toy, rate_limit=0.001, rate_burst=3)
    try:
        c = h.client
        for _ in range(3):
            assert c.get("/v1/subjects", headers=h.h()).status_code == 200
        r = c.get("/v1/subjects", headers=h.h())
        assert_error(r, 429, "rate_limited")
        assert int(r.headers["Retry-After"]) >= 1
        assert c.get("/v1/subjects", headers=h.h(h.other_key)).status_code == 200  # per key
        assert c.get("/health").status_code == 200
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_token_bucket_refills_with_the_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert bucket.take("k") == 0.0 and bucket.take("k") == 0.0
    assert bucket.take("k") == pytest.approx(0.5)
    assert bucket.take("other") == 0.0
    now[0] = 0.25
    assert bucket.take("k") == pytest.approx(0.25)
    now[0] = 0.5
    assert bucket.take("k") == 0.0
    now[0] = 100.0  # never more than the burst
    assert [bucket.take("k") for _ in range(3)][:2] == [0.0, 0.0]


def test_new_limits_from_env_and_validated() -> None:
    from advface.service.settings import ServiceSettings

    s = ServiceSettings.from_env(
        {
            "ADVFACE_HEADER_TIMEOUT": "5",
            "ADVFACE_READ_TIMEOUT": "12.5",
            "ADVFACE_MAX_CONCURRENT_UPLOADS": "3",
            "ADVFACE_RATE_LIMIT": "0",
            "ADVFACE_RATE_BURST": "7",
            "ADVFACE_DB_TIMEOUT": "2",
        }
    )
    assert (s.header_timeout, s.read_timeout, s.max_concurrent_uploads) == (5.0, 12.5, 3)
    assert (s.rate_limit, s.rate_burst, s.db_timeout) == (0.0, 7, 2.0)
    for bad in ({"header_timeout": 0}, {"max_concurrent_uploads": 0}, {"rate_limit": -1}):
        with pytest.raises(ValueError):
            ServiceSettings(**bad)
    with pytest.raises(ValueError, match="torch_threads"):
        ServiceSettings.from_env({"ADVFACE_TORCH_THREADS": "-2"})


def test_locked_sqlite_database_is_a_typed_503(
    tmp_path: Path, toy: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from advface.service.app import create_app
    from advface.service.settings import ServiceSettings

    path = tmp_path / "locked.db"
    db_url = f"sqlite:///{path}"
    store = Store(db_url, timeout=0.05)
    key = store.create_key("acme")
    app = create_app(
        ServiceSettings(db_url=db_url, backend="toy"),
        store=store,
        backend=toy,
        rebuild_in_background=False,
    )
    locker = sqlite3.connect(path, isolation_level=None)
    with TestClient(app) as c, caplog.at_level(logging.DEBUG):
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        r = c.post("/v1/subjects", json={"subject_id": "private-name"}, headers={"X-API-Key": key})
        assert_error(r, 503, "database_unavailable")
        assert r.headers["Retry-After"] == "1"
        assert "INSERT" not in r.text and "private-name" not in r.text
        locker.execute("ROLLBACK")
        r = c.post("/v1/subjects", json={"subject_id": "private-name"}, headers={"X-API-Key": key})
        assert r.status_code == 201
    locker.close()
    store.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "database unavailable" in logged and "private-name" not in logged


def test_dropped_connection_is_a_typed_503_without_sql_in_logs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def dropped(*_: Any, **__: Any) -> Any:
        raise OperationalError(
            "SELECT * FROM subjects WHERE subject_id = %(sid)s",
            {"sid": "private-param"},
            ConnectionError("server closed the connection unexpectedly"),
        )

    with caplog.at_level(logging.DEBUG):
        monkeypatch.setattr(harness.store, "list_subjects", dropped)
        r = harness.client.get("/v1/subjects", headers=harness.h())
        assert_error(r, 503, "database_unavailable")
        monkeypatch.setattr(harness.store, "authenticate", dropped)
        r = harness.client.get("/v1/subjects", headers=harness.h())
        assert_error(r, 503, "database_unavailable")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "database unavailable" in logged
    assert "private-param" not in logged and "SELECT" not in logged


def test_ready_is_503_when_the_database_does_not_answer(harness: Harness) -> None:
    assert harness.client.get("/ready").status_code == 200
    harness.store.ping = lambda: False  # type: ignore[method-assign]
    assert_error(harness.client.get("/ready"), 503, "database_unavailable")


def test_ready_is_503_when_the_sqlite_file_is_gone(tmp_path: Path, toy: Backend) -> None:
    path = tmp_path / "gone.db"
    h, cm = make_harness(f"sqlite:///{path}", toy)
    try:
        assert h.client.get("/ready").status_code == 200
        h.store.engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.write_bytes(b"this is not a database" * 100)
        assert_error(h.client.get("/ready"), 503, "database_unavailable")
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_openapi_declares_the_error_envelope_for_every_route(harness: Harness) -> None:
    spec = harness.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    envelope = spec["components"]["schemas"]["ErrorEnvelope"]
    assert envelope["required"] == ["error"]
    ref = "#/components/schemas/ErrorEnvelope"
    n_ops = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            n_ops += 1
            codes = {int(c) for c in op["responses"]}
            expected = {500}
            if path.startswith("/v1"):
                expected |= {401, 422, 429, 503}
            if method == "post" and path.startswith("/v1"):
                expected |= {400, 408, 413}
            if "{" in path:
                expected |= {404}
            if path.endswith(("/templates", "/verify", "/identify")):
                expected |= {415}
            assert expected <= codes, (method, path, expected - codes)
            for code, resp in op["responses"].items():
                if int(code) >= 400:
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": ref}, (method, path, code)
                    assert resp["description"].startswith("error codes:")
    assert n_ops == 11  # incl. GET /v1/stats
    # What the spec promises is what the service sends.
    r = harness.client.get("/v1/subjects", params={"limit": 0}, headers=harness.h())
    assert ErrorEnvelope.model_validate(assert_error(r, 422, "validation_error")).error.details
    r = harness.client.get("/v1/subjects")
    ErrorEnvelope.model_validate(assert_error(r, 401, "missing_api_key"))


def test_docs_page_needs_no_cdn(harness: Harness) -> None:
    r = harness.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text.lower()
    assert "openapi.json" in page and "<script" in page
    assert "http://" not in page and "https://" not in page and "cdn" not in page
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert_error(harness.client.get("/redoc"), 404, "not_found")
