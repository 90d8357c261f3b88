"""FastAPI template service (paper Fig. 1/2): clients upload E(x); the server protects each
feature map before storing it, and verify/identify run Psi on the protected templates.

Build it with :func:`create_app`; every heavy collaborator (store, networks, protection) can be
injected, which is how the tests run it with tiny stand-in modules.
"""

import hashlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advface.service import payload
from advface.service.auth import API_KEY_HEADER
from advface.service.backend import Backend, load_backend
from advface.service.gallery import Gallery
from advface.service.settings import ServiceSettings
from advface.service.store import AlreadyExists, IdempotencyConflict, NotFound, Store

log = logging.getLogger("advface.service")

API_VERSION = "v1"
SUBJECT_ID_RE = r"^[\w.@:'+-]{1,128}$"
_IDEM_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
OCTET = "application/octet-stream"


# -- errors ---------------------------------------------------------------------------------
class ServiceError(Exception):
    """An error answered as ``{"error": {"code", "message", "status"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "status": status, **extra}
    return JSONResponse({"error": body}, status_code=status)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(payload.PayloadError)
    async def _payload(_: Request, exc: payload.PayloadError) -> JSONResponse:
        return _error(422, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return _error(422, "validation_error", "request validation failed", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))


class BodyLimitMiddleware:
    """Reject bodies over ``limit`` bytes with a typed 413 before any endpoint runs.

    Checks ``Content-Length`` first, then buffers the (possibly chunked) body up to the limit
    and replays it, so an endpoint never sees more than ``limit`` bytes.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw_len = headers.get(b"content-length")
        if raw_len is not None:
            try:
                declared = int(raw_len)
                if declared < 0:
                    raise ValueError
            except ValueError:
                await _error(400, "bad_request", "invalid Content-Length")(scope, receive, send)
                return
            if declared > self.limit:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            more = msg.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = _error(413, "payload_too_large", f"request body exceeds {self.limit} bytes")
        await resp(scope, receive, send)


# -- schemas --------------------------------------------------------------------------------
class SubjectIn(BaseModel):
    subject_id: str = Field(
        pattern=SUBJECT_ID_RE, description="client-chosen id, unique per tenant"
    )


class SubjectOut(BaseModel):
    subject_id: str
    created_at: str
    templates: int = 0


class SubjectPage(BaseModel):
    items: list[SubjectOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class SubjectDeleted(BaseModel):
    subject_id: str
    deleted_templates: int


class TemplateOut(BaseModel):
    template_id: str
    subject_id: str
    protection: str
    protection_params: dict[str, Any]
    model_version: str
    created_at: str
    replayed: bool = Field(False, description="true when an idempotent retry found it stored")


class TemplateDeleted(BaseModel):
    template_id: str
    deleted: bool = True


class VerifyOut(BaseModel):
    subject_id: str
    score: float = Field(description="best cosine similarity over the subject's templates")
    match: bool
    threshold: float
    templates: int


class Candidate(BaseModel):
    subject_id: str
    score: float
    template_id: str
    match: bool


class IdentifyOut(BaseModel):
    candidates: list[Candidate]
    threshold: float


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    templates: int
    skipped_templates: int
    rebuild_seconds: float
    rebuild_cpu_seconds: float
    model_version: str
    protection: str


_BINARY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
        "description": "feature map E(x) (1,64,77,77) in the advface payload format "
        "(advface.service.payload: fp16, shape header, compressed)",
    }
}


# -- the service ----------------------------------------------------------------------------
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


def _iso(t: Any) -> str:
    if isinstance(t, datetime):
        # SQLite hands back naive datetimes; everything is stored in UTC.
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()
    return str(t)


def _template_out(row: Any, replayed: bool = False) -> TemplateOut:
    return TemplateOut(
        template_id=row.template_id,
        subject_id=row.subject_id,
        protection=row.protection,
        protection_params=row.protection_params,
        model_version=row.model_version,
        created_at=_iso(row.created_at),
        replayed=replayed,
    )


