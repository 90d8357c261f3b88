"""What the service's operator commands share: settings from flags and the environment, the
store under the configured master key, JSON output and the options they have in common."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from advface.cli._errors import user_errors

DbUrlOpt = Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")]
MasterKeyOpt = Annotated[
    str | None,
    typer.Option(
        help="master key file (base64) [ADVFACE_MASTER_KEY_FILE; default master.key in the "
        "cache dir]; $ADVFACE_MASTER_KEY (the key itself, base64) takes precedence over both"
    ),
]
HeadOpt = Annotated[
    str | None,
    typer.Option(help="distilled head folder used as Psi (advface distill) [ADVFACE_HEAD]"),
]


def settings_from(**overrides: Any) -> Any:
    """Service settings from the environment and ``overrides`` (``error: ...`` when invalid)."""
    from advface.service.settings import ServiceSettings

    with user_errors():
        return ServiceSettings.from_env(**overrides)


def db_label(url: str) -> str:
    """``url`` as it may be shown: its password hidden, also in a URL that does not parse."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*):[^/]*@", r"\1:***@", url)


def _db_reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # a DBAPIError: the driver's own message
    return " ".join(str(orig if orig is not None else exc).split())


@contextmanager
def _cannot_open(url: str, *errors: type[BaseException]) -> Iterator[None]:
    """``errors`` raised inside become ``ValueError('cannot open database URL: reason')``."""
    try:
        yield
    except errors as exc:
        reason = _db_reason(exc)
        if isinstance(exc, ImportError):
            reason = f"its driver is not installed ({reason})"
        raise ValueError(f"cannot open database {db_label(url)}: {reason}") from None


@contextmanager
def store_session(store: Any, url: str, hint: str = "") -> Iterator[Any]:
    """Yield ``store`` and close it on the way out. A database error raised inside (locked,
    full, connection lost) is ``error: database URL: reason`` and exit status 1 instead of a
    traceback (``hint`` appended); the commands commit per batch, so what was committed
    before it stays."""
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    try:
        yield store
    except (DBAPIError, PoolTimeout) as exc:
        typer.echo(f"error: database {db_label(url)}: {_db_reason(exc)}{hint}", err=True)
        raise typer.Exit(1) from exc
    finally:
        store.close()


def check_db_url(url: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse, an unknown kind of database or one whose driver
    is missing (``ValueError``), before anything is created."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from advface.service.database import normalise_url

    with _cannot_open(url, ArgumentError, ValueError, ImportError):
        make_url(normalise_url(url)).get_dialect().import_dbapi()


def open_db(settings: Any, keys: Any = None) -> Any:
    """The store of ``settings.db_url``; a bad URL or a database that cannot be reached or
    read is ``error: cannot open database ...`` (exit 2). The one way the CLI opens it."""
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from advface.service.store import Store

    with user_errors():
        check_db_url(settings.db_url)
        with _cannot_open(settings.db_url, ArgumentError, DBAPIError, ImportError, OSError):
            return Store(settings.db_url, timeout=settings.db_timeout, keys=keys)


def existing_settings(**overrides: Any) -> Any:
    """Settings for a command that works on an existing database: a SQLite file that does not
    exist (a mistyped --db-url) is an ``error: ...`` instead of a new, empty database."""
    from advface.service.database import sqlite_path

    settings = settings_from(**overrides)
    with user_errors():
        check_db_url(settings.db_url)
        path = sqlite_path(settings.db_url)
        if path is not None and not path.is_file():
            raise ValueError(
                f"no database at {path}: check --db-url / ADVFACE_DB_URL "
                "(advface serve and advface keys create make a new one)"
            )
    return settings


def open_store(settings: Any) -> Any:
    """The store with the configured master key (``error: ...`` when it does not fit)."""
    from sqlalchemy.exc import DBAPIError

    from advface.service import crypto
    from advface.service.settings import default_master_key_file

    with user_errors():
        keys = crypto.provider_from_config(
            settings.master_key_file, default_file=default_master_key_file()
        )
    store = open_db(settings, keys)
    with user_errors():
        try:
            with _cannot_open(settings.db_url, DBAPIError):
                store.check_master_key()
        except ValueError:  # crypto.MasterKeyError is one too
            store.close()
            raise
    return store


def ensure_master_key(settings: Any) -> Any:
    """Settings naming the master key file; a fresh deployment gets a new one (0600).

    No key is generated for a database that already holds encrypted rows: that is a lost or
    unconfigured key, reported as an error instead.
    """
    import logging
    import os

    from advface.service import crypto
    from advface.service.settings import default_master_key_file

    log = logging.getLogger("advface.service")
    if os.environ.get(crypto.MASTER_KEY_ENV):
        log.info("master key: from $%s", crypto.MASTER_KEY_ENV)
        return settings
    path = Path(settings.master_key_file or default_master_key_file())
    if not settings.master_key_file and not path.exists():
        open_store(settings).close()  # raises when encrypted rows need a key we lack
        crypto.write_key_file(path)
        log.warning(
            "generated a new master key in %s (mode 0600). Keep a copy apart from the database: "
            "without it the stored templates cannot be read.",
            path,
        )
    else:
        log.info("master key: %s", path)
    return settings.with_(master_key_file=str(path))


def print_json(obj: Any) -> None:
    from dataclasses import asdict, is_dataclass

    typer.echo(json.dumps(asdict(obj) if is_dataclass(obj) else obj))
