"""Recognition on the protected templates: verify (1:1) and identify (1:N)."""

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from advface.service.errors import ServiceError, error_responses
from advface.service.routes.deps import READY, Body, SubjectId, Svc, Tenant
from advface.service.routes.subjects import API_ERRORS, BODY_ERRORS
from advface.service.schemas import BINARY_BODY, Candidate, IdentifyOut, VerifyOut
from advface.service.settings import ServiceSettings


def router(settings: ServiceSettings) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["recognition"])
    thr = settings.threshold

    @r.post(
        "/subjects/{subject_id}/verify",
        response_model=VerifyOut,
        openapi_extra=BINARY_BODY,
        dependencies=READY,
        responses=error_responses(*API_ERRORS, *BODY_ERRORS, 404, 409, 415),
    )
    async def verify(subject_id: SubjectId, tenant_id: Tenant, svc: Svc, body: Body) -> VerifyOut:
        """1:1: fresh probe feature map vs the subject's protected templates."""
        if not await run_in_threadpool(svc.store.subject_exists, tenant_id, subject_id):
            raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}")
        emb = await run_in_threadpool(svc.probe, body)
        score, n = await run_in_threadpool(svc.verify, tenant_id, subject_id, emb)
        if n == 0:
            raise ServiceError(409, "no_templates", f"subject {subject_id!r} has no templates")
        if svc.metrics is not None:
            svc.metrics.decision("verify", score >= thr)
        return VerifyOut(
            subject_id=subject_id, score=score, match=score >= thr, threshold=thr, templates=n
        )

    @r.post(
        "/identify",
        response_model=IdentifyOut,
        openapi_extra=BINARY_BODY,
        dependencies=READY,
        responses=error_responses(*API_ERRORS, *BODY_ERRORS, 415),
    )
    async def identify(
        tenant_id: Tenant,
        svc: Svc,
        body: Body,
        top_k: Annotated[int, Query(ge=1, le=settings.max_top_k)] = 5,
    ) -> IdentifyOut:
        """1:N: the top-k subjects by best template score."""
        emb = await run_in_threadpool(svc.probe, body)
        hits = await run_in_threadpool(svc.identify, tenant_id, emb, top_k)
        if svc.metrics is not None:  # an empty gallery answers no match
            svc.metrics.decision("identify", bool(hits) and hits[0].score >= thr)
        return IdentifyOut(
            candidates=[
                Candidate(
                    subject_id=h.subject_id,
                    score=h.score,
                    template_id=h.template_id,
                    match=h.score >= thr,
                )
                for h in hits
            ],
            threshold=thr,
        )

    return r
