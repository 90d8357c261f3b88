"""Vector indexes for identification (1:N): top-k templates by cosine, one tenant at a time.

``VectorIndex`` is the interface; implementations:

- ``HnswIndex``: in-process HNSW graphs (usearch), one per tenant, so a query only ever walks
  its own tenant's graph. Used with SQLite; the service keeps it equal to the database through
  the change log (``core.IndexSync``).
- ``ExactIndex``: in-process brute force; the reference the tests measure recall against.
- ``PgVectorIndex``: PostgreSQL + pgvector, an HNSW index (cosine) in the database itself,
  written in the same transaction as the template; the tenant filter is in the query.
- ``SqlExactIndex``: exact scan of the stored embeddings, for PostgreSQL without pgvector.

Vectors are L2-normalised float32; scores are cosine similarities.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Hit:
    """One template found by a search."""

    template_id: str
    subject_id: str
    score: float


class VectorIndexError(ValueError):
    """Bad input to an index (wrong dimension, non-finite vector, bad k)."""


def _unit(vector: Any, dim: int) -> np.ndarray:
    v = np.asarray(vector, np.float32).reshape(-1)
    if v.shape[0] != dim:
        raise VectorIndexError(f"vector has {v.shape[0]} dimensions, the index {dim}")
    if not np.isfinite(v).all():
        raise VectorIndexError("vector has non-finite values")
    n = float(np.linalg.norm(v))
    if n == 0.0:
        raise VectorIndexError("zero vector has no direction")
    return v / n


def _check_k(k: int) -> None:
    if k < 1:
        raise VectorIndexError(f"k must be >= 1, got {k}")


class VectorIndex(ABC):
    """Top-k cosine search over (template, subject, vector) entries, isolated per tenant."""

    dim: int
    #: True when entries live in the database and are written by the store's own
    #: transactions (``Store.vector_writer``); False for in-process indexes to be synced.
    in_database: bool = False
    #: The most hits one search can return (a wider search finds nothing more); None: no
    #: limit but the tenant's entries.
    max_search_k: int | None = None

    @abstractmethod
    def add(self, tenant_id: int, items: Sequence[tuple[str, str, Any]]) -> None:
        """Add (or replace) ``(template_id, subject_id, vector)`` entries of one tenant."""

    @abstractmethod
    def remove(self, template_ids: Iterable[str]) -> int:
        """Remove entries by template id (unknown ids are ignored); returns how many."""

    @abstractmethod
    def search(self, tenant_id: int, probe: Any, k: int) -> list[Hit]:
        """The ``k`` templates of ``tenant_id`` most similar to ``probe``, best first."""

    @abstractmethod
    def count(self, tenant_id: int | None = None) -> int:
        """Entries of one tenant, or of all."""

    def clear(self) -> None:  # noqa: B027 - optional: only in-process indexes reload
        """Drop every entry (in-process indexes; a full reload follows)."""


def top_subjects(index: VectorIndex, tenant_id: int, probe: Any, k: int) -> list[Hit]:
    """Top-k *subjects* by their best template: searches wider until k distinct subjects, until
    the tenant's templates are exhausted (a search returning fewer than asked for), or until
    the index's ``max_search_k`` (then the subjects found so far)."""
    _check_k(k)
    cap = index.max_search_k
    want = 4 * k if cap is None else min(4 * k, cap)
    while True:
        best: dict[str, Hit] = {}
        hits = index.search(tenant_id, probe, want)
        for h in hits:
            if h.subject_id not in best:
                best[h.subject_id] = h
        if len(best) >= k or len(hits) < want or want == cap:
            return list(best.values())[:k]
        want = 4 * want if cap is None else min(4 * want, cap)


