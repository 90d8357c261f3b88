"""What the service shows outside: start-up retries and exits, /ready, access logs, and deletes
answered while the index is still loading."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import exc as sa_exc

from advface.protection import build_protection
from advface.service import app as app_module
from advface.service import payload
from advface.service.app import StartupRetry, create_app
from advface.service.backend import Backend
from advface.service.process import free_port
from advface.service.server import RedactAccessLog, log_config, redact_path
from advface.service.settings import ServiceSettings
from advface.service.store import Store

from .conftest import MASTER, assert_error, feature_map

# What a driver's message may hold and /ready must never show.
SECRET_DETAIL = 'connection to "db.internal" port 5432 failed for user "svc_admin" (/srv/pg.sock)'
WAIT = 30.0  # seconds; only reached when something hangs


class _DriverError(Exception):
    pass


def _db_down() -> sa_exc.OperationalError:
    return sa_exc.OperationalError("SELECT 1", {}, _DriverError(SECRET_DETAIL))


def _build(
    url: str, toy: Backend, *, attempts: int = 4, delay: float = 0.0, background: bool = False
) -> tuple[FastAPI, Store, str]:
    store = Store(url, keys=MASTER)
    key = store.create_key("acme")
    app = create_app(
        ServiceSettings(db_url=url, backend="toy", threshold=0.8),
        store=store,
        backend=toy,
        protection=build_protection("none"),
        rebuild_in_background=background,
        startup_retry=StartupRetry(attempts=attempts, first_delay=delay),
    )
    return app, store, key


def _failing_startup(app: FastAPI, errors: list[Exception]) -> list[int]:
    """Make the service's start-up raise ``errors`` one per attempt, then run for real."""
    svc, calls = app.state.service, []
    real = svc.startup

    def startup() -> None:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        real()

    svc.startup = startup
    return calls


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'surface.db'}"


