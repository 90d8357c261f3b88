"""The service's one error model: ``{"error": {"code", "message", "status"}}``.

Every failure - validation, auth, limits, database outages, unexpected bugs - is answered in this
envelope, and the OpenAPI document declares it (``error_responses``) for every route.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from advface.service import crypto, payload
from advface.service.server import redact_path

log = logging.getLogger("advface.service")


class ServiceError(Exception):
    """An error answered as ``{"error": {"code", "message", "status"}}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


class ValidationDetail(BaseModel):
    loc: list[str]
    msg: str


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_api_key")
    message: str = Field(description="human-readable explanation")
    status: int = Field(description="the HTTP status, repeated")
    details: list[ValidationDetail] | None = Field(
        None, description="per-field problems (validation_error only)"
    )


class ErrorEnvelope(BaseModel):
    """The body of every non-2xx response."""

    error: ErrorInfo


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "status": status, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# Codes each status can carry (OpenAPI descriptions; the list is the documentation).
_STATUS_CODES: dict[int, str] = {
    400: "bad_request, invalid_idempotency_key",
    401: "missing_api_key, invalid_api_key",
    404: "not_found, unknown_subject, unknown_template",
    405: "method_not_allowed",
    408: "request_timeout (the body did not arrive in time)",
    409: "subject_exists, idempotency_conflict, no_templates",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error, invalid_subject_id, invalid_template_id, invalid_payload, "
    "invalid_shape, invalid_dtype, non_finite, invalid_features",
    429: "rate_limited (see Retry-After)",
    500: "internal_error, database_error, decryption_failed",
    503: "not_ready, startup_failed, database_unavailable, too_many_uploads (see Retry-After)",
}


_RETRY_AFTER = {
    "description": "seconds to wait before retrying (rate_limited, too_many_uploads, "
    "database_unavailable)",
    "schema": {"type": "integer"},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``statuses``, all with the envelope schema."""
    out: dict[int | str, dict[str, Any]] = {}
    for s in sorted(set(statuses)):
        out[s] = {"model": ErrorEnvelope, "description": f"error codes: {_STATUS_CODES[s]}"}
        if s in (429, 503):
            out[s]["headers"] = {"Retry-After": _RETRY_AFTER}
    return out


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
# Connection lost, server gone, locked SQLite file, pool exhausted: retrying later can succeed.
DB_UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
)


def database_error(exc: Exception, where: str) -> JSONResponse:
    """Typed answer to a database failure; logs the driver's error class, never SQL parameters."""
    orig = getattr(exc, "orig", None)
    cause = type(orig).__name__ if orig is not None else type(exc).__name__
    if isinstance(exc, DB_UNAVAILABLE):
        log.error("database unavailable during %s: %s", where, cause)
        return error_response(
            503,
            "database_unavailable",
            "the database is unavailable; retry later",
            headers={"Retry-After": "1"},
        )
    log.error("database error during %s: %s", where, cause)
    return error_response(500, "database_error", "database error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception in the envelope."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(payload.PayloadError)
    async def _payload(_: Request, exc: payload.PayloadError) -> JSONResponse:
        return error_response(422, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        return error_response(422, "validation_error", "request validation failed", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(crypto.CryptoError)
    async def _crypto(request: Request, exc: crypto.CryptoError) -> JSONResponse:
        # A row that does not authenticate was copied or altered in the database (or the key
        # is wrong): nothing the client can fix, and nothing about the row is echoed.
        log.error(
            "stored data does not decrypt during %s %s",
            request.method,
            redact_path(request.url.path),  # no subject id in a log
        )
        return error_response(500, "decryption_failed", "stored data does not decrypt")

    @app.exception_handler(sa_exc.SQLAlchemyError)
    async def _database(request: Request, exc: sa_exc.SQLAlchemyError) -> JSONResponse:
        return database_error(exc, f"{request.method} {redact_path(request.url.path)}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback and re-raises after sending this answer.
        return error_response(500, "internal_error", "internal server error")
