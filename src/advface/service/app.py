"""FastAPI template service (paper Fig. 1/2): clients upload E(x); the server protects each
feature map before storing it, and verify/identify run Psi on the protected templates.

Build it with :func:`create_app`; every heavy collaborator (store, networks, protection) can be
injected, which is how the tests run it with tiny stand-in modules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI

from advface.service import crypto
from advface.service.backend import Backend, load_backend
from advface.service.core import Service, public_params
from advface.service.dbindex import PgVectorIndex, PgVectorUnavailable, SqlExactIndex
from advface.service.errors import ServiceError, install_error_handlers
from advface.service.guard import GuardLimits, RequestGuard, TokenBucket
from advface.service.index import HnswIndex, VectorIndex
from advface.service.routes import ops, recognition, subjects, templates
from advface.service.settings import ServiceSettings, default_master_key_file
from advface.service.store import Store
from advface.service.transform import TenantTransforms, TransformedIndex

__all__ = ["API_VERSION", "Service", "ServiceError", "build_index", "create_app"]

log = logging.getLogger("advface.service")

API_VERSION = "v1"


def build_index(settings: ServiceSettings, store: Store, backend: Backend) -> VectorIndex:
    """The identification index ``settings.vector_index`` names for this database.

    ``auto``: in-process HNSW with SQLite; pgvector with PostgreSQL, or - where the server has
    no pgvector - an exact scan of the stored embeddings (logged as a warning). With a master
    key (encryption on), the HNSW and pgvector indexes hold each tenant's vectors under its
    secret orthogonal transform (``transform``); the exact scan holds nothing in clear.
    """
    choice, dim, version = settings.vector_index, backend.embedding_dim, backend.embedding_version
    postgres = store.engine.dialect.name == "postgresql"
    transforms = None if store.keys is None else TenantTransforms(store, dim)
    if store.is_sqlite:
        if choice == "pgvector":
            raise ValueError("--vector-index pgvector needs a PostgreSQL database")
        if choice == "exact":
            return SqlExactIndex(store, dim, version)
        hnsw = HnswIndex(dim, expansion_search=settings.index_ef_search)
        return hnsw if transforms is None else TransformedIndex(hnsw, transforms)
    if choice == "hnsw":
        # The in-process index follows SQLite's change log; PostgreSQL has no such log here.
        raise ValueError(
            "--vector-index hnsw needs SQLite; use pgvector (or exact) with PostgreSQL"
        )
    if choice == "exact" or not postgres:
        return SqlExactIndex(store, dim, version)
    try:
        return PgVectorIndex(
            store, dim, version, ef_search=settings.index_ef_search, transforms=transforms
        )
    except PgVectorUnavailable as exc:
        if choice == "pgvector":
            raise
        log.warning("%s Falling back to an exact scan per identification.", exc)
        return SqlExactIndex(store, dim, version)


def _lifespan(svc: Service, in_background: bool) -> Any:
    """Start-up: embed what has no embedding, load the index (in a thread, so ``/health``
    answers at once)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def run() -> None:
            try:
                svc.startup()
            except Exception as exc:  # noqa: BLE001 - reported by /ready, not fatal
                log.exception("start-up failed")
                svc.startup_error = f"{type(exc).__name__}: {exc}"

        if in_background:
            threading.Thread(target=run, name="index-load", daemon=True).start()
        else:
            run()
        yield
        try:
            svc.shutdown()
        except Exception:  # noqa: BLE001 - a snapshot only saves start-up time
            log.exception("saving the index snapshot failed")

    return lifespan


def app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers N``: each worker builds its app from ``ADVFACE_*``."""
    return create_app(ServiceSettings.from_env())


def protection_for(settings: ServiceSettings, backend: Backend) -> Any:
    """The configured protection; the ones that run networks get the service's own E (and
    Psi for embedding-shadow) unless the parameters name others."""
    from torch import nn

    from advface.protection import build_protection

    params = dict(settings.protection_params)
    if settings.protection in ("advface", "embedding-shadow") and isinstance(
        backend.extractor, nn.Module
    ):
        params.setdefault("extractor", backend.extractor)
        if settings.protection == "embedding-shadow":
            params.setdefault("head", backend.psi)
        params.setdefault("expected_shape", backend.feature_shape)
    return build_protection(settings.protection, **params)


def create_app(
    settings: ServiceSettings | None = None,
    *,
    store: Store | None = None,
    backend: Backend | None = None,
    protection: Any = None,
    keys: crypto.KeyProvider | None = None,
    rebuild_in_background: bool = True,
) -> FastAPI:
    """Build the service app. Collaborators not given are built from ``settings``.

    Start-up (lifespan) runs in a thread, so ``/health`` answers at once and ``/ready`` turns
    200 when every template has an embedding and the index is loaded.
    """
    settings = settings or ServiceSettings.from_env()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    backend = backend or load_backend(settings.backend, settings.head)
    if protection is None:
        protection = protection_for(settings, backend)
    served = str(getattr(protection, "name", settings.protection))
    if backend.head_protection and backend.head_protection != served:
        log.warning(
            "Psi %s was distilled for protection %r but the service stores %r templates",
            backend.embedding_version,
            backend.head_protection,
            served,
        )
    if getattr(protection, "name", settings.protection) == "none":
        log.warning(
            "PROTECTION IS OFF: templates are stored as uploaded; a stolen database yields "
            "faces. Use the default (embedding-shadow) unless this is a test."
        )
    if store is None:
        keys = keys or crypto.provider_from_config(
            settings.master_key_file, default_file=default_master_key_file()
        )
        store = Store(settings.db_url, timeout=settings.db_timeout, keys=keys)
    # Encrypted rows and no (or another) master key: a clear start-up error, not 500s later.
    store.check_master_key()
    svc = Service(
        settings=settings,
        store=store,
        backend=backend,
        protection=protection,
        index=build_index(settings, store, backend),
        protection_name=str(getattr(protection, "name", settings.protection)),
        protection_params=public_params(protection),
    )
    app = FastAPI(
        title="advface template service",
        version=API_VERSION,
        description="Stores server-protected face feature maps (AdvFace, CVPR 2023); "
        "verify 1:1 and identify 1:N on the protected templates.",
        lifespan=_lifespan(svc, rebuild_in_background),
        # The stock pages load Swagger UI / ReDoc from a CDN; ops.DOCS_HTML works offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = svc
    limiter = (
        TokenBucket(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None
    )
    app.add_middleware(
        RequestGuard,
        # Looked up per call, so a store swapped in later (tests, reconnect) is the one used.
        authenticate=lambda token: svc.store.authenticate(token),
        limits=GuardLimits(
            max_body_bytes=settings.max_body_bytes,
            read_timeout=settings.read_timeout,
            max_concurrent_uploads=settings.max_concurrent_uploads,
        ),
        limiter=limiter,
    )
    install_error_handlers(app)
    app.include_router(ops.router())
    app.include_router(subjects.router(settings))
    app.include_router(templates.router())
    app.include_router(recognition.router(settings))
    return app
