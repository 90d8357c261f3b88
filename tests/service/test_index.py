"""Vector indexes: recall against exact search, tenant isolation, removal, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from advface.service.dbindex import PgVectorIndex, PgVectorUnavailable, SqlExactIndex
from advface.service.index import (
    ExactIndex,
    HnswIndex,
    VectorIndex,
    VectorIndexError,
    top_subjects,
)
from advface.service.store import Store

from .conftest import empty_schema

DIM = 32
VERSION = "test-psi"


def clustered(n: int, seed: int, centres: int = 50, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random unit centres: several "faces" per identity, like Psi's."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(index: VectorIndex, tenant: int, vecs: np.ndarray, prefix: str, per_subject: int = 3):
    items = [(f"{prefix}{i:05d}", f"{prefix}s{i // per_subject}", v) for i, v in enumerate(vecs)]
    index.add(tenant, items)
    return items


def recall_at(index: VectorIndex, exact: VectorIndex, probes: np.ndarray, k: int) -> float:
    got = want = 0
    for q in probes:
        truth = {h.template_id for h in exact.search(1, q, k)}
        got += len(truth & {h.template_id for h in index.search(1, q, k)})
        want += len(truth)
    return got / want


def test_hnsw_recall_against_exact_search() -> None:
    hnsw, exact = HnswIndex(DIM), ExactIndex(DIM)
    vecs = clustered(3000, seed=1)
    for idx in (hnsw, exact):
        fill(idx, 1, vecs, "t")
    probes = clustered(200, seed=2)
    assert recall_at(hnsw, exact, probes, 1) >= 0.95
    assert recall_at(hnsw, exact, probes, 10) >= 0.9
    # Scores are the cosine similarities, not approximations of them.
    q = probes[0]
    for h in hnsw.search(1, q, 5):
        i = int(h.template_id[1:])
        assert h.score == pytest.approx(float(vecs[i] @ q), abs=1e-5)


@pytest.mark.parametrize("make", [HnswIndex, ExactIndex])
def test_tenant_isolation_and_removal(make: type[VectorIndex]) -> None:
    idx = make(DIM)
    a, b = clustered(300, seed=3), clustered(300, seed=3)  # identical vectors in both tenants
    fill(idx, 1, a, "a")
    fill(idx, 2, b, "b")
    assert (idx.count(1), idx.count(2), idx.count(3), idx.count()) == (300, 300, 0, 600)
    for q in b[:20]:  # B's own vectors as probes: A's search still only sees A
        assert all(h.template_id.startswith("a") for h in idx.search(1, q, 50))
    assert idx.search(3, a[0], 5) == []  # a tenant with nothing sees nothing
    assert idx.search(1, a[7], 1)[0].template_id == "a00007"
    assert idx.remove(["a00007", "nope"]) == 1
    assert all(h.template_id != "a00007" for h in idx.search(1, a[7], 300))
    assert idx.count(1) == 299
    idx.add(1, [("a00008", "moved", a[9])])  # re-adding an id replaces its entry
    # Every entry (k = all): HNSW is approximate, and a top-2 among exact duplicates once
    # missed one of them; what is tested is the replacement, not the recall.
    hits = [h for h in idx.search(1, a[9], 299) if h.template_id == "a00008"]
    assert len(hits) == 1 and hits[0].subject_id == "moved"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)  # it holds a[9]'s vector now
    assert idx.count(1) == 299


@pytest.mark.parametrize("make", [HnswIndex, ExactIndex])
def test_bad_input_is_refused_and_changes_nothing(make: type[VectorIndex]) -> None:
    idx = make(DIM)
    fill(idx, 1, clustered(10, seed=4), "t")
    good = np.ones(DIM, np.float32)
    for bad in (np.ones(DIM + 1), np.full(DIM, np.nan), np.zeros(DIM)):
        with pytest.raises(VectorIndexError):
            idx.add(1, [("new", "s", good), ("new2", "s", bad)])
        with pytest.raises(VectorIndexError):
            idx.search(1, bad, 1)
    with pytest.raises(VectorIndexError):
        idx.search(1, good, 0)
    assert idx.count() == 10 and "new" not in {h.template_id for h in idx.search(1, good, 10)}


def test_top_subjects_are_distinct_and_exact_order() -> None:
    hnsw, exact = HnswIndex(DIM), ExactIndex(DIM)
    vecs = clustered(600, seed=5, centres=10, spread=0.1)  # many near-duplicate templates
    for idx in (hnsw, exact):
        fill(idx, 1, vecs, "t", per_subject=20)
    q = clustered(1, seed=6, centres=10, spread=0.1)[0]
    got = top_subjects(hnsw, 1, q, 5)
    want = top_subjects(exact, 1, q, 5)
    assert len({h.subject_id for h in got}) == 5
    assert [h.subject_id for h in got] == [h.subject_id for h in want]
    assert len(top_subjects(exact, 1, q, 100)) == 30  # only 30 subjects exist


def test_hnsw_save_and_load(tmp_path: Path) -> None:
    idx = HnswIndex(DIM)
    fill(idx, 1, clustered(500, seed=7), "a")
    fill(idx, 2, clustered(50, seed=8), "b")
    idx.save(tmp_path / "ix")
    back = HnswIndex.load(tmp_path / "ix")
    probes = clustered(20, seed=9)
    for q in probes:
        assert back.search(1, q, 5) == idx.search(1, q, 5)
        assert all(h.template_id.startswith("b") for h in back.search(2, q, 10))
    back.add(1, [("new", "n", probes[0])])  # a loaded index stays writable
    assert back.search(1, probes[0], 1)[0].template_id == "new"


def test_hnsw_load_refuses_a_damaged_snapshot_with_a_value_error(tmp_path: Path) -> None:
    """The service rebuilds from the database on a ValueError; anything else stops it."""
    import json

    idx = HnswIndex(DIM)
    fill(idx, 1, clustered(20, seed=7), "a")
    idx.save(tmp_path / "ix")
    (tmp_path / "ix" / "tenant-1.usearch").unlink()
    with pytest.raises(ValueError, match="tenant-1.usearch is missing"):
        HnswIndex.load(tmp_path / "ix")
    meta = tmp_path / "ix" / "meta.json"
    for broken in ({"tenants": {}}, {"dim": DIM, "params": [1], "tenants": {}}):
        meta.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="not an index snapshot"):
            HnswIndex.load(tmp_path / "ix")
    meta.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an index snapshot"):
        HnswIndex.saved_extra(tmp_path / "ix")


# -- indexes in the database ----------------------------------------------------------------


def _store_with(url: str, tenants: dict[int, np.ndarray]) -> Store:
    """A store holding one template per vector (blob contents do not matter here)."""
    store = Store(url)
    for tenant, vecs in tenants.items():
        store.create_key(f"tenant{tenant}")
        for i in range(0, len(vecs), 3):
            store.create_subject(tenant, f"{tenant}s{i // 3}")
    return store


def _enroll_all(store: Store, tenants: dict[int, np.ndarray]) -> None:
    for tenant, vecs in tenants.items():
        for i, v in enumerate(vecs):
            store.add_template(
                tenant,
                f"{tenant}s{i // 3}",
                b"x",
                protection="none",
                protection_params={},
                model_version="m",
                request_sha256=f"{tenant}-{i}",
                embedding=(VERSION, v),
            )


@pytest.fixture
def pg_url(pg_base_url: str) -> Iterator[str]:
    empty_schema(pg_base_url)
    yield pg_base_url


@pytest.fixture
def vec_url(pgvector_url: str) -> Iterator[str]:
    empty_schema(pgvector_url)
    yield pgvector_url


def _db_index_checks(store: Store, index: VectorIndex, tenants: dict[int, np.ndarray]) -> None:
    exact = ExactIndex(DIM)
    for row in store.iter_embeddings(VERSION):
        exact.add(row.tenant_id, [(row.template_id, row.subject_id, row.vector)])
    assert index.count() == exact.count() and index.count(1) == len(tenants[1])
    probes = clustered(60, seed=12)
    assert recall_at(index, exact, probes, 1) >= 0.95
    assert recall_at(index, exact, probes, 10) >= 0.9
    for q in tenants[2][:10]:  # tenant 2's own vectors: tenant 1 never sees them
        hits = index.search(1, q, 40)
        assert len(hits) == 40 and all(h.subject_id.startswith("1s") for h in hits)
    victim = index.search(1, tenants[1][4], 1)[0]
    store.delete_template(1, victim.template_id)  # cascades to the index's rows
    assert victim.template_id not in {h.template_id for h in index.search(1, tenants[1][4], 10)}


@pytest.mark.postgres
def test_pgvector_recall_isolation_and_delete(vec_url: str) -> None:
    tenants = {1: clustered(400, seed=10), 2: clustered(200, seed=11)}
    store = _store_with(vec_url, tenants)
    try:
        index = PgVectorIndex(store, DIM, VERSION)
        _enroll_all(store, tenants)  # the store writes vectors in the template's transaction
        with store.engine.connect() as conn:
            plan = conn.execute(
                text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                {"n": "ix_template_vectors_hnsw"},
            ).scalar()
        assert "hnsw" in plan and "vector_cosine_ops" in plan
        _db_index_checks(store, index, tenants)
    finally:
        store.close()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_exact_sql_fallback(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (
        f"sqlite:///{tmp_path / 'x.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    tenants = {1: clustered(150, seed=13), 2: clustered(90, seed=14)}
    store = _store_with(url, tenants)
    try:
        _enroll_all(store, tenants)
        _db_index_checks(store, SqlExactIndex(store, DIM, VERSION), tenants)
    finally:
        store.close()


def test_missing_pgvector_is_a_clear_error(tmp_path: Path) -> None:
    from advface.service.app import build_index
    from advface.service.backend import toy_backend
    from advface.service.settings import ServiceSettings

    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = Store(url)
    try:
        with pytest.raises(ValueError, match="pgvector needs a PostgreSQL"):
            build_index(ServiceSettings(db_url=url, vector_index="pgvector"), store, toy_backend())
        idx = build_index(ServiceSettings(db_url=url, index_ef_search=99), store, toy_backend())
        assert isinstance(idx, HnswIndex) and idx.dim == 128
        assert idx._params["expansion_search"] == 99
    finally:
        store.close()
    with pytest.raises(ValueError, match="vector_index"):
        ServiceSettings(vector_index="faiss")


@pytest.mark.postgres
def test_postgres_without_pgvector_falls_back_or_fails(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advface.service import dbindex
    from advface.service.app import build_index
    from advface.service.backend import toy_backend
    from advface.service.settings import ServiceSettings

    def no_pgvector(store: Store, dim: int) -> str:
        raise PgVectorUnavailable("PostgreSQL has no usable pgvector extension (test)")

    monkeypatch.setattr(dbindex, "_ensure_schema", no_pgvector)
    store = Store(pg_url)
    try:
        auto = build_index(ServiceSettings(db_url=pg_url), store, toy_backend())
        assert isinstance(auto, SqlExactIndex)  # exact search, with a warning in the log
        with pytest.raises(PgVectorUnavailable, match="pgvector"):
            build_index(
                ServiceSettings(db_url=pg_url, vector_index="pgvector"), store, toy_backend()
            )
        with pytest.raises(ValueError, match="hnsw needs SQLite"):
            build_index(ServiceSettings(db_url=pg_url, vector_index="hnsw"), store, toy_backend())
    finally:
        store.close()
