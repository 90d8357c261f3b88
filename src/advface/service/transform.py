"""Per-tenant secret orthogonal transforms of the vectors a vector index holds in clear.

The in-process HNSW graphs (worker memory) and pgvector's ``template_vectors`` column must
see vectors in clear to search them. They get ``Q_t e`` instead of the embedding ``e``, where
``Q_t`` is a secret 512x512 orthogonal matrix of tenant ``t``; probes are transformed with the
same ``Q_t``, and cosine scores are unchanged (``<Q a, Q b> = <a, b>``). ``Q_t`` is drawn from
a 256-bit seed per tenant (a QR decomposition of a seeded Gaussian matrix: Haar-distributed),
stored wrapped by the master key like the subjects' data keys (``Store.transform_seed``).

What this buys: an index dump, without the master key, holds each tenant's vectors under
another unknown rotation - neither comparable with clean embeddings nor across tenants. What
it does not: an attacker who learns enough (embedding, stored vector) pairs of one tenant
estimates ``Q_t`` by orthogonal Procrustes (``benchmarks/unlinkability.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from advface.service import crypto
from advface.service.index import Hit, VectorIndex, _check_k, _unit

if TYPE_CHECKING:
    from advface.service.store import Store

SEED_BYTES = 32


def orthogonal(seed: bytes, dim: int) -> np.ndarray:
    """The (dim, dim) float32 orthogonal matrix of ``seed``: Q of the QR decomposition of a
    seeded standard Gaussian matrix, column signs fixed by R's diagonal (Haar measure)."""
    if len(seed) < 16:
        raise ValueError(f"a transform seed needs >= 16 bytes, got {len(seed)}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(seed, "big"))))
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)


class TenantTransforms:
    """Each tenant's ``Q_t``, read (or created) once from the store and cached."""

    def __init__(self, store: Store, dim: int) -> None:
        if store.keys is None:
            raise crypto.MasterKeyError("tenant transforms need a master key (encryption on)")
        self.store, self.dim = store, dim
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def matrix(self, tenant_id: int) -> np.ndarray:
        with self._lock:
            q = self._cache.get(tenant_id)
            if q is None:
                q = orthogonal(self.store.transform_seed(tenant_id), self.dim)
                self._cache[tenant_id] = q
            return q

    def apply(self, tenant_id: int, vectors: Any) -> np.ndarray:
        """``Q_t v`` for one vector (d,) or each row of (n, d)."""
        return np.asarray(vectors, np.float32) @ self.matrix(tenant_id).T

    def forget(self, tenant_id: int | None = None) -> None:
        """Drop cached matrices (after a rekey), of one tenant or all."""
        with self._lock:
            if tenant_id is None:
                self._cache.clear()
            else:
                self._cache.pop(tenant_id, None)


class TransformedIndex(VectorIndex):
    """An in-process index that holds ``Q_t e`` for every entry of tenant ``t`` and searches
    with ``Q_t probe``: the same hits and scores as ``inner`` on the plain vectors."""

    in_database = False

    def __init__(self, inner: VectorIndex, transforms: TenantTransforms) -> None:
        if inner.in_database or inner.dim != transforms.dim:
            raise ValueError("TransformedIndex wraps an in-process index of the transforms' dim")
        self.inner, self.transforms, self.dim = inner, transforms, inner.dim

    def add(self, tenant_id: int, items: Sequence[tuple[str, str, Any]]) -> None:
        if not items:
            return
        vecs = np.stack([_unit(v, self.dim) for _, _, v in items])  # validate all first
        moved = self.transforms.apply(tenant_id, vecs)
        self.inner.add(tenant_id, [(t, s, v) for (t, s, _), v in zip(items, moved, strict=True)])

    def remove(self, template_ids: Iterable[str]) -> int:
        return self.inner.remove(template_ids)

    def search(self, tenant_id: int, probe: Any, k: int) -> list[Hit]:
        _check_k(k)
        q = _unit(probe, self.dim)
        return self.inner.search(tenant_id, self.transforms.apply(tenant_id, q), k)

    def count(self, tenant_id: int | None = None) -> int:
        return self.inner.count(tenant_id)

    def clear(self) -> None:
        self.inner.clear()


def rekey_tenant(store: Store, tenant_name: str, *, batch: int = 1000) -> dict[str, Any]:
    """Draw a new ``Q_t`` for a tenant and re-transform its vectors in the database's index
    (pgvector) from the stored, sealed embeddings - one transaction, no re-enrollment.

    In-process indexes are rebuilt with the new transform at the next start (with encryption
    on no snapshot is kept): stop the service first and start it again afterwards.
    """
    from advface.service import dbindex

    if store.keys is None:
        raise crypto.MasterKeyError("rekeying a tenant needs the master key")
    tenant_id = store.tenant_id(tenant_name)
    with store.transaction() as s:
        seed = store.new_transform_seed(s, tenant_id)
        moved = dbindex.retransform_vectors(s, store, tenant_id, seed, batch=batch)
    return {"tenant": tenant_name, "retransformed_vectors": moved}
