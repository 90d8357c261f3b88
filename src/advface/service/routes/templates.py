"""Templates: enroll (protect, then store) under a subject; read metadata; delete."""

import hashlib
import re
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from advface.service.core import Service, template_out
from advface.service.errors import ServiceError, error_responses
from advface.service.routes.deps import READY, Body, SubjectId, Svc, TemplateId, Tenant
from advface.service.routes.subjects import API_ERRORS, BODY_ERRORS
from advface.service.schemas import BINARY_BODY, StatsOut, TemplateDeleted, TemplateOut
from advface.service.store import IdempotencyConflict, NotFound

_IDEM_RE = re.compile(r"[\x21-\x7e]{1,128}")


def _conflict(key: str | None) -> ServiceError:
    return ServiceError(
        409,
        "idempotency_conflict",
        f"Idempotency-Key {key!r} was already used for a different request",
    )


def _replay(prior: Any, subject_id: str, digest: str, key: str) -> JSONResponse:
    if prior.request_sha256 != digest or prior.subject_id != subject_id:
        raise _conflict(key)
    return JSONResponse(template_out(prior, True).model_dump(), status_code=200)


async def _enroll(
    svc: Service, tenant_id: int, subject_id: str, body: bytes, idempotency_key: str | None
) -> Any:
    """validate -> protect -> store, or replay an idempotent retry (see the route)."""
    if idempotency_key is not None and not _IDEM_RE.fullmatch(idempotency_key):
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
    try:
        # Map and embedding in one transaction; indexes follow the database (see core).
        row, created = await run_in_threadpool(
            svc.store.add_template,
            tenant_id,
            subject_id,
            blob,
            embedding=(svc.backend.embedding_version, emb),
            protection=svc.protection_name,
            protection_params=svc.protection_params,
            model_version=svc.backend.version,
            request_sha256=digest,
            idempotency_key=idempotency_key,
        )
    except NotFound:  # deleted while we were computing
        raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}") from None
    except IdempotencyConflict:
        raise _conflict(idempotency_key) from None
    if not created:
        return JSONResponse(template_out(row, True).model_dump(), status_code=200)
    return template_out(row)


def router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["templates"])

    @r.post(
        "/subjects/{subject_id}/templates",
        status_code=201,
        response_model=TemplateOut,
        openapi_extra=BINARY_BODY,
        dependencies=READY,
        responses={
            200: {"model": TemplateOut, "description": "idempotent replay: already stored"},
            **error_responses(*API_ERRORS, *BODY_ERRORS, 404, 409, 415),
        },
    )
    async def enroll(
        subject_id: SubjectId,
        tenant_id: Tenant,
        svc: Svc,
        body: Body,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> Any:
        """Protect and store one feature map for a subject (one transaction).

        With an ``Idempotency-Key`` header a retry returns the stored template (200) instead of
        storing a second one; reusing a key for a different request is a 409.
        """
        return await _enroll(svc, tenant_id, subject_id, body, idempotency_key)

    @r.get(
        "/templates/{template_id}",
        response_model=TemplateOut,
        responses=error_responses(*API_ERRORS, 404),
    )
    def get_template(template_id: TemplateId, tenant_id: Tenant, svc: Svc) -> TemplateOut:
        """Metadata of a stored template (never the feature map itself)."""
        try:
            return template_out(svc.store.get_template(tenant_id, template_id, with_blob=False))
        except NotFound:
            raise ServiceError(404, "unknown_template", f"no template {template_id!r}") from None

    # Not behind READY, like deleting a subject (see there).
    @r.delete(
        "/templates/{template_id}",
        response_model=TemplateDeleted,
        responses=error_responses(*API_ERRORS, 404),
    )
    def delete_template(template_id: TemplateId, tenant_id: Tenant, svc: Svc) -> TemplateDeleted:
        """Delete one template (and its embeddings); also while the service is still starting."""
        try:
            svc.store.delete_template(tenant_id, template_id)
        except NotFound:
            raise ServiceError(404, "unknown_template", f"no template {template_id!r}") from None
        return TemplateDeleted(template_id=template_id)

    @r.get("/stats", response_model=StatsOut, responses=error_responses(*API_ERRORS))
    def stats(tenant_id: Tenant, svc: Svc) -> StatsOut:
        """The tenant's templates per protection (and parameters) and per model version of E
        (what ``advface migrate`` would change)."""
        return StatsOut(**svc.store.template_stats(tenant_id))

    return r
