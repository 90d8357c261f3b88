"""The service's shared state: store, networks, protection and the in-memory gallery."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from advface.service import payload
from advface.service.backend import Backend
from advface.service.gallery import Gallery
from advface.service.schemas import TemplateOut
from advface.service.settings import ServiceSettings
from advface.service.store import Store

log = logging.getLogger("advface.service")


@dataclass
class Service:
    """Shared state behind the routes."""

    settings: ServiceSettings
    store: Store
    backend: Backend
    protection: Any
    gallery: Gallery = field(default_factory=Gallery)
    ready: threading.Event = field(default_factory=threading.Event)
    rebuild_seconds: float = 0.0
    # Process CPU time of the rebuild: comparable across runs on a shared, loaded machine.
    rebuild_cpu_seconds: float = 0.0
    skipped_templates: int = 0
    # Protection and Psi share the few CPU cores; running them one at a time keeps latency
    # predictable and keeps stateful protections (BN statistics per batch) thread-safe.
    compute_lock: threading.Lock = field(default_factory=threading.Lock)
    # DB commit and gallery update of one write happen together (no stale gallery entries).
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    startup_error: str | None = None
    # What enrollments record about the protection applied to them.
    protection_name: str = "none"
    protection_params: dict[str, Any] = field(default_factory=dict)

    def rebuild(self) -> None:
        """Recompute the in-memory embeddings of every stored template (start-up)."""
        t0, c0 = time.perf_counter(), time.process_time()
        batch: list[tuple[int, str, str, np.ndarray]] = []
        skipped = 0

        def flush() -> None:
            z = torch.from_numpy(np.stack([b[3] for b in batch]))
            with self.compute_lock:
                emb = self.backend.embed(z).numpy()
            for (tenant, tid, sid, _), e in zip(batch, emb, strict=True):
                self.gallery.add(tenant, tid, sid, e)
            batch.clear()

        for row in self.store.iter_templates():
            if row.model_version != self.backend.version:
                skipped += 1  # features of another E are not comparable under this Psi
                continue
            try:
                z = payload.decode(row.blob, expected_shape=self.backend.feature_shape)
            except payload.PayloadError:
                log.error("stored template %s is corrupt; skipped", row.template_id)
                skipped += 1
                continue
            batch.append((row.tenant_id, row.template_id, row.subject_id, z))
            if len(batch) >= self.settings.rebuild_batch:
                flush()
        if batch:
            flush()
        self.skipped_templates = skipped
        self.rebuild_seconds = time.perf_counter() - t0
        self.rebuild_cpu_seconds = time.process_time() - c0
        log.info(
            "gallery rebuilt: %d templates in %.2fs (%d skipped)",
            len(self.gallery),
            self.rebuild_seconds,
            skipped,
        )
        self.ready.set()

    # -- compute (runs in a worker thread) ----------------------------------------------
    def _embed_checked(self, z: np.ndarray) -> np.ndarray:
        emb = self.backend.embed(torch.from_numpy(z)[None])[0].numpy()
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
            zp = self.protection.protect(torch.from_numpy(z)[None])[0].numpy()
        try:
            blob = payload.encode(zp, dtype="float16")
        except ValueError:  # protected values beyond the fp16 range: keep full precision
            blob = payload.encode(zp, dtype="float32")
        # Embed the decoded blob, not zp, so the start-up rebuild gives the same scores.
        stored = payload.decode(blob, expected_shape=self.backend.feature_shape)
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
