"""FastAPI template service (paper Fig. 1/2): clients upload E(x); the server protects each
feature map before storing it, and verify/identify run Psi on the protected templates.

Build it with :func:`create_app`; every heavy collaborator (store, networks, protection) can be
injected, which is how the tests run it with tiny stand-in modules.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from sqlalchemy import exc as sa_exc
from starlette.routing import BaseRoute

from advface.service import crypto
from advface.service.backend import Backend, load_backend
from advface.service.core import Service, public_params
from advface.service.dbindex import PgVectorIndex, PgVectorUnavailable, SqlExactIndex
from advface.service.errors import DB_UNAVAILABLE, ServiceError, install_error_handlers
from advface.service.guard import GuardLimits, RequestGuard, TokenBucket
from advface.service.index import HnswIndex, VectorIndex
from advface.service.routes import ops, recognition, subjects, templates
from advface.service.settings import ServiceSettings, default_master_key_file
from advface.service.store import Store
from advface.service.transform import TenantTransforms, TransformedIndex

__all__ = [
    "API_VERSION",
    "Service",
    "ServiceError",
    "StartupRetry",
    "build_index",
    "create_app",
]

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


# Start-up failures a later attempt can get past: the database unreachable, locked or in a
# deadlock, a unique-key race between workers embedding the same templates, a full disk.
TRANSIENT_STARTUP_ERRORS: tuple[type[Exception], ...] = (
    *DB_UNAVAILABLE,
    sa_exc.IntegrityError,
    OSError,
)
# Exit statuses of a worker whose start-up failed (only under ``server.run``): uvicorn's
# supervisor restarts a worker that exits 1 and stops the whole server when one exits 3 (its
# STARTUP_FAILURE), which is right for an error every worker would hit again.
EXIT_RETRIES_EXHAUSTED = 1
EXIT_STARTUP_FATAL = 3
# Set by ``server.run`` for its workers: a worker exiting with EXIT_STARTUP_FATAL creates this
# file, so the supervising process, which uvicorn lets exit 0, exits with that status too.
STARTUP_FAILED_FILE_ENV = "ADVFACE_STARTUP_FAILED_FILE"


@dataclass(frozen=True)
class StartupRetry:
    """How often, and how long apart, start-up is retried after a transient error."""

    attempts: int = 8
    first_delay: float = 1.0  # seconds; doubled after each failure, up to ``max_delay``
    max_delay: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (with jitter, so workers
        that failed together do not retry in step)."""
        base = min(self.max_delay, self.first_delay * 2 ** (failures - 1))
        return base * random.uniform(0.5, 1.0)


def startup_error_category(exc: BaseException) -> str:
    """A short, fixed name for a start-up failure: what ``/ready`` may say about it (the
    driver's message can name hosts, users and paths; it goes to the log only)."""
    if isinstance(exc, DB_UNAVAILABLE):
        return "database_unavailable"
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return "database_error"
    if isinstance(exc, crypto.CryptoError):
        return "decryption_failed"
    if isinstance(exc, OSError):
        return "os_error"
    return "internal_error"


def run_startup(svc: Service, retry: StartupRetry, stop: threading.Event) -> int:
    """``svc.startup()``, retried with exponential backoff while its errors are transient
    (start-up resumes: embedded batches stay committed, the index is reloaded whole).

    Returns 0 when the service is ready (or ``stop`` was set while waiting), else the exit
    status for the failure; ``svc.startup_error`` then holds its category.
    """
    attempts = max(1, retry.attempts)
    for attempt in range(1, attempts + 1):
        try:
            svc.startup()
        except TRANSIENT_STARTUP_ERRORS as exc:
            if attempt == attempts:
                log.error("start-up failed %d times; giving up", attempt, exc_info=exc)
                svc.startup_error = startup_error_category(exc)
                return EXIT_RETRIES_EXHAUSTED
            delay = retry.delay(attempt)
            # The driver's own message (not SQLAlchemy's with the statement): host, lock, ...
            cause = getattr(exc, "orig", None) or exc
            log.warning(
                "start-up attempt %d of %d failed (%s: %s); retrying in %.1f s",
                attempt,
                attempts,
                type(cause).__name__,
                str(cause).strip(),
                delay,
            )
            if stop.wait(delay):
                return 0
        except Exception as exc:  # noqa: BLE001 - configuration or a bug: retrying cannot help
            log.error("start-up failed; retrying cannot fix this error", exc_info=exc)
            svc.startup_error = startup_error_category(exc)
            return EXIT_STARTUP_FATAL
        else:
            # /ready is unauthenticated and only says ready or not: these go to the log.
            log.info(
                "serving: vector index %s loaded from %s, start-up %.2f s CPU; E %s, Psi %s, "
                "protection %s",
                type(svc.index).__name__,
                svc.sync.loaded_from if svc.sync else "database",
                svc.rebuild_cpu_seconds,
                svc.backend.version,
                svc.backend.embedding_version,
                svc.protection_name,
            )
            return 0
    raise AssertionError("unreachable: the last attempt returns")


