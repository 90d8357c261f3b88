"""In-memory Psi embeddings of the stored templates, per tenant (never written to disk)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _TenantIndex:
    template_ids: list[str] = field(default_factory=list)
    subject_ids: list[str] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    _matrix: np.ndarray | None = None  # stacked rows, rebuilt lazily after a change

    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = (
                np.stack(self.rows).astype(np.float32)
                if self.rows
                else np.zeros((0, 0), np.float32)
            )
        return self._matrix


class Gallery:
    """Thread-safe map tenant -> (template id, subject id, unit embedding)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[int, _TenantIndex] = {}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(t.template_ids) for t in self._tenants.values())

    def add(self, tenant_id: int, template_id: str, subject_id: str, emb: np.ndarray) -> None:
        with self._lock:
            idx = self._tenants.setdefault(tenant_id, _TenantIndex())
            if template_id in idx.template_ids:  # idempotent: a replayed enrollment
                return
            idx.template_ids.append(template_id)
            idx.subject_ids.append(subject_id)
            idx.rows.append(np.asarray(emb, np.float32).reshape(-1))
            idx._matrix = None

    def _remove_where(self, tenant_id: int, keep: list[bool]) -> int:
        idx = self._tenants.get(tenant_id)
        if idx is None:
            return 0
        n_before = len(idx.template_ids)
        idx.template_ids = [t for t, k in zip(idx.template_ids, keep, strict=True) if k]
        idx.subject_ids = [s for s, k in zip(idx.subject_ids, keep, strict=True) if k]
        idx.rows = [r for r, k in zip(idx.rows, keep, strict=True) if k]
        idx._matrix = None
        return n_before - len(idx.template_ids)

    def remove_template(self, tenant_id: int, template_id: str) -> int:
        with self._lock:
            idx = self._tenants.get(tenant_id)
            if idx is None:
                return 0
            return self._remove_where(tenant_id, [t != template_id for t in idx.template_ids])

    def remove_subject(self, tenant_id: int, subject_id: str) -> int:
        with self._lock:
            idx = self._tenants.get(tenant_id)
            if idx is None:
                return 0
            return self._remove_where(tenant_id, [s != subject_id for s in idx.subject_ids])

    def _snapshot(self, tenant_id: int) -> tuple[np.ndarray, list[str], list[str]]:
        with self._lock:
            idx = self._tenants.get(tenant_id)
            if idx is None or not idx.rows:
                return np.zeros((0, 0), np.float32), [], []
            return idx.matrix(), list(idx.template_ids), list(idx.subject_ids)

    def verify(self, tenant_id: int, subject_id: str, probe: np.ndarray) -> tuple[float, int]:
        """Best cosine score of ``probe`` over the subject's templates, and their count."""
        mat, _, subjects = self._snapshot(tenant_id)
        sel = [i for i, s in enumerate(subjects) if s == subject_id]
        if not sel:
            return float("nan"), 0
        scores = mat[sel] @ np.asarray(probe, np.float32).reshape(-1)
        return float(scores.max()), len(sel)

    def identify(
        self, tenant_id: int, probe: np.ndarray, top_k: int
    ) -> list[tuple[str, float, str]]:
        """Top-k subjects by their best template's cosine score: (subject, score, template)."""
        mat, templates, subjects = self._snapshot(tenant_id)
        if not templates:
            return []
        scores = mat @ np.asarray(probe, np.float32).reshape(-1)
        best: dict[str, tuple[float, str]] = {}
        for i in np.argsort(-scores, kind="stable"):
            s = subjects[i]
            if s not in best:
                best[s] = (float(scores[i]), templates[i])
                if len(best) == top_k:
                    break
        return [(s, sc, t) for s, (sc, t) in best.items()]

    def count(self, tenant_id: int, subject_id: str | None = None) -> int:
        with self._lock:
            idx = self._tenants.get(tenant_id)
            if idx is None:
                return 0
            if subject_id is None:
                return len(idx.template_ids)
            return sum(1 for s in idx.subject_ids if s == subject_id)
