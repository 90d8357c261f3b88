"""``advface serve``, ``advface keys create`` and ``advface client ...`` (template service)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from advface.cli._errors import user_errors

keys_app = typer.Typer(help="API keys of the template service.", no_args_is_help=True)
client_app = typer.Typer(help="Talk to a running template service.", no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option(envvar="ADVFACE_URL", help="service base URL")]
KeyOpt = Annotated[str, typer.Option(envvar="ADVFACE_API_KEY", help="tenant API key")]
AlignedOpt = Annotated[bool, typer.Option(help="images are already 160x160 aligned crops")]
NoFaceOpt = Annotated[
    bool,
    typer.Option(
        "--allow-no-face",
        help="send images in which MTCNN finds no face (centre crop) instead of refusing them",
    ),
]
MasterKeyOpt = Annotated[
    str | None,
    typer.Option(
        help="master key file (base64) [ADVFACE_MASTER_KEY_FILE; else $ADVFACE_MASTER_KEY, "
        "else master.key in the cache dir]"
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        envvar="ADVFACE_BACKEND", help="client E: facenet | toy (tests); match the server"
    ),
]

HeadOpt = Annotated[
    str | None,
    typer.Option(help="distilled head folder used as Psi (advface distill) [ADVFACE_HEAD]"),
]


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("reembed")(reembed_cmd)
    app.command("migrate")(migrate_cmd)
    app.add_typer(keys_app, name="keys")
    app.add_typer(client_app, name="client")


def _settings(**overrides: Any) -> Any:
    from advface.service.settings import ServiceSettings

    try:
        return ServiceSettings.from_env(**overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def serve_cmd(
    host: Annotated[str | None, typer.Option(help="bind address [ADVFACE_HOST, 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [ADVFACE_PORT, 8000]")] = None,
    db_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL; default SQLite in the cache dir]"),
    ] = None,
    protection: Annotated[
        str | None,
        typer.Option(
            help="embedding-shadow|advface|random|dp|none [ADVFACE_PROTECTION; default: "
            "embedding-shadow with the networks of advface train-protection]"
        ),
    ] = None,
    allow_unprotected: Annotated[
        bool,
        typer.Option(
            help="allow --protection none (uploads stored as they are) [ADVFACE_ALLOW_UNPROTECTED]"
        ),
    ] = False,
    protection_params: Annotated[
        str | None, typer.Option(help="JSON object of protection parameters")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="cosine match threshold [ADVFACE_THRESHOLD]")
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="request body limit")] = None,
    backend: Annotated[str | None, typer.Option(help="facenet | toy (tests)")] = None,
    head: HeadOpt = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (0: default)")
    ] = None,
    header_timeout: Annotated[
        float | None,
        typer.Option(help="seconds to receive a request's headers [ADVFACE_HEADER_TIMEOUT, 10]"),
    ] = None,
    read_timeout: Annotated[
        float | None,
        typer.Option(help="seconds to receive a request's body [ADVFACE_READ_TIMEOUT, 30]"),
    ] = None,
    max_concurrent_uploads: Annotated[
        int | None,
        typer.Option(help="bodies read at once; more get 503 [ADVFACE_MAX_CONCURRENT_UPLOADS, 16]"),
    ] = None,
    rate_limit: Annotated[
        float | None,
        typer.Option(help="requests/second per API key, 0: off [ADVFACE_RATE_LIMIT, 20]"),
    ] = None,
    rate_burst: Annotated[
        int | None, typer.Option(help="burst per API key [ADVFACE_RATE_BURST, 40]")
    ] = None,
    db_timeout: Annotated[
        float | None,
        typer.Option(help="seconds to wait for a locked/unreachable DB [ADVFACE_DB_TIMEOUT, 10]"),
    ] = None,
    vector_index: Annotated[
        str | None,
        typer.Option(help="auto | hnsw (SQLite) | pgvector | exact [ADVFACE_VECTOR_INDEX, auto]"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="worker processes sharing the database [ADVFACE_WORKERS, 1]"),
    ] = None,
    storage_codec: Annotated[
        str | None,
        typer.Option(
            help="stored form of new maps: float16 | float32 | uint8 | embeddings-only "
            "[ADVFACE_STORAGE_CODEC, float16]"
        ),
    ] = None,
    master_key_file: MasterKeyOpt = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Run the template service (state in the database; any number of workers)."""
    params = None
    if protection_params is not None:
        try:
            params = json.loads(protection_params)
        except ValueError as exc:
            raise typer.BadParameter(f"--protection-params is not JSON: {exc}") from exc
    settings = _settings(
        host=host,
        port=port,
        db_url=db_url,
        protection=protection,
        protection_params=params,
        allow_unprotected=1 if allow_unprotected else None,
        threshold=threshold,
        max_body_bytes=max_body_bytes,
        backend=backend,
        head=head,
        torch_threads=torch_threads,
        header_timeout=header_timeout,
        read_timeout=read_timeout,
        max_concurrent_uploads=max_concurrent_uploads,
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        db_timeout=db_timeout,
        vector_index=vector_index,
        workers=workers,
        storage_codec=storage_codec,
        master_key_file=master_key_file,
    )
    _serve(settings, log_level)


