"""The service's shared state: store, networks, protection and the vector index."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advface.service import payload
from advface.service.backend import Backend
from advface.service.database import sqlite_path
from advface.service.index import Hit, HnswIndex, VectorIndex, top_subjects
from advface.service.schemas import TemplateOut
from advface.service.settings import ServiceSettings
from advface.service.store import Embedded, Store

log = logging.getLogger("advface.service")


def embed_missing(
    store: Store,
    backend: Backend,
    *,
    batch: int = 32,
    lock: threading.Lock | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Compute and store the embeddings of templates that have none for this Psi version.

    Each batch is its own transaction, so an interrupted run resumes where it stopped. Only
    templates of this E (``model_version``) are embedded. Returns ``(embedded, corrupt)``.
    """
    version, done, corrupt, after = backend.embedding_version, 0, 0, ""
    while rows := store.missing_embeddings(version, backend.version, after, batch):
        after = rows[-1][0]
        ids, maps = [], []
        for tid, blob in rows:
            try:
                maps.append(payload.decode(blob, expected_shape=backend.feature_shape))
                ids.append(tid)
            except payload.PayloadError:
                log.error("stored template %s is corrupt; skipped", tid)
                corrupt += 1
        if ids:
            z = torch.from_numpy(np.stack(maps))
            if lock is None:
                emb = backend.embed(z).numpy()
            else:
                with lock:
                    emb = backend.embed(z).numpy()
            done += store.put_embeddings(version, list(zip(ids, emb, strict=True)))
        if on_batch is not None:
            on_batch(len(rows))
    return done, corrupt


def encode_stored(zp: np.ndarray, codec: str = "float16") -> bytes:
    """Storage encoding of a protected map in ``codec`` (``ServiceSettings.storage_codec``):
    float16 (float32 where values exceed its range), float32, uint8, or b"" for
    embeddings-only (no map kept)."""
    if codec == "embeddings-only":
        return b""
    if codec != "float16":
        return payload.encode(zp, dtype=codec)
    try:
        return payload.encode(zp, dtype="float16")
    except ValueError:
        return payload.encode(zp, dtype="float32")


