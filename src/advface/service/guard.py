"""What every request passes before an endpoint runs: auth, rate limit, upload cap, body limits.

The order matters. The API key is checked from the headers alone, so an unauthenticated client
cannot make the server buffer a body; the rate limit is charged per key; only then does an
upload take one of the few upload slots and is its body read, within a size and time limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from advface.service.auth import API_KEY_HEADER, parse_key_id
from advface.service.errors import database_error, error_response

API_PREFIX = "/v1"
_KEY_HEADER = API_KEY_HEADER.lower().encode("latin-1")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass
class TokenBucket:
    """Per-key token buckets: ``rate`` tokens a second, at most ``burst`` saved up.

    In-process state: with several worker processes each one limits on its own.
    """

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0 if allowed, else seconds until a token is back."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


@dataclass(frozen=True)
class GuardLimits:
    max_body_bytes: int
    read_timeout: float  # seconds for the whole request body
    max_concurrent_uploads: int


class RequestGuard:
    """ASGI middleware; authenticated requests carry ``scope["state"]["tenant_id"]``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str], int | None],
        limits: GuardLimits,
        limiter: TokenBucket | None,
    ) -> None:
        self.app, self.authenticate, self.limits, self.limiter = app, authenticate, limits, limiter
        # Only touched from the event loop, so a plain counter is race-free.
        self.uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            refusal = await self._admit(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        if self.uploads >= self.limits.max_concurrent_uploads:
            busy = error_response(
                503,
                "too_many_uploads",
                "too many uploads in progress; retry shortly",
                headers={"Retry-After": "1"},
            )
            await busy(scope, receive, send)
            return
        self.uploads += 1
        try:
            await self._with_body(scope, receive, send)
        finally:
            self.uploads -= 1

    async def _admit(self, scope: Scope) -> ASGIApp | None:
        """Authenticate from the headers and charge the rate limit; a response if refused."""
        token = _header(scope, _KEY_HEADER)
        if not token:
            return error_response(401, "missing_api_key", f"missing {API_KEY_HEADER} header")
        try:
            tenant_id = await run_in_threadpool(self.authenticate, token)
        except SQLAlchemyError as exc:
            return database_error(exc, "authentication")
        if tenant_id is None:
            return error_response(401, "invalid_api_key", "invalid or revoked API key")
        if self.limiter is not None:
            wait = self.limiter.take(parse_key_id(token) or token)
            if wait > 0:
                return error_response(
                    429,
                    "rate_limited",
                    "rate limit exceeded for this API key",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        scope.setdefault("state", {})["tenant_id"] = tenant_id
        return None

    async def _with_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the whole body within the limits, then hand it to the app in one message."""
        limit = self.limits.max_body_bytes
        raw_len = _header(scope, b"content-length")
        if raw_len is not None:
            if not (raw_len.isascii() and raw_len.isdigit()):
                await error_response(400, "bad_request", "invalid Content-Length")(
                    scope, receive, send
                )
                return
            if int(raw_len) > limit:
                await _too_large(limit)(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        try:
            # One deadline for the whole body: a client trickling bytes cannot hold a slot.
            with anyio.fail_after(self.limits.read_timeout):
                more = True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body = msg.get("body", b"")
                    size += len(body)
                    if size > limit:
                        await _too_large(limit)(scope, receive, send)
                        return
                    chunks.append(body)
                    more = msg.get("more_body", False)
        except TimeoutError:
            timeout = error_response(
                408,
                "request_timeout",
                f"request body not received within {self.limits.read_timeout:g}s",
                headers={"Connection": "close"},
            )
            await timeout(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _too_large(limit: int) -> ASGIApp:
    return error_response(413, "payload_too_large", f"request body exceeds {limit} bytes")