def _open_store(settings: Any) -> Any:
    """The store with the configured master key (``error: ...`` when it does not fit)."""
    from advface.service import crypto
    from advface.service.settings import default_master_key_file
    from advface.service.store import Store

    with user_errors():
        keys = crypto.provider_from_config(
            settings.master_key_file, default_file=default_master_key_file()
        )
        store = Store(settings.db_url, timeout=settings.db_timeout, keys=keys)
        try:
            store.check_master_key()
        except crypto.MasterKeyError:
            store.close()
            raise
    return store


def _ensure_master_key(settings: Any) -> Any:
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
        _open_store(settings).close()  # raises when encrypted rows need a key we lack
        crypto.write_key_file(path)
        log.warning(
            "generated a new master key in %s (mode 0600). Keep a copy apart from the database: "
            "without it the stored templates cannot be read.",
            path,
        )
    else:
        log.info("master key: %s", path)
    return settings.with_(master_key_file=str(path))


def _serve(settings: Any, log_level: str) -> None:
    """Build the app (bad settings: ``error: ...``, exit 2) and run it under uvicorn."""
    import logging

    from advface.service import server
    from advface.service.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    with user_errors():
        server.check_workers(settings)
        settings = _ensure_master_key(settings)
        # Built here also with several workers: bad settings and a missing pgvector are
        # reported once, before any worker starts.
        app = create_app(settings)
    from sqlalchemy.engine import make_url

    db = make_url(settings.db_url).render_as_string(hide_password=True)
    typer.echo(
        f"advface serve: http://{settings.host}:{settings.port} db={db} "
        f"protection={settings.protection} backend={settings.backend} "
        f"psi={app.state.service.backend.embedding_version} "
        f"threshold={settings.threshold} index={type(app.state.service.index).__name__} "
        f"workers={settings.workers}",
        err=True,
    )
    server.run(app, settings, log_level)


def reembed_cmd(
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
    backend: Annotated[str | None, typer.Option(help="facenet | toy (tests)")] = None,
    head: HeadOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=4096, help="templates per Psi batch")] = 32,
    drop_other_versions: Annotated[
        bool, typer.Option(help="afterwards delete embeddings of other Psi versions")
    ] = False,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (0: default)")
    ] = None,
    master_key_file: MasterKeyOpt = None,
) -> None:
    """Compute the embeddings this Psi version lacks (after a Psi change or an upgrade).

    Resumable (each batch is committed) and safe while the service runs: a new Psi version
    gets its own rows, the running service keeps using its own until it is restarted.
    """
    from tqdm import tqdm

    from advface.service.app import build_index
    from advface.service.backend import load_backend
    from advface.service.core import embed_missing

    settings = _settings(
        db_url=db_url,
        backend=backend,
        head=head,
        torch_threads=torch_threads,
        master_key_file=master_key_file,
    )
    with user_errors():
        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        net = load_backend(settings.backend, settings.head)
    store = _open_store(settings)
    try:
        with user_errors():
            build_index(settings, store, net)  # pgvector: its vectors are written alongside
        version = net.embedding_version
        with user_errors():
            _refuse_mapless(store.count_missing_embeddings(version, net.version, mapless=True))
        todo = store.count_missing_embeddings(version, net.version)
        with tqdm(total=todo, unit="template", desc=f"reembed {version}") as bar:
            done, corrupt = embed_missing(store, net, batch=batch, on_batch=bar.update)
        left = store.count_missing_embeddings(version, net.version) - corrupt
        dropped = store.drop_other_embeddings(version) if drop_other_versions and not left else 0
        other_models = store.count_other_models(net.version)
    finally:
        store.close()
    _print(
        {
            "version": version,
            "embedded": done,
            "corrupt": corrupt,
            "missing": left,
            "dropped_other_versions": dropped,
            # Maps of another extractor E: Psi cannot embed them meaningfully.
            "skipped_other_models": other_models,
        }
    )


def _refuse_mapless(n: int) -> None:
    """Stop before any work when templates that need Psi or a protection have no map."""
    if n:
        raise ValueError(
            f"{n} templates were stored as embeddings only (storage codec embeddings-only): "
            "their feature maps were not kept, so they cannot be re-embedded or re-protected. "
            "Enroll those subjects again (or delete them) first"
        )


