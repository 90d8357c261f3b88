"""``advface keys ...``: API keys and the master key of the template service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from advface.cli._errors import user_errors
from advface.cli._server import (
    DbUrlOpt,
    MasterKeyOpt,
    check_db_url,
    existing_settings,
    open_db,
    open_store,
    print_json,
    settings_from,
    store_session,
)

keys_app = typer.Typer(help="API keys of the template service.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


_ROTATION_LEFT_HALF_DONE = (
    " (the rotation stopped part-way: rerun the same command to finish it before starting "
    "the service)"
)


@keys_app.command("rotate-master")
def keys_rotate_master(
    new_key_file: Annotated[
        Path, typer.Option(help="the new master key (base64); created (0600) if missing")
    ],
    db_url: DbUrlOpt = None,
    master_key_file: MasterKeyOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="keys per transaction")] = 256,
) -> None:
    """Re-wrap every subject's data key under a new master key (blobs are not touched).

    Resumable: each batch is committed and keys already under the new master key are skipped.
    Then start the service with --master-key-file NEW_KEY_FILE.
    """
    from tqdm import tqdm

    settings = existing_settings(db_url=db_url, master_key_file=master_key_file)
    store, new = _open_store_for_rotation(settings, new_key_file)
    with (
        store_session(store, settings.db_url, hint=_ROTATION_LEFT_HALF_DONE),
        user_errors(),
        tqdm(unit="key", desc="rotate-master") as bar,
    ):
        n = store.rotate_master(new, batch=batch, on_batch=bar.update)
    print_json({"rewrapped": n, "master_key_id": new.key_id, "master_key_file": str(new_key_file)})


def _open_store_for_rotation(settings: Any, new_key_file: Path) -> tuple[Any, Any]:
    """(the store under the current key, the new key's provider). Nothing is written
    (the new key file included) unless a current key is configured and differs from the new
    one and the database opens; keys already under the new key (an interrupted rotation) are
    not an error here."""
    from advface.service import crypto
    from advface.service.settings import default_master_key_file

    with user_errors():
        keys = crypto.provider_from_config(
            settings.master_key_file, default_file=default_master_key_file()
        )
        if keys is None:
            raise crypto.MasterKeyError("no current master key configured: nothing to rotate")
        new = None
        if new_key_file.exists():
            new = crypto.LocalKeyProvider(crypto.read_key_file(new_key_file))
            if keys.key_id == new.key_id:
                raise crypto.MasterKeyError("the new master key is the current one")
    store = open_db(settings, keys)
    if new is None:
        try:
            with user_errors():
                new = crypto.LocalKeyProvider(crypto.write_key_file(new_key_file))
        except BaseException:
            store.close()
            raise
    return store, new


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="tenant name (created if new)")],
    db_url: DbUrlOpt = None,
) -> None:
    """Create an API key for TENANT and print it (it is stored only as a hash)."""
    from advface.service.database import sqlite_path

    settings = settings_from(db_url=db_url)
    with user_errors():
        # The store's own rule, checked before a new database is created for nothing.
        if not tenant or len(tenant) > 128:
            raise ValueError("tenant name must be 1..128 characters")
        check_db_url(settings.db_url)
        path = sqlite_path(settings.db_url)
    if path is not None and not path.is_file():
        typer.echo(f"creating a new database at {path}", err=True)  # a typo shows here
    with store_session(open_db(settings), settings.db_url) as store, user_errors():
        token = store.create_key(tenant)
    typer.echo(token)


@keys_app.command("list")
def keys_list(
    db_url: DbUrlOpt = None,
) -> None:
    """List API keys (id, tenant, created, revoked; one JSON line each). Secrets are never shown:
    only their hashes are stored."""
    settings = existing_settings(db_url=db_url)
    with store_session(open_db(settings), settings.db_url) as store:
        for k in store.list_keys():
            print_json(
                {
                    "key_id": k.key_id,
                    "tenant": k.tenant,
                    "created_at": k.created_at.isoformat(),
                    "revoked": k.revoked,
                }
            )


@keys_app.command("rekey-tenant")
def keys_rekey_tenant(
    tenant: Annotated[str, typer.Argument(help="tenant name (as given to advface keys create)")],
    db_url: DbUrlOpt = None,
    master_key_file: MasterKeyOpt = None,
) -> None:
    """Draw a new secret transform for a tenant's index vectors (no re-enrollment).

    pgvector's vectors of the tenant are re-transformed from the stored embeddings in one
    transaction; the in-process index takes the new transform at the next start. Stop the
    service first and start it again afterwards.
    """
    from advface.service.store import NotFound
    from advface.service.transform import rekey_tenant

    settings = existing_settings(db_url=db_url, master_key_file=master_key_file)
    with store_session(open_store(settings), settings.db_url) as store, user_errors():
        try:
            out = rekey_tenant(store, tenant)
        except NotFound:
            raise ValueError(f"no tenant {tenant!r}") from None
    print_json(out)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="key id (the 12 hex digits after afk_)")],
    db_url: DbUrlOpt = None,
) -> None:
    """Revoke an API key: requests with it get 401 from then on."""
    import re

    with user_errors():
        if not re.fullmatch(r"[0-9a-f]{12}", key_id):
            raise ValueError("KEY_ID must be the 12 hex digits of a key id (advface keys list)")
    settings = existing_settings(db_url=db_url)
    with store_session(open_db(settings), settings.db_url) as store:
        found = store.revoke_key(key_id)
    if not found:
        typer.echo(f"error: no API key {key_id}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {key_id}")
