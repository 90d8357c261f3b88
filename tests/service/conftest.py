"""Fixtures for the template service: tiny stand-in networks, SQLite and PostgreSQL stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from advface.protection import build_protection
from advface.service import payload
from advface.service.app import Service, create_app
from advface.service.backend import Backend, toy_backend
from advface.service.settings import ServiceSettings
from advface.service.store import Base, Store

PG_ENV = "ADVFACE_TEST_POSTGRES_URL"


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


@pytest.fixture(scope="session")
def toy() -> Backend:
    return toy_backend()


@pytest.fixture(scope="session")
def pg_base_url() -> Iterator[str]:
    """A fresh database for this test session on the server at $ADVFACE_TEST_POSTGRES_URL."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set (run .ci/postgres.sh)")
    import psycopg

    name = f"advface_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = url.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    url = request.getfixturevalue("pg_base_url")
    store = Store(url)
    Base.metadata.drop_all(store.engine)  # every test starts from an empty schema
    store.close()
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
        """(templates in the DB, templates in the in-memory gallery)."""
        return self.store.count_templates(), len(self.service.gallery)


def make_harness(
    db_url: str,
    toy: Backend,
    protection: str = "none",
    protection_params: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[Harness, Any]:
    s = ServiceSettings(db_url=db_url, backend="toy", threshold=0.8, **settings)
    store = Store(db_url)
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