def migrate_cmd(
    protection: Annotated[str, typer.Option(help="target protection: none|random|dp|advface|...")],
    protection_params: Annotated[
        str, typer.Option(help="JSON object of the target protection's parameters")
    ] = "{}",
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
    backend: Annotated[str | None, typer.Option(help="facenet | toy (tests)")] = None,
    head: HeadOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=4096, help="templates per transaction")] = 32,
    master_key_file: MasterKeyOpt = None,
) -> None:
    """Re-protect stored templates whose protection (or parameters) differs from the target.

    The stored maps are already protected - the clear maps were never kept - so the target
    protection is applied to the stored map, and its embedding recomputed. Resumable (each
    batch is committed; migrated templates no longer differ). Then restart the service with
    the same --protection, or it keeps protecting new enrollments the old way.
    """
    from dataclasses import replace

    from tqdm import tqdm

    from advface.service.app import build_index, protection_for
    from advface.service.backend import load_backend
    from advface.service.core import public_params, reprotect

    settings = _settings(db_url=db_url, backend=backend, head=head, master_key_file=master_key_file)
    with user_errors():
        try:
            params = json.loads(protection_params)
        except ValueError as exc:
            raise ValueError(f"--protection-params is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise ValueError("--protection-params must be a JSON object")
        net = load_backend(settings.backend, settings.head)
        target = replace(settings, protection=protection, protection_params=params)
        prot = protection_for(target, net)
    store = _open_store(settings)
    try:
        with user_errors():
            build_index(settings, store, net)  # pgvector: its vectors are rewritten alongside
        with user_errors():
            n = store.count_to_reprotect(prot.name, public_params(prot), net.version, mapless=True)
            _refuse_mapless(n)
        todo = store.count_to_reprotect(prot.name, public_params(prot), net.version)
        with tqdm(total=todo, unit="template", desc=f"migrate to {prot.name}") as bar:
            done, corrupt = reprotect(
                store, net, prot, batch=batch, codec=settings.storage_codec, on_batch=bar.update
            )
        left = store.count_to_reprotect(prot.name, public_params(prot), net.version) - corrupt
        other_models = store.count_other_models(net.version)
    finally:
        store.close()
    _print(
        {
            "protection": prot.params(),
            "migrated": done,
            "corrupt": corrupt,
            "left": left,
            "skipped_other_models": other_models,
        }
    )


@keys_app.command("rotate-master")
def keys_rotate_master(
    new_key_file: Annotated[
        Path, typer.Option(help="the new master key (base64); created (0600) if missing")
    ],
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
    master_key_file: MasterKeyOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="keys per transaction")] = 256,
) -> None:
    """Re-wrap every subject's data key under a new master key (blobs are not touched).

    Resumable: each batch is committed and keys already under the new master key are skipped.
    Then start the service with --master-key-file NEW_KEY_FILE.
    """
    from tqdm import tqdm

    from advface.service import crypto

    settings = _settings(db_url=db_url, master_key_file=master_key_file)
    with user_errors():
        new = crypto.LocalKeyProvider(
            crypto.read_key_file(new_key_file)
            if new_key_file.exists()
            else crypto.write_key_file(new_key_file)
        )
    store = _open_store_for_rotation(settings, new)
    try:
        with user_errors():
            if store.keys is None:
                raise crypto.MasterKeyError("no current master key configured: nothing to rotate")
            with tqdm(unit="key", desc="rotate-master") as bar:
                n = store.rotate_master(new, batch=batch, on_batch=bar.update)
    finally:
        store.close()
    _print({"rewrapped": n, "master_key_id": new.key_id, "master_key_file": str(new_key_file)})


def _open_store_for_rotation(settings: Any, new: Any) -> Any:
    """The store under the current key; keys already under ``new`` (an interrupted rotation)
    are not an error here."""
    from advface.service import crypto
    from advface.service.settings import default_master_key_file
    from advface.service.store import Store

    with user_errors():
        keys = crypto.provider_from_config(
            settings.master_key_file, default_file=default_master_key_file()
        )
        if keys is not None and keys.key_id == new.key_id:
            raise crypto.MasterKeyError("the new master key is the current one")
    return Store(settings.db_url, timeout=settings.db_timeout, keys=keys)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="tenant name (created if new)")],
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
) -> None:
    """Create an API key for TENANT and print it (it is stored only as a hash)."""
    from advface.service.store import Store

    store = Store(_settings(db_url=db_url).db_url)
    try:
        token = store.create_key(tenant)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    finally:
        store.close()
    typer.echo(token)


