"""Consistency under concurrency and scale: change-log catch-up while another worker prunes,
wide pgvector searches, metadata queries that never read the stored maps, tenant transforms
created once, enrollment racing a subject's deletion."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from advface.service import dbindex
from advface.service.core import IndexSync
from advface.service.dbindex import PgVectorIndex, PgVectorUnavailable
from advface.service.index import ExactIndex, top_subjects
from advface.service.settings import ServiceSettings
from advface.service.store import NotFound, Store
from advface.service.transform import TenantTransforms, orthogonal

from .conftest import MASTER, Harness, assert_error, empty_schema, feature_map

DIM = 16
VERSION = "test-psi"


def _vecs(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _enroll(store: Store, tenant: int, subject: str, vecs: np.ndarray) -> list[str]:
    """One template per vector (blob contents do not matter here); returns their ids."""
    ids = []
    for i, v in enumerate(vecs):
        row, _ = store.add_template(
            tenant,
            subject,
            b"x",
            protection="none",
            protection_params={},
            model_version="m",
            request_sha256=f"{subject}-{i}",
            embedding=(VERSION, v),
        )
        ids.append(row.template_id)
    return ids


def _indexed(index: ExactIndex, tenant: int) -> set[str]:
    return {h.template_id for h in index.search(tenant, np.ones(DIM), 10_000)}


# -- 1. change-log catch-up --------------------------------------------------------------------


@pytest.mark.parametrize("prune", [False, True])
def test_catch_up_reloads_when_the_log_is_pruned_between_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prune: bool
) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.create_key("acme")
    for sid in ("gone", "kept"):
        store.create_subject(1, sid)
    _enroll(store, 1, "gone", _vecs(2, 0))
    sync = IndexSync(store, ExactIndex(DIM), VERSION)
    sync.reload()
    # Behind this worker: 4 enrollments, a deletion (2 entries), 2 more enrollments.
    _enroll(store, 1, "kept", _vecs(4, 1))
    store.delete_subject(1, "gone")
    _enroll(store, 1, "kept", _vecs(2, 2))
    assert store.change_bounds()[1] - sync.seq == 8

    pages = []
    reloads = []
    read_page, reload = store.changes_after, sync._reload_locked

    def changes_after(seq: int, limit: int = 10_000) -> list[tuple[int, str, str]]:
        page = read_page(seq, 2)  # small pages: a slow catch-up of a long log
        if prune and not pages:
            store.prune_changes(2)  # another worker prunes after our first page
        pages.append(page)
        return page

    def counted_reload() -> int:
        reloads.append(sync.seq)
        return reload()

    monkeypatch.setattr(store, "changes_after", changes_after)
    monkeypatch.setattr(sync, "_reload_locked", counted_reload)
    sync.catch_up()
    in_db = {e.template_id for e in store.iter_embeddings(VERSION)}
    assert len(in_db) == 6 and _indexed(sync.index, 1) == in_db  # the deleted subject is gone
    assert sync.seq == store.change_bounds()[1]
    assert len(reloads) == (1 if prune else 0)
    assert sync.catch_up() == 0
    store.close()


# -- 2. wide searches on pgvector -------------------------------------------------------------


class _CappedIndex(ExactIndex):
    """An exact index whose searches return at most 1000 hits (pgvector without iterative
    scans), recording what each search asked for."""

    max_search_k = 1000

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.asked: list[int] = []

    def search(self, tenant_id: int, probe: Any, k: int) -> list[Any]:
        self.asked.append(k)
        return super().search(tenant_id, probe, min(k, self.max_search_k))


def test_top_subjects_stops_widening_at_the_index_cap() -> None:
    centres = _vecs(150, 3)
    noise = 0.05 * np.random.default_rng(4).standard_normal((150, 20, DIM))
    items = [  # 150 subjects x 20 close templates: 1000 hits hold far fewer than 100 subjects
        (f"t{s}-{j}", f"s{s}", centres[s] + noise[s, j]) for s in range(150) for j in range(20)
    ]
    idx, exact = _CappedIndex(DIM), ExactIndex(DIM)
    idx.add(1, items)
    exact.add(1, items)
    hits = top_subjects(idx, 1, centres[0], 100)
    assert idx.asked == [400, 1000]  # never wider than the index can answer
    assert hits[0].subject_id == "s0" and 20 <= len(hits) < 100
    assert len({h.subject_id for h in hits}) == len(hits)
    best = [h.subject_id for h in top_subjects(exact, 1, centres[0], 100)]
    assert [h.subject_id for h in hits] == best[: len(hits)]  # the best of those found


def test_ef_search_is_validated_against_pgvectors_limit(tmp_path: Path) -> None:
    pg = "postgresql://u@localhost/db"
    for kwargs in (
        {"db_url": pg, "index_ef_search": 1001},
        {"db_url": "sqlite:///x.db", "vector_index": "pgvector", "index_ef_search": 2000},
    ):
        with pytest.raises(ValueError, match=r"1\.\.1000 with the pgvector index"):
            ServiceSettings(**kwargs)
    assert ServiceSettings(db_url=pg, index_ef_search=1000).index_ef_search == 1000
    assert ServiceSettings(db_url=pg, vector_index="exact", index_ef_search=4096)
    assert ServiceSettings(db_url="sqlite:///x.db", index_ef_search=4096)  # in-process HNSW
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match=r"ef_search 1\.\.1000"):
        PgVectorIndex(store, DIM, VERSION, ef_search=1001)  # refused before any SQL
    store.close()


@pytest.fixture
def vec_url(pgvector_url: str) -> Iterator[str]:
    empty_schema(pgvector_url)
    yield pgvector_url


@pytest.mark.postgres
@pytest.mark.parametrize("iterative", [True, False])
def test_pgvector_identify_widens_past_ef_search_limit(vec_url: str, iterative: bool) -> None:
    store = Store(vec_url)
    try:
        store.create_key("acme")
        index = PgVectorIndex(store, DIM, VERSION)
        if not iterative:  # what pgvector < 0.8 does: at most ef_search rows per search
            index.iterative, index.max_search_k = False, 1000
        elif not index.iterative:
            pytest.skip(f"pgvector {index.pgvector_version} has no iterative scan")
        assert (index.search_ef(10), index.search_ef(1600)) == (256, 1000)
        vecs = _vecs(450, 4)
        for s in range(90):  # 90 subjects x 5 templates: top 100 widens to 1600
            store.create_subject(1, f"s{s:02d}")
            _enroll(store, 1, f"s{s:02d}", vecs[5 * s : 5 * s + 5])
        hits = top_subjects(index, 1, vecs[7], 100)
        assert hits[0].subject_id == "s01" and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert len({h.subject_id for h in hits}) == len(hits) == 90
        assert len(index.search(1, vecs[7], 5000)) == 450
    finally:
        store.close()


# -- 3. metadata queries on SQLite never read the maps ----------------------------------------


def _plans(store: Store, call: Any) -> list[str]:
    """EXPLAIN QUERY PLAN of every statement on ``templates`` that ``call`` runs."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, stmt: str, params: Any, ctx: Any, many: bool) -> None:
        if stmt.lstrip().upper().startswith("SELECT") and "templates" in stmt:
            seen.append((stmt, params))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    with store.engine.connect() as conn:
        return [
            " | ".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {s}", p))
            for s, p in seen
        ]


