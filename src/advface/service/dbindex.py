"""Indexes kept in the database: pgvector HNSW, and an exact scan where pgvector is missing.

Both read the embeddings the store writes in the enrollment transaction, so every worker on
the same database sees the same gallery with no synchronisation of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from advface.service.index import Hit, VectorIndex, _check_k, _unit
from advface.service.settings import PGVECTOR_MAX_EF_SEARCH
from advface.service.store import Store, VectorRow
from advface.service.transform import TenantTransforms, orthogonal

log = logging.getLogger("advface.service")


class PgVectorUnavailable(ValueError):
    """The PostgreSQL server has no pgvector extension (or it cannot be created)."""


class _DbIndex(VectorIndex):
    """Shared add/remove/count: the entries are the store's ``version`` embeddings."""

    in_database = True

    def __init__(self, store: Store, dim: int, version: str) -> None:
        self.store, self.dim, self.version = store, dim, version

    def add(self, tenant_id: int, items: Sequence[tuple[str, str, Any]]) -> None:
        # Entries are stored embeddings of existing templates: the tenant and subject come
        # from the template row, ids of unknown templates are ignored.
        vecs = [(t, _unit(v, self.dim)) for t, _, v in items]
        self.store.put_embeddings(self.version, vecs)

    def remove(self, template_ids: Iterable[str]) -> int:
        return self.store.delete_embeddings(self.version, list(template_ids))

    def count(self, tenant_id: int | None = None) -> int:
        return self.store.count_embeddings(self.version, tenant_id)


class SqlExactIndex(_DbIndex):
    """Exact cosine over the tenant's stored embeddings, read from the database per query.

    O(templates of the tenant) per identification - the fallback for PostgreSQL servers
    without pgvector, correct with any number of workers but slow for large galleries.
    """

    def search(self, tenant_id: int, probe: Any, k: int) -> list[Hit]:
        _check_k(k)
        q = _unit(probe, self.dim)
        rows = list(self.store.iter_embeddings(self.version, tenant_id))
        if not rows:
            return []
        scores = np.stack([r.vector for r in rows]) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(rows[i].template_id, rows[i].subject_id, float(scores[i])) for i in order]


def _literal(v: np.ndarray) -> str:
    return "[" + ",".join(map(repr, v.astype(np.float32).tolist())) + "]"