class _RWLock:
    """Many concurrent searches, or one writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Graph:
    index: Any
    ids: dict[int, tuple[str, str]] = field(default_factory=dict)  # key -> (template, subject)


class HnswIndex(VectorIndex):
    """usearch HNSW, one graph per tenant (cosine, float32).

    ``connectivity`` (M), ``expansion_add`` (efConstruction) and ``expansion_search`` (ef)
    trade build time and memory for recall; the defaults give recall@1 close to 1.0 on
    512-d face embeddings (``benchmarks/index_bench.py``).
    """

    def __init__(
        self,
        dim: int,
        *,
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 256,
    ) -> None:
        if dim < 1:
            raise VectorIndexError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self._params = {
            "connectivity": connectivity,
            "expansion_add": expansion_add,
            "expansion_search": expansion_search,
        }
        self._graphs: dict[int, _Graph] = {}
        self._where: dict[str, tuple[int, int]] = {}  # template id -> (tenant, key)
        self._next_key = 0
        self._lock = _RWLock()

    def _graph(self, tenant_id: int) -> _Graph:
        g = self._graphs.get(tenant_id)
        if g is None:
            from usearch.index import Index

            g = _Graph(Index(ndim=self.dim, metric="cos", dtype="f32", **self._params))
            self._graphs[tenant_id] = g
        return g

    def add(self, tenant_id: int, items: Sequence[tuple[str, str, Any]]) -> None:
        if not items:
            return
        vecs = np.stack([_unit(v, self.dim) for _, _, v in items])  # validate all first
        with self._lock.write():
            self._remove_locked([t for t, _, _ in items])
            g = self._graph(tenant_id)
            keys = np.arange(self._next_key, self._next_key + len(items), dtype=np.uint64)
            self._next_key += len(items)
            g.index.add(keys, vecs)
            for key, (tid, sid, _) in zip(keys.tolist(), items, strict=True):
                g.ids[key] = (tid, sid)
                self._where[tid] = (tenant_id, key)

    def _remove_locked(self, template_ids: Iterable[str]) -> int:
        n = 0
        for tid in template_ids:
            where = self._where.pop(tid, None)
            if where is None:
                continue
            g = self._graphs[where[0]]
            g.index.remove(where[1])
            del g.ids[where[1]]
            n += 1
        return n

    def remove(self, template_ids: Iterable[str]) -> int:
        with self._lock.write():
            return self._remove_locked(list(template_ids))

    def search(self, tenant_id: int, probe: Any, k: int) -> list[Hit]:
        _check_k(k)
        q = _unit(probe, self.dim)
        with self._lock.read():
            g = self._graphs.get(tenant_id)
            if g is None or not g.ids:
                return []
            m = g.index.search(q, min(k, len(g.ids)))
            return [
                Hit(*g.ids[int(key)], float(1.0 - d))
                for key, d in zip(m.keys, m.distances, strict=True)
                if int(key) in g.ids  # defensive: a removed key is never reported
            ]

    def count(self, tenant_id: int | None = None) -> int:
        with self._lock.read():
            if tenant_id is None:
                return len(self._where)
            g = self._graphs.get(tenant_id)
            return 0 if g is None else len(g.ids)

    def clear(self) -> None:
        with self._lock.write():
            self._graphs.clear()
            self._where.clear()

    def set_expansion_search(self, ef: int) -> None:
        """Search breadth (ef) of every graph: higher is more recall, more latency."""
        if ef < 1:
            raise VectorIndexError(f"expansion_search must be >= 1, got {ef}")
        with self._lock.write():
            self._params["expansion_search"] = ef
            for g in self._graphs.values():
                g.index.expansion_search = ef

    def memory_bytes(self) -> int:
        """Bytes held by the graphs and vectors (usearch's own accounting)."""
        with self._lock.read():
            return sum(int(g.index.memory_usage) for g in self._graphs.values())

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the graphs, the key maps and ``extra`` to a new ``folder`` (owner-only files:
        they hold the embeddings); restored by :meth:`load`."""
        folder = Path(folder)
        folder.mkdir(parents=True, mode=0o700)
        meta: dict[str, Any] = {"dim": self.dim, "params": self._params, "tenants": {}}
        meta["extra"] = extra or {}
        with self._lock.read():
            for tenant, g in self._graphs.items():
                g.index.save(str(folder / f"tenant-{tenant}.usearch"))
                meta["tenants"][str(tenant)] = [[k, t, s] for k, (t, s) in g.ids.items()]
            meta["next_key"] = self._next_key
        (folder / "meta.json").write_text(json.dumps(meta))
        for f in folder.iterdir():
            f.chmod(0o600)

    @staticmethod
    def saved_extra(folder: str | Path) -> dict[str, Any]:
        """The ``extra`` a saved index was written with (reads the metadata only)."""
        meta = json.loads((Path(folder) / "meta.json").read_text())
        extra = meta.get("extra", {}) if isinstance(meta, dict) else None
        if not isinstance(extra, dict):
            raise ValueError(f"{folder}/meta.json is not an index snapshot's")
        return dict(extra)

    @classmethod
    def load(cls, folder: str | Path, *, view: bool = False) -> HnswIndex:
        """Restore a saved index; ``view=True`` memory-maps the graphs instead of reading them
        (fast start, read-only: adds and removes are then refused by usearch)."""
        from usearch.index import Index

        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        # A damaged snapshot is a ValueError (the service then rebuilds from the database).
        try:
            idx = cls(int(meta["dim"]), **meta["params"])
            for tenant_s, rows in meta["tenants"].items():
                tenant = int(tenant_s)
                path = folder / f"tenant-{tenant}.usearch"
                restored = Index.restore(str(path), view=view) if path.is_file() else None
                if restored is None:
                    raise ValueError(f"{path} is missing or not a usearch index")
                g = _Graph(restored)
                g.index.expansion_search = meta["params"]["expansion_search"]
                for key, tid, sid in rows:
                    g.ids[int(key)] = (tid, sid)
                    idx._where[tid] = (tenant, int(key))
                idx._graphs[tenant] = g
            idx._next_key = int(meta["next_key"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{folder}/meta.json is not an index snapshot's: {exc!r}") from exc
        return idx

    def replace_with(self, other: HnswIndex) -> None:
        """Take over ``other``'s entries (a restored snapshot) in place."""
        if other.dim != self.dim:
            raise VectorIndexError(f"snapshot has {other.dim} dimensions, the index {self.dim}")
        with self._lock.write():
            self._graphs, self._where = other._graphs, other._where
            self._next_key = other._next_key
            for g in self._graphs.values():
                g.index.expansion_search = self._params["expansion_search"]


class ExactIndex(VectorIndex):
    """Brute-force cosine search in memory: exact, O(n) per query (the recall reference)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._rows: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
        self._tenant_of: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, tenant_id: int, items: Sequence[tuple[str, str, Any]]) -> None:
        rows = [(t, s, _unit(v, self.dim)) for t, s, v in items]
        with self._lock:
            for tid, sid, v in rows:
                self._remove_one(tid)
                self._rows.setdefault(tenant_id, {})[tid] = (sid, v)
                self._tenant_of[tid] = tenant_id

    def _remove_one(self, tid: str) -> bool:
        tenant = self._tenant_of.pop(tid, None)
        if tenant is None:
            return False
        del self._rows[tenant][tid]
        return True

    def remove(self, template_ids: Iterable[str]) -> int:
        with self._lock:
            return sum(self._remove_one(t) for t in list(template_ids))

    def search(self, tenant_id: int, probe: Any, k: int) -> list[Hit]:
        _check_k(k)
        q = _unit(probe, self.dim)
        with self._lock:
            rows = list(self._rows.get(tenant_id, {}).items())
        if not rows:
            return []
        scores = np.stack([v for _, (_, v) in rows]) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(rows[i][0], rows[i][1][0], float(scores[i])) for i in order]

    def count(self, tenant_id: int | None = None) -> int:
        with self._lock:
            if tenant_id is None:
                return len(self._tenant_of)
            return len(self._rows.get(tenant_id, {}))

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._tenant_of.clear()
