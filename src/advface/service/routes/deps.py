"""Dependencies shared by the routers: service state, tenant, ids, binary bodies."""

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader

from advface.service.auth import API_KEY_HEADER, MODEL_HEADER
from advface.service.core import Service
from advface.service.errors import ServiceError
from advface.service.ids import SUBJECT_ID_HELP, check_template_id, normalise_subject_id
from advface.service.schemas import OCTET

# Declares the scheme in OpenAPI; the key itself is checked by the RequestGuard middleware
# before the body is read, which leaves the tenant id in the request state.
_api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

NOT_READY = "the template gallery is still loading"
STARTUP_FAILED = "start-up failed; the server log says why"


def get_service(request: Request) -> Service:
    return request.app.state.service


def tenant(request: Request, _key: Annotated[str | None, Depends(_api_key_scheme)]) -> int:
    tenant_id = getattr(request.state, "tenant_id", None)
    if tenant_id is None:  # a route outside the guarded prefix: never serve it unauthenticated
        raise ServiceError(401, "missing_api_key", f"missing {API_KEY_HEADER} header")
    return int(tenant_id)


def subject_id(
    subject_id: Annotated[str, Path(max_length=512, description=SUBJECT_ID_HELP)],
) -> str:
    try:
        return normalise_subject_id(subject_id)
    except ValueError as exc:
        raise ServiceError(422, "invalid_subject_id", str(exc)) from None


def template_id(template_id: Annotated[str, Path(max_length=64)]) -> str:
    try:
        return check_template_id(template_id)
    except ValueError as exc:
        raise ServiceError(422, "invalid_template_id", str(exc)) from None


def require_ready(svc: Annotated[Service, Depends(get_service)]) -> None:
    if svc.ready.is_set():
        return
    if svc.startup_error:
        raise ServiceError(503, "startup_failed", STARTUP_FAILED)
    raise ServiceError(503, "not_ready", NOT_READY)


async def binary_body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", OCTET).split(";")[0].strip().lower()
    if ctype not in (OCTET, ""):
        raise ServiceError(415, "unsupported_media_type", f"send the payload as {OCTET}")
    claimed = request.headers.get(MODEL_HEADER)
    ours = get_service(request).backend.version
    if claimed is not None and claimed != ours:
        raise ServiceError(
            422,
            "model_mismatch",
            f"the feature map comes from E {claimed[:100]!r}, this service runs E {ours!r}: "
            "its templates would match nothing (export the service's E for the client)",
        )
    body = await request.body()
    if not body:
        raise ServiceError(422, "invalid_payload", "empty request body")
    return body


Svc = Annotated[Service, Depends(get_service)]
Tenant = Annotated[int, Depends(tenant)]
SubjectId = Annotated[str, Depends(subject_id)]
TemplateId = Annotated[str, Depends(template_id)]
Body = Annotated[bytes, Depends(binary_body)]
READY = [Depends(require_ready)]