class PgVectorIndex(_DbIndex):
    """pgvector: ``template_vectors`` with an HNSW index (``vector_cosine_ops``).

    Rows reference their ``template_embeddings`` row (ON DELETE CASCADE), so deleting a
    template or an embedding version removes its vector in the same transaction. The tenant and
    version filter is part of the index query; with pgvector >= 0.8 an iterative scan keeps
    going until ``k`` rows pass the filter.

    With ``transforms`` (encryption on) the column holds ``Q_t e``, not the embedding ``e``,
    and probes are searched as ``Q_t probe`` (``transform``): the same scores.
    """

    def __init__(
        self,
        store: Store,
        dim: int,
        version: str,
        *,
        ef_search: int = 256,
        backfill: bool = True,
        transforms: TenantTransforms | None = None,
    ) -> None:
        if not 1 <= ef_search <= PGVECTOR_MAX_EF_SEARCH:
            raise ValueError(
                f"the pgvector index takes ef_search 1..{PGVECTOR_MAX_EF_SEARCH} "
                f"(ADVFACE_INDEX_EF_SEARCH), got {ef_search}"
            )
        super().__init__(store, dim, version)
        self.ef_search, self.transforms = ef_search, transforms
        self.pgvector_version = _ensure_schema(store, dim)
        major, minor = (int(x) for x in self.pgvector_version.split(".")[:2])
        self.iterative = (major, minor) >= (0, 8)
        # Without an iterative scan a search returns at most ef_search rows (of every tenant,
        # before the tenant filter), and ef_search stops at pgvector's limit.
        self.max_search_k = None if self.iterative else PGVECTOR_MAX_EF_SEARCH
        store.vector_writer = self.write
        if transforms is not None:
            self.transform_clear_vectors()
        if backfill:
            self.backfill()

    def write(self, s: Session, rows: list[VectorRow]) -> None:
        """Insert the vectors of ``rows`` of this version (called in the store's transaction)."""
        mine = [r for r in rows if r[2] == self.version]
        if not mine:
            return
        s.execute(
            text(
                "INSERT INTO template_vectors (template_id, version, tenant_id, embedding) "
                "VALUES (:t, :v, :n, CAST(:e AS vector)) ON CONFLICT (template_id, version) "
                "DO UPDATE SET embedding = EXCLUDED.embedding"
            ),
            [{"t": t, "v": v, "n": n, "e": _literal(self._moved(n, e))} for t, n, v, e in mine],
        )

    def _moved(self, tenant_id: int, v: np.ndarray) -> np.ndarray:
        return v if self.transforms is None else self.transforms.apply(tenant_id, v)

    def transform_clear_vectors(self) -> int:
        """Move the vectors of tenants that have no transform yet (written in clear, before
        encryption or this version) under a new one; returns how many tenants."""
        sql = text(
            "SELECT DISTINCT v.tenant_id FROM template_vectors v WHERE NOT EXISTS "
            "(SELECT 1 FROM tenant_transforms t WHERE t.tenant_id = v.tenant_id)"
        )
        with self.store.transaction() as s:
            tenants = [int(t) for t in s.scalars(sql)]
        moved = 0
        for tenant in tenants:
            try:
                with self.store.transaction() as s:
                    # Only where no seed exists yet: a worker starting at the same time may
                    # have created one (and moved the vectors) since the list was read, and
                    # replacing it would leave its cached transform stale.
                    seed, created = self.store.ensure_transform_seed(s, tenant)
                    if created:
                        retransform_vectors(s, self.store, tenant, seed)
                        moved += 1
            except IntegrityError:  # another worker moved them first
                continue
        return moved

    def backfill(self, batch: int = 1000) -> int:
        """Vectors for stored embeddings that have none (pgvector installed after the fact)."""
        sql = text(
            "SELECT e.template_id FROM template_embeddings e "
            "WHERE e.version = :v AND e.template_id > :a AND NOT EXISTS (SELECT 1 FROM "
            "template_vectors x WHERE x.template_id = e.template_id AND x.version = e.version) "
            "ORDER BY e.template_id LIMIT :n"
        )
        done, after = 0, ""
        while True:
            with self.store.transaction() as s:
                ids = list(s.scalars(sql, {"v": self.version, "a": after, "n": batch}))
                if not ids:
                    return done
                after = ids[-1]
                # Through the store: the stored embeddings may be encrypted.
                rows = self.store.embeddings_of(self.version, ids)
                self.write(s, [(e.template_id, e.tenant_id, self.version, e.vector) for e in rows])
                done += len(rows)

    def search_ef(self, k: int) -> int:
        """``hnsw.ef_search`` of a top-``k`` search: at least ``k`` candidates, within what
        pgvector accepts (an iterative scan returns more than ef_search rows)."""
        return min(max(int(k), self.ef_search), PGVECTOR_MAX_EF_SEARCH)

    def search(self, tenant_id: int, probe: Any, k: int) -> list[Hit]:
        _check_k(k)
        q = _literal(self._moved(tenant_id, _unit(probe, self.dim)))
        sql = text(
            "SELECT v.template_id, s.subject_id, v.dist FROM ("
            " SELECT template_id, embedding <=> CAST(:q AS vector) AS dist FROM template_vectors"
            " WHERE tenant_id = :t AND version = :v"
            " ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k) v"
            " JOIN templates t ON t.id = v.template_id JOIN subjects s ON s.id = t.subject_pk"
            " ORDER BY v.dist, v.template_id"
        )
        with self.store.transaction() as s:
            # SET LOCAL: per transaction, so pooled connections keep the server defaults.
            s.execute(text(f"SET LOCAL hnsw.ef_search = {self.search_ef(k)}"))
            if self.iterative:
                s.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
            rows = s.execute(sql, {"q": q, "t": tenant_id, "v": self.version, "k": k}).all()
        return [Hit(t, sid, float(1.0 - d)) for t, sid, d in rows]