def _request_shutdown() -> None:
    """Ask uvicorn to shut down gracefully (its SIGTERM handler): the requests in flight are
    answered, then the lifespan's shutdown runs."""
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_process(status: int) -> None:
    """End this process with ``status`` (uvicorn itself would exit 0 after a shutdown)."""
    mark = os.environ.get(STARTUP_FAILED_FILE_ENV)
    if mark and status == EXIT_STARTUP_FATAL:
        try:
            Path(mark).touch()
        except OSError:
            log.exception("could not report the failed start-up to the supervising process")
    logging.shutdown()  # flush the log lines that say why
    os._exit(status)


def _lifespan(svc: Service, in_background: bool, retry: StartupRetry) -> Any:
    """Start-up: embed what has no embedding, load the index (in a thread, so ``/health``
    answers at once), retrying transient errors.

    A start-up that fails for good leaves ``/ready`` at 503 ``startup_failed``. Under
    ``server.run`` (``app.state.exit_on_startup_failure``) the process then shuts down
    gracefully and exits non-zero, so a supervisor restarts it or reports the failure instead
    of a worker answering 503 forever.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        failed: list[int] = []

        def run() -> None:
            status = run_startup(svc, retry, stop)
            if not status:
                return
            if not getattr(app.state, "exit_on_startup_failure", False):
                log.error("this process answers 503 startup_failed until it is restarted")
                return
            failed.append(status)
            _request_shutdown()  # the shutdown below then exits with the status

        if in_background:
            threading.Thread(target=run, name="index-load", daemon=True).start()
        else:
            run()
        yield
        stop.set()
        try:
            svc.shutdown()
        except Exception:  # noqa: BLE001 - a snapshot only saves start-up time
            log.exception("saving the index snapshot failed")
        if failed:
            log.critical("exiting with status %d: the start-up failed", failed[0])
            _exit_process(failed[0])

    return lifespan


def _add_metrics(app: FastAPI, svc: Service, routes: list[BaseRoute]) -> None:
    """Prometheus metrics (``GET /metrics``), counted outside the request guard."""
    from advface import __version__
    from advface.service.metrics import MetricsMiddleware, ServiceMetrics

    info = {
        "version": __version__,
        "protection": svc.protection_name,
        "backend": svc.settings.backend,
        "psi": svc.backend.embedding_version,
        "index": type(svc.index).__name__,
    }
    svc.metrics = ServiceMetrics(info, ready=svc.ready.is_set)
    # Added after the guard, so it wraps it: refusals are counted too.
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics, routes=routes)


def app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers N``: each worker builds its app from ``ADVFACE_*``."""
    app = create_app(ServiceSettings.from_env())
    app.state.exit_on_startup_failure = True  # let uvicorn's supervisor see a failed start-up
    return app


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


def _build_service(
    settings: ServiceSettings,
    *,
    store: Store | None,
    backend: Backend | None,
    protection: Any,
    keys: crypto.KeyProvider | None,
) -> Service:
    """The service's collaborators: those not given are built from ``settings``."""
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
    if served == "none":
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
    return Service(
        settings=settings,
        store=store,
        backend=backend,
        protection=protection,
        index=build_index(settings, store, backend),
        protection_name=served,
        protection_params=public_params(protection),
    )


def create_app(
    settings: ServiceSettings | None = None,
    *,
    store: Store | None = None,
    backend: Backend | None = None,
    protection: Any = None,
    keys: crypto.KeyProvider | None = None,
    rebuild_in_background: bool = True,
    startup_retry: StartupRetry | None = None,
) -> FastAPI:
    """Build the service app. Collaborators not given are built from ``settings``.

    Start-up (lifespan) runs in a thread, so ``/health`` answers at once and ``/ready`` turns
    200 when every template has an embedding and the index is loaded; transient start-up
    errors are retried as ``startup_retry`` says.
    """
    settings = settings or ServiceSettings.from_env()
    svc = _build_service(settings, store=store, backend=backend, protection=protection, keys=keys)
    app = FastAPI(
        title="advface template service",
        version=API_VERSION,
        description="Stores server-protected face feature maps (AdvFace, CVPR 2023); "
        "verify 1:1 and identify 1:N on the protected templates.",
        lifespan=_lifespan(svc, rebuild_in_background, startup_retry or StartupRetry()),
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
    routers = [
        ops.router(metrics=bool(settings.metrics), metrics_token=settings.metrics_token),
        subjects.router(settings),
        templates.router(),
        recognition.router(settings),
    ]
    if settings.metrics:
        _add_metrics(app, svc, [route for r in routers for route in r.routes])
    install_error_handlers(app)
    for r in routers:
        app.include_router(r)
    return app