@keys_app.command("list")
def keys_list(
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
) -> None:
    """List API keys (id, tenant, created, revoked; one JSON line each). Secrets are never shown:
    only their hashes are stored."""
    from advface.service.store import Store

    store = Store(_settings(db_url=db_url).db_url)
    try:
        for k in store.list_keys():
            _print(
                {
                    "key_id": k.key_id,
                    "tenant": k.tenant,
                    "created_at": k.created_at.isoformat(),
                    "revoked": k.revoked,
                }
            )
    finally:
        store.close()


@keys_app.command("rekey-tenant")
def keys_rekey_tenant(
    tenant: Annotated[str, typer.Argument(help="tenant name (as given to advface keys create)")],
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
    master_key_file: MasterKeyOpt = None,
) -> None:
    """Draw a new secret transform for a tenant's index vectors (no re-enrollment).

    pgvector's vectors of the tenant are re-transformed from the stored embeddings in one
    transaction; the in-process index takes the new transform at the next start. Stop the
    service first and start it again afterwards.
    """
    from advface.service.store import NotFound
    from advface.service.transform import rekey_tenant

    store = _open_store(_settings(db_url=db_url, master_key_file=master_key_file))
    try:
        with user_errors():
            try:
                out = rekey_tenant(store, tenant)
            except NotFound:
                raise ValueError(f"no tenant {tenant!r}") from None
    finally:
        store.close()
    _print(out)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="key id (the 12 hex digits after afk_)")],
    db_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL]")] = None,
) -> None:
    """Revoke an API key: requests with it get 401 from then on."""
    import re

    from advface.service.store import Store

    if not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise typer.BadParameter("KEY_ID must be the 12 hex digits of a key id (advface keys list)")
    store = Store(_settings(db_url=db_url).db_url)
    try:
        found = store.revoke_key(key_id)
    finally:
        store.close()
    if not found:
        typer.echo(f"error: no API key {key_id}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {key_id}")


def _client(url: str, api_key: str, backend: str = "facenet") -> Any:
    from advface.service.backend import load_backend
    from advface.service.sdk import AdvFaceClient

    extractor = load_backend(backend).extractor if backend != "facenet" else None
    return AdvFaceClient(url, api_key, extractor=extractor)


def _run(fn: Any) -> None:
    from advface.service.sdk import AdvFaceServiceError

    try:
        fn()
    except AdvFaceServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ValueError as exc:  # bad image, file not found, ...
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _print(obj: Any) -> None:
    from dataclasses import asdict, is_dataclass

    typer.echo(json.dumps(asdict(obj) if is_dataclass(obj) else obj))


@client_app.command("enroll")
def client_enroll(
    subject: str,
    images: Annotated[list[Path], typer.Argument(help="face images")],
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = "",
    create: Annotated[bool, typer.Option(help="create the subject if missing")] = True,
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
) -> None:
    """Align, extract E(x) here, and enroll each image for SUBJECT (one JSON line each)."""

    def go() -> None:
        with _client(url, api_key, backend) as c:
            # Every image is checked (readable, has a face) before anything is sent.
            feats = [c.features(i, aligned=aligned, allow_no_face=allow_no_face) for i in images]
            if create:
                c.create_subject(subject, exist_ok=True)
            for z in feats:
                _print(c.enroll(subject, z))

    _run(go)


@client_app.command("verify")
def client_verify(
    subject: str,
    image: Path,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = "",
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
) -> None:
    """1:1: is IMAGE the enrolled SUBJECT? Exit code 0 for a match, 3 for no match."""
    result: list[Any] = []

    def go() -> None:
        with _client(url, api_key, backend) as c:
            result.append(c.verify(subject, image, aligned=aligned, allow_no_face=allow_no_face))
            _print(result[0])

    _run(go)
    if not result[0].match:
        raise typer.Exit(3)


@client_app.command("identify")
def client_identify(
    image: Path,
    url: UrlOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = "",
    top_k: int = 5,
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
) -> None:
    """1:N: the TOP_K most similar enrolled subjects."""

    def go() -> None:
        with _client(url, api_key, backend) as c:
            found = c.identify(image, top_k, aligned=aligned, allow_no_face=allow_no_face)
            _print([vars(x) for x in found])

    _run(go)


@client_app.command("subjects")
def client_subjects(url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = "") -> None:
    """List the tenant's subjects (one JSON line each)."""

    def go() -> None:
        with _client(url, api_key) as c:
            for s in c.list_subjects():
                _print(s)

    _run(go)


@client_app.command("delete-subject")
def client_delete_subject(
    subject: str, url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = ""
) -> None:
    """Delete SUBJECT and its templates."""

    def go() -> None:
        with _client(url, api_key) as c:
            _print({"subject_id": subject, "deleted_templates": c.delete_subject(subject)})

    _run(go)
