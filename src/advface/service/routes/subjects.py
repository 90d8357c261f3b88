"""``/v1/subjects``: create, list (keyset paging), delete with templates."""

from typing import Annotated

from fastapi import APIRouter, Query

from advface.service.core import iso
from advface.service.errors import ServiceError, error_responses
from advface.service.ids import normalise_subject_id
from advface.service.routes.deps import SubjectId, Svc, Tenant
from advface.service.schemas import SubjectDeleted, SubjectIn, SubjectOut, SubjectPage
from advface.service.settings import ServiceSettings
from advface.service.store import AlreadyExists, NotFound

# Every /v1 route: auth, validation, rate limit, database outage, bugs.
API_ERRORS = (401, 422, 429, 500, 503)
# Routes that take a request body: bad Content-Length, body too slow, body too large.
BODY_ERRORS = (400, 408, 413)


def router(settings: ServiceSettings) -> APIRouter:
    r = APIRouter(prefix="/v1/subjects", tags=["subjects"])

    @r.post(
        "",
        status_code=201,
        response_model=SubjectOut,
        responses=error_responses(*API_ERRORS, *BODY_ERRORS, 409),
    )
    def create_subject(body: SubjectIn, tenant_id: Tenant, svc: Svc) -> SubjectOut:
        """Create a subject (409 if it exists)."""
        try:
            created = svc.store.create_subject(tenant_id, body.subject_id)
        except AlreadyExists:
            raise ServiceError(
                409, "subject_exists", f"subject {body.subject_id!r} already exists"
            ) from None
        return SubjectOut(subject_id=body.subject_id, created_at=iso(created))

    @r.get("", response_model=SubjectPage, responses=error_responses(*API_ERRORS))
    def list_subjects(
        tenant_id: Tenant,
        svc: Svc,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_size)] = 100,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
    ) -> SubjectPage:
        """Subjects in id order, keyset-paged."""
        if cursor is not None:
            try:
                cursor = normalise_subject_id(cursor)
            except ValueError as exc:
                raise ServiceError(422, "invalid_subject_id", f"cursor: {exc}") from None
        rows = svc.store.list_subjects(tenant_id, limit + 1, after=cursor)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [SubjectOut(subject_id=s, created_at=iso(c), templates=n) for s, c, n in rows]
        return SubjectPage(items=items, next_cursor=rows[-1][0] if more and rows else None)

    # Not behind READY: an erasure request must not wait for a long start-up. Deleting needs
    # no in-memory index; the change log records the cascaded deletes of the embeddings, which
    # the index being loaded replays (see core.IndexSync).
    @r.delete(
        "/{subject_id}",
        response_model=SubjectDeleted,
        responses=error_responses(*API_ERRORS, 404),
    )
    def delete_subject(subject_id: SubjectId, tenant_id: Tenant, svc: Svc) -> SubjectDeleted:
        """Delete a subject and all its templates (and their embeddings); also while the
        service is still starting."""
        try:
            ids = svc.store.delete_subject(tenant_id, subject_id)
        except NotFound:
            raise ServiceError(404, "unknown_subject", f"no subject {subject_id!r}") from None
        return SubjectDeleted(subject_id=subject_id, deleted_templates=len(ids))

    return r