def stored_map(blob: bytes, zp: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The map as a later read of ``blob`` gives it (``zp`` itself when no map is kept): the
    embedding is computed from this, so a start-up rebuild gives the same scores."""
    return zp if not blob else payload.decode(blob, expected_shape=shape)


def public_params(protection: Any) -> dict[str, Any]:
    """What a template records of its protection and tenants may read: name, settings and
    network fingerprints (the version), never server paths or training details."""
    params = dict(protection.params()) if hasattr(protection, "params") else {}
    return {k: v for k, v in params.items() if not k.endswith(("_path", "_config"))}


def reprotect(
    store: Store,
    backend: Backend,
    protection: Any,
    *,
    batch: int = 32,
    codec: str = "float16",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Re-protect stored templates whose protection differs from ``protection``; the new maps
    are stored in ``codec``. Templates stored as embeddings only have no map and are left.

    The stored map is already protected (the clear map was never kept), so the new protection
    is applied on top of it. Each batch is one transaction and migrated rows no longer match,
    so an interrupted run resumes. Returns ``(migrated, corrupt)``.
    """
    name, params = str(protection.name), public_params(protection)
    version, done, corrupt, after = backend.embedding_version, 0, 0, ""
    while rows := store.to_reprotect(name, params, backend.version, after, batch):
        after = rows[-1][0]
        items = []
        for tid, blob in rows:
            try:
                z = payload.decode(blob, expected_shape=backend.feature_shape)
            except payload.PayloadError:
                log.error("stored template %s is corrupt; not migrated", tid)
                corrupt += 1
                continue
            zp = protection.protect(torch.from_numpy(z)[None])[0].numpy()
            new = encode_stored(zp, codec)
            stored = stored_map(new, zp, backend.feature_shape)
            items.append((tid, new, backend.embed(torch.from_numpy(stored)[None])[0].numpy()))
        if items:
            done += store.replace_protected(items, protection=name, params=params, version=version)
        if on_batch is not None:
            on_batch(len(rows))
    return done, corrupt


def _add_grouped(index: VectorIndex, rows: Iterable[Embedded], chunk: int = 4096) -> int:
    """Add embeddings to ``index`` in per-tenant chunks (batched HNSW inserts)."""
    pending: dict[int, list[tuple[str, str, np.ndarray]]] = defaultdict(list)
    n = 0
    for r in rows:
        items = pending[r.tenant_id]
        items.append((r.template_id, r.subject_id, r.vector))
        n += 1
        if len(items) >= chunk:
            index.add(r.tenant_id, items)
            pending[r.tenant_id] = []
    for tenant, items in pending.items():
        index.add(tenant, items)
    return n


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between worker processes (saving/restoring one snapshot)."""
    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class IndexSync:
    """Keeps an in-process index equal to a SQLite database by replaying its change log.

    Every worker process holds its own index; before each search it reads the log's last
    ``seq`` (one indexed query) and applies what other workers (or ``advface reembed``)
    committed since. A worker that fell behind a pruned log reloads everything.

    With ``snapshot`` (a folder beside the database), start-up restores the HNSW graphs saved
    there and replays the log from the snapshot's ``seq`` instead of rebuilding them; the
    snapshot is written after a rebuild and at shutdown.
    """

    def __init__(
        self,
        store: Store,
        index: VectorIndex,
        version: str,
        keep: int = 100_000,
        snapshot: Path | None = None,
    ) -> None:
        self.store, self.index, self.version, self.keep = store, index, version, keep
        self.snapshot = snapshot if isinstance(index, HnswIndex) else None
        self.seq = 0
        self.saved_seq = -1
        self.loaded_from = ""  # "snapshot" or "database", after reload()
        self._lock = threading.Lock()

    def reload(self) -> int:
        """Fill the index: from the snapshot plus the log since, else from the database."""
        with self._lock:
            if self._restore_locked():
                self.loaded_from = "snapshot"
                self._catch_up_locked()
            else:
                self.loaded_from = "database"
                self._reload_locked()
                self._save_locked()
            return self.index.count()

    def _reload_locked(self) -> int:
        # The log position is read first: whatever commits while we load is replayed again
        # later, and replaying is idempotent (remove, then add what the database has).
        _, hi = self.store.change_bounds()
        self.index.clear()
        n = _add_grouped(self.index, self.store.iter_embeddings(self.version))
        self.seq = hi
        return n

    def _snapshot_key(self) -> dict[str, Any]:
        return {"log_id": self.store.change_log_id(), "version": self.version}

    def _restore_locked(self) -> bool:
        if self.snapshot is None or not (self.snapshot / "meta.json").exists():
            return False
        assert isinstance(self.index, HnswIndex)
        try:
            with _file_lock(self.snapshot):
                extra = HnswIndex.saved_extra(self.snapshot)
                seq = int(extra.get("seq", -1))
                lo, hi = self.store.change_bounds()
                # Same database and Psi, and the log still holds everything after ``seq``.
                if {k: extra.get(k) for k in ("log_id", "version")} != self._snapshot_key():
                    return False
                if not (0 <= seq <= hi and lo <= seq + 1):
                    return False
                loaded = HnswIndex.load(self.snapshot)
            self.index.replace_with(loaded)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("index snapshot unusable (%s); rebuilding", type(exc).__name__)
            return False
        self.seq = self.saved_seq = seq
        return True

    def _save_locked(self) -> None:
        if self.snapshot is None or self.seq == self.saved_seq:
            return
        assert isinstance(self.index, HnswIndex)
        tmp = self.snapshot.with_name(f"{self.snapshot.name}.tmp-{os.getpid()}")
        old = self.snapshot.with_name(f"{self.snapshot.name}.old-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            self.index.save(tmp, extra={**self._snapshot_key(), "seq": self.seq})
            with _file_lock(self.snapshot):  # readers never see a half-written folder
                if self.snapshot.exists():
                    os.replace(self.snapshot, old)
                os.replace(tmp, self.snapshot)
            shutil.rmtree(old, ignore_errors=True)
            self.saved_seq = self.seq
        except OSError as exc:  # a snapshot only saves start-up time: never fail for it
            log.warning("could not save the index snapshot: %s", exc)
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self) -> None:
        """Write the snapshot if the index changed since the last one (shutdown)."""
        with self._lock:
            self._catch_up_locked()
            self._save_locked()

    def catch_up(self) -> int:
        """Apply the changes committed since the last call; returns how many were read."""
        with self._lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        lo, hi = self.store.change_bounds()
        if hi <= self.seq:
            return 0
        start = self.seq
        if lo > self.seq + 1 or not self._replay_locked():
            log.warning("index change log pruned past this worker; reloading")
            self._reload_locked()
        if hi - lo > 2 * self.keep:
            self.store.prune_changes(self.keep)
        return max(0, self.seq - start)

    def _replay_locked(self) -> bool:
        """Apply the logged changes page by page; False when entries after ``self.seq`` are
        gone (the changes before the gap are applied, the caller reloads)."""
        while changes := self.store.changes_after(self.seq):
            # ``seq`` has no holes but the pruned prefix: another worker may prune while we
            # read, so each page must start right after what was applied.
            if changes[0][0] != self.seq + 1:
                return False
            ids = sorted({tid for _, tid, v in changes if v == self.version})
            if ids:
                self.index.remove(ids)
                _add_grouped(self.index, self.store.embeddings_of(self.version, ids))
            self.seq = changes[-1][0]
        return True


@dataclass
class Service:
    """Shared state behind the routes."""

    settings: ServiceSettings
    store: Store
    backend: Backend
    protection: Any
    index: VectorIndex
    ready: threading.Event = field(default_factory=threading.Event)
    # Start-up: embedding templates that had none (migration, new Psi), then loading the index.
    rebuild_seconds: float = 0.0
    # Process CPU time of the start-up: comparable across runs on a shared, loaded machine.
    rebuild_cpu_seconds: float = 0.0
    backfilled_templates: int = 0
    skipped_templates: int = 0
    # Protection and Psi share the few CPU cores; running them one at a time keeps latency
    # predictable and keeps stateful protections (BN statistics per batch) thread-safe.
    compute_lock: threading.Lock = field(default_factory=threading.Lock)
    startup_error: str | None = None
    # What enrollments record about the protection applied to them.
    protection_name: str = "none"
    protection_params: dict[str, Any] = field(default_factory=dict)
    sync: IndexSync | None = None
    # Prometheus metrics (``metrics.ServiceMetrics``): the compute times are observed here.
    metrics: Any = None

    def __post_init__(self) -> None:
        if not self.index.in_database:
            db = sqlite_path(self.settings.db_url)
            snap = db.with_name(db.name + ".index") if db else None
            if snap is not None and self.store.keys is not None:
                # Encrypted at rest: a snapshot would hold every embedding (deleted subjects'
                # too) in one file outside the per-subject keys, so none is kept, and one left
                # from before encryption is removed.
                shutil.rmtree(snap, ignore_errors=True)
                snap = None
            if not self.settings.index_snapshots:
                snap = None
            self.sync = IndexSync(
                self.store, self.index, self.backend.embedding_version, snapshot=snap
            )

    def shutdown(self) -> None:
        """Save the index snapshot (next start replays less of the log)."""
        if self.sync is not None and self.ready.is_set():
            self.sync.save()

    def startup(self) -> None:
        """Embed templates stored without an embedding of this Psi, then load the index."""
        t0, c0 = time.perf_counter(), time.process_time()
        done, corrupt = embed_missing(
            self.store, self.backend, batch=self.settings.rebuild_batch, lock=self.compute_lock
        )
        self.backfilled_templates = done
        version = self.backend.embedding_version
        mapless = self.store.count_missing_embeddings(version, self.backend.version, mapless=True)
        if mapless:
            log.warning(
                "%d templates were stored as embeddings only and have no embedding of Psi "
                "version %s: they cannot be embedded and are left out of identification",
                mapless,
                version,
            )
        self.skipped_templates = (
            corrupt + mapless + self.store.count_other_models(self.backend.version)
        )
        if self.sync is not None:
            self.sync.reload()
        self.rebuild_seconds = time.perf_counter() - t0
        self.rebuild_cpu_seconds = time.process_time() - c0
        log.info(
            "index ready: %d templates in %.2fs (%d embedded now, %d skipped)",
            self.index.count(),
            self.rebuild_seconds,
            done,
            self.skipped_templates,
        )
        self.ready.set()

    def refresh(self) -> None:
        """Bring an in-process index up to date with the database (other workers' writes)."""
        if self.sync is not None:
            self.sync.catch_up()

    def identify(self, tenant_id: int, probe: np.ndarray, top_k: int) -> list[Hit]:
        """Top-k subjects of the tenant by their best template's cosine score."""
        self.refresh()
        return top_subjects(self.index, tenant_id, probe, top_k)

    def verify(self, tenant_id: int, subject_id: str, probe: np.ndarray) -> tuple[float, int]:
        """Best cosine of ``probe`` over the subject's stored embeddings (exact), and their
        count - read from the database, so every worker answers the same."""
        mat = self.store.subject_embeddings(tenant_id, subject_id, self.backend.embedding_version)
        if not len(mat):
            return float("nan"), 0
        return float((mat @ np.asarray(probe, np.float32).reshape(-1)).max()), len(mat)

    # -- compute (runs in a worker thread) ----------------------------------------------
    def _embed_checked(self, z: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        emb = self.backend.embed(torch.from_numpy(z)[None])[0].numpy()
        if self.metrics is not None:
            self.metrics.psi_seconds.observe(time.perf_counter() - t0)
        if not np.isfinite(emb).all():
            raise payload.PayloadError(
                "invalid_features", "feature map gives a non-finite embedding (values too large)"
            )
        return emb

    def _decode(self, body: bytes) -> np.ndarray:
        z = payload.decode(body, expected_shape=self.backend.feature_shape)
        peak = float(np.abs(z).max())
        if peak > self.settings.max_feature_abs:
            # E's maps are O(10); far larger values are not features of this extractor.
            raise payload.PayloadError(
                "invalid_features",
                f"feature magnitude {peak:.3g} exceeds {self.settings.max_feature_abs:g}",
            )
        return z

    def protect_and_embed(self, body: bytes) -> tuple[bytes, np.ndarray]:
        """Validate -> protect -> encode for storage -> embed exactly what is stored."""
        z = self._decode(body)
        with self.compute_lock:
            t0 = time.perf_counter()
            zp = self.protection.protect(torch.from_numpy(z)[None])[0].numpy()
            if self.metrics is not None:
                self.metrics.protection_seconds.observe(time.perf_counter() - t0)
        blob = encode_stored(zp, self.settings.storage_codec)
        # Embed the decoded blob, not zp, so the start-up rebuild gives the same scores.
        stored = stored_map(blob, zp, self.backend.feature_shape)
        with self.compute_lock:
            return blob, self._embed_checked(stored)

    def probe(self, body: bytes) -> np.ndarray:
        """Embedding of a fresh (unprotected) probe: the paper's online verification."""
        z = self._decode(body)
        with self.compute_lock:
            return self._embed_checked(z)


def iso(t: Any) -> str:
    if isinstance(t, datetime):
        # SQLite hands back naive datetimes; everything is stored in UTC.
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()
    return str(t)


def template_out(row: Any, replayed: bool = False) -> TemplateOut:
    return TemplateOut(
        template_id=row.template_id,
        subject_id=row.subject_id,
        protection=row.protection,
        protection_params=row.protection_params,
        model_version=row.model_version,
        created_at=iso(row.created_at),
        replayed=replayed,
    )