def test_sqlite_metadata_queries_use_covering_indexes(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.create_key("acme")
    store.create_subject(1, "ann")
    for i in range(4):
        store.add_template(
            1,
            "ann",
            bytes(range(256)) * 64,  # a map that fills overflow pages
            protection="noise",
            protection_params={"sigma": i % 2},
            model_version="m",
            request_sha256=str(i),
            embedding=(VERSION, _vecs(1, i)[0]) if i % 2 else None,
        )
    counts = {
        "stats": lambda: store.template_stats(),
        "tenant stats": lambda: store.template_stats(1),
        "missing": lambda: store.count_missing_embeddings(VERSION, "m"),
        "mapless": lambda: store.count_missing_embeddings(VERSION, "m", mapless=True),
        "other models": lambda: store.count_other_models("m"),
        "to reprotect": lambda: store.count_to_reprotect("none", {}, "m"),
    }
    for name, call in counts.items():
        plans = _plans(store, call)
        assert plans and all("COVERING INDEX" in p for p in plans), (name, plans)
    # The batch loops read the maps they return, nothing else: an index range in id order.
    loops = {
        "embed": lambda: store.missing_embeddings(VERSION, "m", batch=1),
        "reprotect": lambda: store.to_reprotect("none", {}, "m", batch=1),
    }
    for name, call in loops.items():
        (plan,) = _plans(store, call)
        assert "USING INDEX ix_templates_meta (model_version=? AND id>?)" in plan, (name, plan)
        assert "TEMP B-TREE" not in plan, (name, plan)
    assert store.count_missing_embeddings(VERSION, "m") == 2
    assert store.template_stats(1)["templates"] == 4
    store.close()


def _sqlite_indexes(url: str) -> set[str]:
    store = Store(url)
    with store.engine.connect() as conn:
        names = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='index'"))
    store.close()
    return {n for (n,) in names}


def test_existing_sqlite_databases_gain_the_indexes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    url, path = f"sqlite:///{tmp_path / 's.db'}", tmp_path / "s.db"
    assert {"ix_templates_meta", "ix_templates_tenant_meta"} <= _sqlite_indexes(url)
    with sqlite3.connect(path) as raw:  # a database of an earlier version
        raw.execute("DROP INDEX ix_templates_meta")
        raw.execute("DROP INDEX ix_templates_tenant_meta")
    # Another process holds the write lock (building the indexes): start without them.
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    try:
        store = Store(url, timeout=0.2)
        assert "indexing the templates" in caplog.text
        assert store.count_templates() == 0  # works, just without the indexes
        store.close()
    finally:
        raw.execute("ROLLBACK")
        raw.close()
    assert {"ix_templates_meta", "ix_templates_tenant_meta"} <= _sqlite_indexes(url)


# -- 4. tenant transforms are created once ----------------------------------------------------


def test_transform_seed_is_never_replaced_by_a_concurrent_creation(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 's.db'}", keys=MASTER)
    store.create_key("acme")
    store.create_key("globex")
    seed = store.transform_seed(1)
    with store.transaction() as s:
        assert store.ensure_transform_seed(s, 1) == (seed, False)
        fresh, created = store.ensure_transform_seed(s, 2)
    assert created and store.transform_seed(2) == fresh != seed
    with store.transaction() as s:  # a rekey does replace it
        rekeyed = store.new_transform_seed(s, 1)
    assert store.transform_seed(1) == rekeyed != seed
    store.close()


@pytest.mark.postgres
def test_workers_starting_together_keep_one_tenant_transform(
    vec_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear, a, b = Store(vec_url), Store(vec_url, keys=MASTER), Store(vec_url, keys=MASTER)
    try:
        clear.create_key("acme")
        PgVectorIndex(clear, DIM, VERSION)  # vectors written in clear (before encryption)
        clear.create_subject(1, "ann")
        vecs = _vecs(6, 5)
        ids = _enroll(clear, 1, "ann", vecs)
        first: dict[str, PgVectorIndex] = {}
        ensure = b.ensure_transform_seed

        def late(s: Any, tenant: int) -> tuple[bytes, bool]:
            # b listed the tenant as untransformed; a moves it (and searches) before b goes on.
            if not first:
                first["a"] = PgVectorIndex(a, DIM, VERSION, transforms=TenantTransforms(a, DIM))
                first["a"].search(1, vecs[0], 1)  # caches Q_t
            return ensure(s, tenant)

        monkeypatch.setattr(b, "ensure_transform_seed", late)
        idx_b = PgVectorIndex(b, DIM, VERSION, transforms=TenantTransforms(b, DIM))
        idx_a = first["a"]
        assert np.array_equal(orthogonal(b.transform_seed(1), DIM), idx_a.transforms.matrix(1))
        for idx in (idx_a, idx_b):  # both workers' transforms fit the stored vectors
            for i in (1, 4):
                hit = idx.search(1, vecs[i], 1)[0]
                assert hit.template_id == ids[i] and hit.score == pytest.approx(1.0, abs=1e-4)
    finally:
        for st in (clear, a, b):
            st.close()


class _Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


class _FailingStore:
    """Just enough of a store for ``_ensure_schema``: CREATE EXTENSION fails."""

    def __init__(self, sqlstate: str | None) -> None:
        self.engine = self
        self.sqlstate = sqlstate

    @contextmanager
    def begin(self) -> Iterator[Any]:
        yield self

    def execute(self, *_: Any) -> Any:
        raise OperationalError("CREATE EXTENSION IF NOT EXISTS vector", {}, _Orig(self.sqlstate))


@pytest.mark.parametrize("sqlstate", ["58P01", "42501", "0A000"])
def test_missing_pgvector_falls_back(sqlstate: str) -> None:
    with pytest.raises(PgVectorUnavailable, match="pgvector"):
        dbindex._ensure_schema(_FailingStore(sqlstate), DIM)  # type: ignore[arg-type]


@pytest.mark.parametrize("sqlstate", ["08006", "57P01", "53300", None])
def test_transient_errors_are_not_a_missing_pgvector(sqlstate: str | None) -> None:
    with pytest.raises(OperationalError) as caught:
        dbindex._ensure_schema(_FailingStore(sqlstate), DIM)  # type: ignore[arg-type]
    assert not isinstance(caught.value, PgVectorUnavailable)


@pytest.mark.postgres
def test_an_unknown_extension_gives_the_missing_extension_sqlstate(vec_url: str) -> None:
    from sqlalchemy.exc import DBAPIError

    store = Store(vec_url)
    try:
        with pytest.raises(DBAPIError) as caught, store.engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS advface_no_such_extension"))
        assert dbindex._sqlstate(caught.value) in dbindex._NO_EXTENSION
    finally:
        store.close()


# -- 5. enrollment racing the subject's deletion ----------------------------------------------


def _delete_after_lookup(store: Store, url: str) -> None:
    """The next enrollment's subject is deleted (by another worker) right after it was
    looked up, before the template row is written."""
    other = Store(url, keys=store.keys)
    lookup = Store._subject

    def racing(s: Any, tenant_id: int, subject_id: str) -> Any:
        subj = lookup(s, tenant_id, subject_id)
        del store._subject  # once
        other.delete_subject(tenant_id, subject_id)
        other.close()
        return subj

    store._subject = racing  # type: ignore[method-assign]


@pytest.mark.parametrize("keys", [None, MASTER], ids=["clear", "encrypted"])
@pytest.mark.parametrize("idempotency_key", [None, "k-1"])
def test_enrolling_into_a_subject_being_deleted_is_not_found(
    db_url: str, keys: Any, idempotency_key: str | None
) -> None:
    store = Store(db_url, keys=keys)
    try:
        store.create_key("acme")
        store.create_subject(1, "ann")
        _delete_after_lookup(store, db_url)
        with pytest.raises(NotFound, match="ann"):
            _enroll_one(store, idempotency_key)
        assert not store.subject_exists(1, "ann") and store.count_templates() == 0
        store.create_subject(1, "ann")  # nothing was left behind: enrolling works again
        assert _enroll_one(store, idempotency_key)[1]
    finally:
        store.close()


def _enroll_one(store: Store, idempotency_key: str | None) -> Any:
    return store.add_template(
        1,
        "ann",
        b"x",
        protection="none",
        protection_params={},
        model_version="m",
        request_sha256="r",
        idempotency_key=idempotency_key,
        embedding=(VERSION, _vecs(1, 9)[0]),
    )


def test_enroll_api_answers_404_when_the_subject_is_deleted_meanwhile(
    harness: Harness, db_url: str
) -> None:
    harness.subject("ann")
    _delete_after_lookup(harness.store, db_url)
    r = harness.enroll("ann", feature_map(1), **{"Idempotency-Key": "retry-1"})
    assert_error(r, 404, "unknown_subject")
    assert harness.state() == (0, 0)