def retransform_vectors(
    s: Session, store: Store, tenant_id: int, seed: bytes, *, batch: int = 1000
) -> int:
    """Rewrite the tenant's ``template_vectors`` rows as ``Q e`` for the ``Q`` of ``seed``,
    from the stored (sealed) embeddings, in the caller's transaction ``s``. 0 where the
    database has no pgvector table (SQLite, exact scan)."""
    if not inspect(s.connection()).has_table("template_vectors"):
        return 0
    rows = s.execute(
        text("SELECT template_id, version FROM template_vectors WHERE tenant_id = :n"),
        {"n": tenant_id},
    ).all()
    by_version: dict[str, list[str]] = {}
    for tid, version in rows:
        by_version.setdefault(version, []).append(tid)
    update = text(
        "UPDATE template_vectors SET embedding = CAST(:e AS vector) "
        "WHERE template_id = :t AND version = :v"
    )
    done, q = 0, None
    for version, ids in by_version.items():
        for i in range(0, len(ids), batch):
            rows = store.embeddings_of(version, ids[i : i + batch])
            if not rows:
                continue
            q = orthogonal(seed, len(rows[0].vector)) if q is None else q
            params = [{"e": _literal(q @ e.vector), "t": e.template_id, "v": version} for e in rows]
            s.execute(update, params)
            done += len(rows)
    return done


# SQLSTATEs of CREATE EXTENSION meaning the server cannot give this database pgvector: no
# control or library file (58P01), not allowed to create it (42501), extension not offered by
# the (managed) server (0A000).
_NO_EXTENSION = frozenset({"58P01", "42501", "0A000"})
# Two sessions creating the extension at once: the loser gets a unique violation.
_CONCURRENT_CREATE = frozenset({"23505", "42710"})


def _sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE of a driver error (psycopg 3 ``sqlstate``, psycopg2 ``pgcode``)."""
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def _has_extension(store: Store) -> bool:
    with store.engine.connect() as conn:
        sql = text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        return conn.execute(sql).scalar() is not None


def _ensure_schema(store: Store, dim: int) -> str:
    """Create the extension, table and HNSW index if needed; return pgvector's version."""
    try:
        with store.engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
    except DBAPIError as exc:
        state = _sqlstate(exc)
        if state in _CONCURRENT_CREATE and _has_extension(store):
            pass  # another worker created it at the same moment
        elif state in _NO_EXTENSION:
            raise PgVectorUnavailable(
                "PostgreSQL has no usable pgvector extension (CREATE EXTENSION vector failed: "
                f"{type(exc.orig).__name__}). Install pgvector on the server (e.g. the "
                "postgresql-NN-pgvector package) and have the database owner run CREATE "
                "EXTENSION vector, or set --vector-index exact (slow exact scan)."
            ) from None
        else:
            raise  # a lost connection, a timeout...: no reason to run without pgvector
    with store.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS template_vectors ("
                f"template_id VARCHAR(32) NOT NULL, version VARCHAR(128) NOT NULL, "
                f"tenant_id INTEGER NOT NULL, embedding vector({int(dim)}) NOT NULL, "
                f"PRIMARY KEY (template_id, version), FOREIGN KEY (template_id, version) "
                f"REFERENCES template_embeddings (template_id, version) ON DELETE CASCADE)"
            )
        )
        have = conn.execute(
            text(
                "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'template_vectors'::regclass"
                " AND attname = 'embedding'"
            )
        ).scalar()
        if have is not None and int(have) != dim:
            raise ValueError(
                f"template_vectors holds {have}-d vectors, this model gives {dim}-d: drop the "
                "table (it is rebuilt from template_embeddings) after re-embedding"
            )
        conn.execute(
            text(
                "CREATE INDEX IF NOT EXISTS ix_template_vectors_hnsw ON template_vectors "
                "USING hnsw (embedding vector_cosine_ops)"
            )
        )
        conn.execute(
            text(
                "CREATE INDEX IF NOT EXISTS ix_template_vectors_tenant "
                "ON template_vectors (tenant_id, version)"
            )
        )
        return str(
            conn.execute(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).scalar()
        )