def create_app(
    settings: ServiceSettings | None = None,
    *,
    store: Store | None = None,
    backend: Backend | None = None,
    protection: Any = None,
    rebuild_in_background: bool = True,
) -> FastAPI:
    """Build the service app. Collaborators not given are built from ``settings``.

    The gallery rebuild runs at start-up (lifespan) in a thread, so ``/health`` answers at once
    and ``/ready`` turns 200 when the in-memory embeddings are complete.
    """
    settings = settings or ServiceSettings.from_env()
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    if protection is None:
        from advface.protection import build_protection

        protection = build_protection(settings.protection, **settings.protection_params)
    store = store or Store(settings.db_url)
    backend = backend or load_backend(settings.backend)
    svc = Service(settings=settings, store=store, backend=backend, protection=protection)
    protection_name = str(getattr(protection, "name", settings.protection))
    protection_params = dict(protection.params()) if hasattr(protection, "params") else {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def run() -> None:
            try:
                svc.rebuild()
            except Exception as exc:  # noqa: BLE001 - reported by /ready, not fatal
                log.exception("gallery rebuild failed")
                svc.startup_error = f"{type(exc).__name__}: {exc}"

        if rebuild_in_background:
            threading.Thread(target=run, name="gallery-rebuild", daemon=True).start()
        else:
            run()
        yield

    app = FastAPI(
        title="advface template service",
        version=API_VERSION,
        description="Stores server-protected face feature maps (AdvFace, CVPR 2023); "
        "verify 1:1 and identify 1:N on the protected templates.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    _install_error_handlers(app)

    api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    def tenant(key: Annotated[str | None, Depends(api_key_scheme)]) -> int:
        if not key:
            raise ServiceError(401, "missing_api_key", f"missing {API_KEY_HEADER} header")
        tenant_id = svc.store.authenticate(key)
        if tenant_id is None:
            raise ServiceError(401, "invalid_api_key", "invalid or revoked API key")
        return tenant_id

    def require_ready() -> None:
        if not svc.ready.is_set():
            raise ServiceError(503, "not_ready", "the template gallery is still loading")

    Tenant = Annotated[int, Depends(tenant)]
    SubjectPath = Annotated[str, Path(pattern=SUBJECT_ID_RE, max_length=128)]

    async def binary_body(request: Request) -> bytes:
        ctype = request.headers.get("content-type", OCTET).split(";")[0].strip().lower()
        if ctype not in (OCTET, ""):
            raise ServiceError(415, "unsupported_media_type", f"send the payload as {OCTET}")
        body = await request.body()
        if not body:
            raise ServiceError(422, "invalid_payload", "empty request body")
        return body

    Body = Annotated[bytes, Depends(binary_body)]
    ready_dep = [Depends(require_ready)]

    @app.get("/health", response_model=Health, tags=["ops"])
    def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/ready", response_model=Ready, tags=["ops"], responses={503: {}})
    def ready() -> Any:
        """Readiness: database reachable and in-memory gallery rebuilt."""
        if svc.startup_error:
            return _error(503, "startup_failed", svc.startup_error)
        if not svc.ready.is_set():
            return _error(503, "not_ready", "the template gallery is still loading")
        if not svc.store.ping():
            return _error(503, "database_unavailable", "the database does not answer")
        return Ready(
            status="ready",
            templates=len(svc.gallery),
            skipped_templates=svc.skipped_templates,
            rebuild_seconds=round(svc.rebuild_seconds, 4),
            rebuild_cpu_seconds=round(svc.rebuild_cpu_seconds, 4),
            model_version=svc.backend.version,
            protection=protection_name,
        )

    p = f"/{API_VERSION}"

    @app.post(f"{p}/subjects", status_code=201, response_model=SubjectOut, tags=["subjects"])
    def create_subject(body: SubjectIn, tenant_id: Tenant) -> SubjectOut:
        """Create a subject (409 if it exists)."""
        try:
            created = svc.store.create_subject(tenant_id, body.subject_id)
        except AlreadyExists:
            raise ServiceError(
                409, "subject_exists", f"subject {body.subject_id!r} already exists"
            ) from None
        return SubjectOut(subject_id=body.subject_id, created_at=_iso(created))

    @app.get(f"{p}/subjects", response_model=SubjectPage, tags=["subjects"])
    def list_subjects(
        tenant_id: Tenant,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_size)] = 100,
        cursor: Annotated[str | None, Query(max_length=128)] = None,
    ) -> SubjectPage:
        """Subjects in id order, keyset-paged."""
        rows = svc.store.list_subjects(tenant_id, limit + 1, after=cursor)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [SubjectOut(subject_id=s, created_at=_iso(c), templates=n) for s, c, n in rows]
        return SubjectPage(items=items, next_cursor=rows[-1][0] if more and rows else None)

    @app.delete(
        f"{p}/subjects/{{subject_id}}",
        response_model=SubjectDeleted,
        tags=["subjects"],
        dependencies=ready_dep,  # a rebuild in progress could re-add what we delete
    )
    def delete_subject(subject_id: SubjectPath, tenant_id: Tenant) -> SubjectDeleted:
        """Delete a subject and all its templates."""
        with svc.write_lock:
            try:
                ids = svc.store.delete_subject(tenant_id, subject_id)
            except NotFound:
                raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}") from None
            svc.gallery.remove_subject(tenant_id, subject_id)
        return SubjectDeleted(subject_id=subject_id, deleted_templates=len(ids))

    @app.post(
        f"{p}/subjects/{{subject_id}}/templates",
        status_code=201,
        response_model=TemplateOut,
        tags=["templates"],
        openapi_extra=_BINARY_BODY,
        dependencies=ready_dep,
        responses={200: {"description": "idempotent replay: already stored"}},
    )
    async def enroll(
        subject_id: SubjectPath,
        tenant_id: Tenant,
        body: Body,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Any:
        """Protect and store one feature map for a subject (one transaction).

        With an ``Idempotency-Key`` header a retry returns the stored template (200) instead of
        storing a second one; reusing a key for a different request is a 409.
        """
        if idempotency_key is not None and not _IDEM_RE.match(idempotency_key):
            raise ServiceError(
                400, "invalid_idempotency_key", "Idempotency-Key must be 1-128 printable ASCII"
            )
        digest = hashlib.sha256(body).hexdigest()
        if idempotency_key is not None:
            prior = await run_in_threadpool(svc.store.find_idempotent, tenant_id, idempotency_key)
            if prior is not None:
                return _replay(prior, subject_id, digest, idempotency_key)
        if not await run_in_threadpool(svc.store.subject_exists, tenant_id, subject_id):
            raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}")
        blob, emb = await run_in_threadpool(svc.protect_and_embed, body)

        def commit() -> tuple[Any, bool]:
            with svc.write_lock:
                row, created = svc.store.add_template(
                    tenant_id,
                    subject_id,
                    blob,
                    protection=protection_name,
                    protection_params=protection_params,
                    model_version=svc.backend.version,
                    request_sha256=digest,
                    idempotency_key=idempotency_key,
                )
                if created:
                    svc.gallery.add(tenant_id, row.template_id, subject_id, emb)
                return row, created

        try:
            row, created = await run_in_threadpool(commit)
        except NotFound:  # deleted while we were computing
            raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}") from None
        except IdempotencyConflict:
            raise _conflict(idempotency_key) from None
        if not created:
            return JSONResponse(_template_out(row, True).model_dump(), status_code=200)
        return _template_out(row)

    def _replay(prior: Any, subject_id: str, digest: str, key: str) -> JSONResponse:
        if prior.request_sha256 != digest or prior.subject_id != subject_id:
            raise _conflict(key)
        return JSONResponse(_template_out(prior, True).model_dump(), status_code=200)

    def _conflict(key: str | None) -> ServiceError:
        return ServiceError(
            409,
            "idempotency_conflict",
            f"Idempotency-Key {key!r} was already used for a different request",
        )

    @app.get(f"{p}/templates/{{template_id}}", response_model=TemplateOut, tags=["templates"])
    def get_template(
        template_id: Annotated[str, Path(max_length=64)], tenant_id: Tenant
    ) -> TemplateOut:
        """Metadata of a stored template (never the feature map itself)."""
        try:
            return _template_out(svc.store.get_template(tenant_id, template_id))
        except NotFound:
            raise ServiceError(404, "unknown_template", f"no template {template_id!r}") from None

    @app.delete(
        f"{p}/templates/{{template_id}}",
        response_model=TemplateDeleted,
        tags=["templates"],
        dependencies=ready_dep,
    )
    def delete_template(
        template_id: Annotated[str, Path(max_length=64)], tenant_id: Tenant
    ) -> TemplateDeleted:
        """Delete one template."""
        with svc.write_lock:
            try:
                svc.store.delete_template(tenant_id, template_id)
            except NotFound:
                raise ServiceError(
                    404, "unknown_template", f"no template {template_id!r}"
                ) from None
            svc.gallery.remove_template(tenant_id, template_id)
        return TemplateDeleted(template_id=template_id)

    @app.post(
        f"{p}/subjects/{{subject_id}}/verify",
        response_model=VerifyOut,
        tags=["recognition"],
        openapi_extra=_BINARY_BODY,
        dependencies=ready_dep,
    )
    async def verify(subject_id: SubjectPath, tenant_id: Tenant, body: Body) -> VerifyOut:
        """1:1: fresh probe feature map vs the subject's protected templates."""
        if not await run_in_threadpool(svc.store.subject_exists, tenant_id, subject_id):
            raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}")
        emb = await run_in_threadpool(svc.probe, body)
        score, n = svc.gallery.verify(tenant_id, subject_id, emb)
        if n == 0:
            raise ServiceError(409, "no_templates", f"subject {subject_id!r} has no templates")
        thr = settings.threshold
        return VerifyOut(
            subject_id=subject_id, score=score, match=score >= thr, threshold=thr, templates=n
        )

    @app.post(
        f"{p}/identify",
        response_model=IdentifyOut,
        tags=["recognition"],
        openapi_extra=_BINARY_BODY,
        dependencies=ready_dep,
    )
    async def identify(
        tenant_id: Tenant,
        body: Body,
        top_k: Annotated[int, Query(ge=1, le=settings.max_top_k)] = 5,
    ) -> IdentifyOut:
        """1:N: the top-k subjects by best template score."""
        emb = await run_in_threadpool(svc.probe, body)
        thr = settings.threshold
        return IdentifyOut(
            candidates=[
                Candidate(subject_id=s, score=sc, template_id=t, match=sc >= thr)
                for s, sc, t in svc.gallery.identify(tenant_id, emb, top_k)
            ],
            threshold=thr,
        )

    return app
