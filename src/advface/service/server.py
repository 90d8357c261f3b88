"""Running the app under uvicorn: slow-client timeouts, access logs without query strings or ids,
and a non-zero exit when the start-up fails for good."""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from advface.service.settings import ServiceSettings

# Everything between a route's id prefix and its last fixed segment: a subject id (perhaps an
# e-mail address) or a template id. Matching up to the suffix, not one segment, also covers an
# id with an encoded "/", so no fragment of it is left behind.
_SUBJECT_PATH = re.compile(r"(/v1/+subjects/+).+?(/templates|/verify)?/*$")
_TEMPLATE_PATH = re.compile(r"(/v1/+templates/+).+$")


def redact_path(path: str) -> str:
    """``path`` with its subject or template id replaced by ``{id}``."""
    path = _SUBJECT_PATH.sub(lambda m: f"{m[1]}{{id}}{m[2] or ''}", path, count=1)
    return _TEMPLATE_PATH.sub(lambda m: f"{m[1]}{{id}}", path, count=1)


class RedactAccessLog(logging.Filter):
    """Drop the query string and the ids in the path from uvicorn access-log lines.

    Query strings can carry secrets (a client that puts its API key in ``?api_key=``) or personal
    data (cursors are subject ids), and so can paths (``/v1/subjects/{id}/verify``); access logs
    are kept longer and read by more people than the database. The route alone still tells what
    was hit.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, sep, _ = args[2].partition("?")
            path = redact_path(path) + ("?[redacted]" if sep else "")
            record.args = (args[0], args[1], path, args[3], args[4])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with :class:`RedactAccessLog` on the access handler."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg.setdefault("filters", {})["redact_access"] = {"()": f"{__name__}.RedactAccessLog"}
    cfg["handlers"]["access"]["filters"] = ["redact_access"]
    return cfg


class _HeaderTimeoutH11(H11Protocol):
    """h11 protocol that closes connections whose request head does not arrive in time.

    uvicorn only times out idle keep-alive connections; a client that opens a connection and
    sends nothing, or a header line every few seconds (slowloris), would hold it forever.
    """

    header_timeout: float = 10.0
    _head_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Part of a request head (or the first bytes of the next keep-alive request).
            if self._head_timer is None:
                self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class EnvHeaderTimeoutH11(_HeaderTimeoutH11):
    """The protocol by import path for worker processes; timeout from the environment."""

    header_timeout = float(os.environ.get("ADVFACE_HEADER_TIMEOUT") or 10.0)


def h11_protocol(header_timeout: float) -> type[H11Protocol]:
    """The h11 protocol class with a request-head timeout of ``header_timeout`` seconds."""
    return type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout": header_timeout})


def check_workers(settings: ServiceSettings) -> None:
    """Refuse worker counts the database cannot serve (clear ``ValueError``)."""
    from advface.service.database import normalise_url, sqlite_path

    url = normalise_url(settings.db_url)
    if settings.workers > 1 and url.startswith("sqlite") and sqlite_path(url) is None:
        raise ValueError(
            "--workers > 1 needs a database the workers share: a SQLite file or PostgreSQL, "
            "not in-memory SQLite"
        )


def run(app: Any, settings: ServiceSettings, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn; with ``settings.workers > 1``, that many processes.

    Workers share nothing but the database (and, with SQLite, its change log): each builds
    its own app from the ``ADVFACE_*`` environment, so ``app`` only serves one worker.
    """
    import uvicorn

    common: dict[str, Any] = dict(
        host=settings.host, port=settings.port, log_level=log_level, log_config=log_config()
    )
    if settings.workers == 1:
        if hasattr(app, "state"):
            # A start-up that fails for good ends the process (non-zero) instead of leaving
            # it answering 503; the worker processes' apps set this in ``app_from_env``.
            app.state.exit_on_startup_failure = True
        uvicorn.run(app, http=h11_protocol(settings.header_timeout), workers=1, **common)
        return
    check_workers(settings)
    from advface.service.app import EXIT_STARTUP_FATAL, STARTUP_FAILED_FILE_ENV

    # Worker processes are spawned: they read the settings (and the header timeout of
    # EnvHeaderTimeoutH11) from the environment they inherit.
    os.environ.update(settings.to_env())
    with tempfile.TemporaryDirectory(prefix="advface-serve-") as tmp:
        failed = Path(tmp) / "startup-failed"
        os.environ[STARTUP_FAILED_FILE_ENV] = str(failed)
        if settings.metrics:
            from advface.service.metrics import MULTIPROC_ENV

            # The workers' samples meet in files here, so any worker's /metrics sums them;
            # a fresh folder per run, as prometheus_client's multiprocess mode requires.
            (Path(tmp) / "metrics").mkdir()
            os.environ[MULTIPROC_ENV] = str(Path(tmp) / "metrics")
        uvicorn.run(
            "advface.service.app:app_from_env",
            factory=True,
            http=f"{__name__}:EnvHeaderTimeoutH11",
            workers=settings.workers,
            **common,
        )
        if failed.exists():
            # uvicorn stopped every worker because one cannot start; it returns normally.
            sys.exit(EXIT_STARTUP_FATAL)