# -- start-up: retries, then a visible failure ---------------------------------------------------
def test_transient_startup_errors_are_retried_then_it_serves(
    url: str, toy: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app, store, key = _build(url, toy)
    calls = _failing_startup(app, [_db_down(), sa_exc.IntegrityError("INSERT", {}, None)])
    with caplog.at_level(logging.INFO, logger="advface.service"), TestClient(app) as c:
        assert len(calls) == 3
        assert c.get("/ready").json() == {"status": "ready"}
        assert app.state.service.startup_error is None
        h = {"X-API-Key": key}
        r = c.post("/v1/identify", content=payload.encode(feature_map(1)), headers=h)
        assert r.status_code == 200, r.text
    retried = [r.getMessage() for r in caplog.records if "start-up attempt" in r.getMessage()]
    assert len(retried) == 2 and "attempt 1 of 4 failed (_DriverError" in retried[0]
    assert any("serving: vector index" in r.getMessage() for r in caplog.records)
    store.close()


def test_startup_gives_up_after_its_retries_and_ready_hides_the_detail(
    url: str, toy: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app, store, key = _build(url, toy, attempts=3)
    calls = _failing_startup(app, [_db_down() for _ in range(5)])
    with caplog.at_level(logging.INFO, logger="advface.service"), TestClient(app) as c:
        assert len(calls) == 3
        r = c.get("/ready")
        body = assert_error(r, 503, "startup_failed")
        assert "database_unavailable" in body["error"]["message"]
        for secret in ("db.internal", "5432", "svc_admin", "/srv/pg.sock", "SELECT"):
            assert secret not in r.text
        r = c.post(
            "/v1/identify", content=payload.encode(feature_map(1)), headers={"X-API-Key": key}
        )
        assert_error(r, 503, "startup_failed")
    assert "giving up" in caplog.text and SECRET_DETAIL in caplog.text  # the detail: log only
    assert "answers 503 startup_failed until it is restarted" in caplog.text
    store.close()


def test_errors_retrying_cannot_fix_fail_at_once(url: str, toy: Backend) -> None:
    app, store, _ = _build(url, toy)
    calls = _failing_startup(app, [ValueError(f"bad setting in {SECRET_DETAIL}")])
    with TestClient(app) as c:
        assert len(calls) == 1
        r = c.get("/ready")
        assert "internal_error" in assert_error(r, 503, "startup_failed")["error"]["message"]
        assert "svc_admin" not in r.text
    store.close()


@pytest.mark.parametrize(
    ("error", "status"),
    [(lambda: ValueError("bad configuration"), 3), (_db_down, 1)],
    ids=["fatal", "retries-exhausted"],
)
def test_under_the_server_a_failed_startup_shuts_down_and_exits_non_zero(
    url: str,
    toy: Backend,
    monkeypatch: pytest.MonkeyPatch,
    error: Callable[[], Exception],
    status: int,
) -> None:
    app, store, _ = _build(url, toy, attempts=2)
    app.state.exit_on_startup_failure = True  # what server.run and app_from_env set
    _failing_startup(app, [error() for _ in range(3)])
    shutdowns: list[int] = []
    exits: list[int] = []
    monkeypatch.setattr(app_module, "_request_shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(app_module, "_exit_process", exits.append)
    with TestClient(app):
        assert shutdowns == [1] and exits == []  # graceful first: requests in flight finish
    assert exits == [status]
    store.close()


def test_a_shutdown_while_retrying_is_not_a_failure(
    url: str, toy: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, store, _ = _build(url, toy, attempts=5, delay=60.0, background=True)
    app.state.exit_on_startup_failure = True
    calls = _failing_startup(app, [_db_down() for _ in range(5)])
    exits: list[int] = []
    monkeypatch.setattr(app_module, "_request_shutdown", lambda: exits.append(0))
    monkeypatch.setattr(app_module, "_exit_process", exits.append)
    with TestClient(app) as c:
        assert _until(lambda: len(calls) == 1)
        assert_error(c.get("/ready"), 503, "not_ready")
    # Leaving the client ran the shutdown: it ended the wait for the next attempt, no exit.
    loader = next((t for t in threading.enumerate() if t.name == "index-load"), None)
    if loader is not None:
        loader.join(WAIT)
        assert not loader.is_alive()
    assert len(calls) == 1 and app.state.service.startup_error is None and exits == []
    store.close()


def _until(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# Imported by every Python process started with this folder on PYTHONPATH, uvicorn's spawned
# workers included: their start-up fails as BOOM_KIND says, with short retries.
_FAILING_STARTUP = """
import os
kind = os.environ.get("BOOM_KIND")
if kind:
    from sqlalchemy import exc
    from advface.service import app, core
    real = app.StartupRetry
    app.StartupRetry = lambda: real(attempts=2, first_delay=0.05)
    def startup(self):
        if kind == "fatal":
            raise ValueError("bad configuration")
        raise exc.OperationalError("SELECT 1", {}, OSError("database is locked"))
    core.Service.startup = startup
"""


@pytest.mark.parametrize(
    ("kind", "workers", "status"),
    [("fatal", 1, 3), ("transient", 1, 1), ("fatal", 2, 3)],
    ids=["fatal", "retries-exhausted", "fatal-in-a-worker"],
)
def test_advface_serve_exits_with_the_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, workers: int, status: int
) -> None:
    (tmp_path / "sitecustomize.py").write_text(_FAILING_STARTUP)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("BOOM_KIND", kind)
    args = [sys.executable, "-c", "from advface.cli import main; main()", "serve"]
    args += ["--backend", "toy", "--db-url", f"sqlite:///{tmp_path / 's.db'}"]
    args += ["--port", str(free_port()), "--workers", str(workers), "--log-level", "info"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert done.returncode == status, done.stderr[-3000:]
    assert f"exiting with status {status}: the start-up failed" in done.stderr


# -- /ready --------------------------------------------------------------------------------------
def test_ready_says_ready_or_why_not_and_nothing_else(url: str, toy: Backend) -> None:
    app, store, key = _build(url, toy)
    with TestClient(app) as c:
        h = {"X-API-Key": key}
        assert c.post("/v1/subjects", json={"subject_id": "ann"}, headers=h).status_code == 201
        enrolled = c.post(
            "/v1/subjects/ann/templates", content=payload.encode(feature_map(1)), headers=h
        )
        assert enrolled.status_code == 201
        assert c.get("/ready").json() == {"status": "ready"}
        assert c.get("/v1/stats", headers=h).json()["templates"] == 1  # counts: per tenant
        schema = c.get("/openapi.json").json()["components"]["schemas"]["Ready"]
        assert set(schema["properties"]) == {"status"}
    store.close()


# -- access logs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/subjects/alice%40example.com", "/v1/subjects/{id}"),
        ("/v1/subjects/alice%40example.com/verify", "/v1/subjects/{id}/verify"),
        ("/v1/subjects/bob/templates", "/v1/subjects/{id}/templates"),
        ("/v1/subjects/a/b/verify", "/v1/subjects/{id}/verify"),  # an encoded slash
        ("/v1/subjects/verify", "/v1/subjects/{id}"),  # a subject named "verify"
        ("/v1/templates/0f3a9c", "/v1/templates/{id}"),
        ("/v1//subjects/carol", "/v1//subjects/{id}"),
        ("/prefix/v1/subjects/dave/verify", "/prefix/v1/subjects/{id}/verify"),
        ("/v1/subjects", "/v1/subjects"),
        ("/v1/identify", "/v1/identify"),
        ("/ready", "/ready"),
    ],
)
def test_paths_lose_their_ids(path: str, logged: str) -> None:
    assert redact_path(path) == logged


def _access_record(path: str) -> logging.LogRecord:
    # The shape of uvicorn's access-log records.
    args = ("127.0.0.1:5000", "POST", path, "1.1", 200)
    return logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None
    )


def test_access_log_lines_carry_no_subject_id_or_query() -> None:
    record = _access_record("/v1/subjects/alice%40example.com/verify?cursor=bob")
    assert RedactAccessLog().filter(record)
    line = record.getMessage()
    assert "alice" not in line and "bob" not in line
    assert '"POST /v1/subjects/{id}/verify?[redacted] HTTP/1.1" 200' in line
    cfg = log_config()
    assert cfg["handlers"]["access"]["filters"] == ["redact_access"]
    assert cfg["filters"]["redact_access"]["()"].endswith(".RedactAccessLog")


# -- deletes while the index loads ---------------------------------------------------------------
def _legacy_gallery(url: str, toy: Backend, n: int) -> tuple[str, dict[str, str]]:
    """Subjects p0..p{n-1}, two templates each, stored without embeddings (start-up embeds
    them); returns the API key and each subject's first template id."""
    store = Store(url, keys=MASTER)
    key = store.create_key("acme")
    tenant = store.authenticate(key)
    assert tenant is not None
    first: dict[str, str] = {}
    for i in range(n):
        sid = f"p{i}"
        store.create_subject(tenant, sid)
        for j in range(2):
            row, _ = store.add_template(
                tenant,
                sid,
                payload.encode(feature_map(i, noise=0.1, sample=j)),
                protection="none",
                protection_params={},
                model_version=toy.version,
                request_sha256=f"{i:032d}{j:032d}",
            )
            first.setdefault(sid, row.template_id)
    store.close()
    return key, first


class _Pause:
    """Holds the start-up at the first call of a store method until the test has acted."""

    def __init__(self, store: Store, method: str, materialise: bool = False) -> None:
        self.reached, self.resume = threading.Event(), threading.Event()
        real = getattr(store, method)

        def paused(*args: Any, **kwargs: Any) -> Any:
            # materialise: read all rows first, so they are older than the deletes.
            out = list(real(*args, **kwargs)) if materialise else None
            if not self.reached.is_set():
                self.reached.set()
                assert self.resume.wait(WAIT)
            return iter(out) if out is not None else real(*args, **kwargs)

        setattr(store, method, paused)


@pytest.mark.parametrize(
    ("method", "materialise"),
    [("put_embeddings", False), ("iter_embeddings", True)],
    ids=["while-embedding", "while-loading-the-index"],
)
def test_deletes_are_answered_during_startup_and_stay_deleted(
    url: str, toy: Backend, method: str, materialise: bool
) -> None:
    key, first = _legacy_gallery(url, toy, 4)
    store = Store(url, keys=MASTER)
    app = create_app(
        ServiceSettings(db_url=url, backend="toy", threshold=0.8),
        store=store,
        backend=toy,
        protection=build_protection("none"),
        rebuild_in_background=True,
    )
    svc = app.state.service
    pause = _Pause(store, method, materialise)
    h = {"X-API-Key": key}
    probe = payload.encode(feature_map(0, noise=0.1, sample=5))
    with TestClient(app) as c:
        try:
            assert pause.reached.wait(WAIT)
            assert_error(c.get("/ready"), 503, "not_ready")
            assert_error(c.post("/v1/identify", content=probe, headers=h), 503, "not_ready")
            r = c.delete("/v1/subjects/p0", headers=h)
            assert r.status_code == 200 and r.json()["deleted_templates"] == 2, r.text
            r = c.delete(f"/v1/templates/{first['p1']}", headers=h)
            assert r.status_code == 200, r.text
            assert_error(c.delete("/v1/subjects/ghost", headers=h), 404, "unknown_subject")
        finally:
            pause.resume.set()
        assert svc.ready.wait(WAIT) and svc.startup_error is None
        assert c.get("/ready").json() == {"status": "ready"}
        # Loaded from rows read before the deletes: the change log's replay drops them.
        assert svc.index.count() == (8 if materialise else 5)
        r = c.post("/v1/identify?top_k=10", content=probe, headers=h)
        assert r.status_code == 200, r.text
        found = {x["subject_id"] for x in r.json()["candidates"]}
        assert found == {"p1", "p2", "p3"}
        assert all(x["template_id"] != first["p1"] for x in r.json()["candidates"])
        assert store.count_templates() == 5 and svc.index.count() == 5
        assert_error(
            c.post("/v1/subjects/p0/verify", content=probe, headers=h), 404, "unknown_subject"
        )
    store.close()


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    yield
    # A background start-up left waiting would hold the database open for later tests.
    for t in threading.enumerate():
        if t.name == "index-load":
            t.join(WAIT)


def test_error_logs_carry_no_subject_id(caplog: pytest.LogCaptureFixture) -> None:
    from advface.service import crypto
    from advface.service.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/subjects/{sid}/verify")
    def _decrypt(sid: str) -> None:
        raise crypto.CryptoError("does not authenticate")

    @app.get("/v1/subjects/{sid}")
    def _db(sid: str) -> None:
        raise sa_exc.OperationalError("SELECT 1", {}, Exception("boom"))

    secret = "alice@example.org"
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as c:
        assert c.post(f"/v1/subjects/{secret}/verify").json()["error"]["code"] == (
            "decryption_failed"
        )
        assert c.get(f"/v1/subjects/{secret}").status_code in (500, 503)
    assert "/v1/subjects/{id}" in caplog.text and secret not in caplog.text
