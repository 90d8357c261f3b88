"""``advface serve``, ``advface reembed`` and ``advface migrate`` (the template service)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from advface.cli._errors import check_checkpoint_dir, loading, user_errors
from advface.cli._server import (
    DbUrlOpt,
    HeadOpt,
    MasterKeyOpt,
    check_db_url,
    db_label,
    ensure_master_key,
    existing_settings,
    open_store,
    print_json,
    settings_from,
    store_session,
)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("reembed")(reembed_cmd)
    app.command("migrate")(migrate_cmd)


HostOpt = Annotated[str | None, typer.Option(help="bind address [ADVFACE_HOST, 127.0.0.1]")]
PortOpt = Annotated[int | None, typer.Option(help="port [ADVFACE_PORT, 8000]")]
ServeDbUrlOpt = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy URL [ADVFACE_DB_URL; default SQLite in the cache dir]"),
]
ProtectionOpt = Annotated[
    str | None,
    typer.Option(
        help="embedding-shadow|advface|random|dp|none [ADVFACE_PROTECTION; default: "
        "embedding-shadow with the networks of advface train-protection]"
    ),
]
AllowUnprotectedOpt = Annotated[
    bool,
    typer.Option(
        help="allow --protection none (uploads stored as they are) [ADVFACE_ALLOW_UNPROTECTED]"
    ),
]
ProtectionParamsOpt = Annotated[
    str | None, typer.Option(help="JSON object of protection parameters")
]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="cosine match threshold [ADVFACE_THRESHOLD]")
]
MaxBodyBytesOpt = Annotated[int | None, typer.Option(help="request body limit")]
BackendOpt = Annotated[str | None, typer.Option(help="facenet | toy (tests)")]
TorchThreadsOpt = Annotated[int | None, typer.Option(min=0, help="torch CPU threads (0: default)")]
HeaderTimeoutOpt = Annotated[
    float | None,
    typer.Option(help="seconds to receive a request's headers [ADVFACE_HEADER_TIMEOUT, 10]"),
]
ReadTimeoutOpt = Annotated[
    float | None,
    typer.Option(help="seconds to receive a request's body [ADVFACE_READ_TIMEOUT, 30]"),
]
MaxConcurrentUploadsOpt = Annotated[
    int | None,
    typer.Option(help="bodies read at once; more get 503 [ADVFACE_MAX_CONCURRENT_UPLOADS, 16]"),
]
RateLimitOpt = Annotated[
    float | None,
    typer.Option(help="requests/second per API key, 0: off [ADVFACE_RATE_LIMIT, 20]"),
]
RateBurstOpt = Annotated[
    int | None, typer.Option(help="burst per API key [ADVFACE_RATE_BURST, 40]")
]
DbTimeoutOpt = Annotated[
    float | None,
    typer.Option(help="seconds to wait for a locked/unreachable DB [ADVFACE_DB_TIMEOUT, 10]"),
]
VectorIndexOpt = Annotated[
    str | None,
    typer.Option(help="auto | hnsw (SQLite) | pgvector | exact [ADVFACE_VECTOR_INDEX, auto]"),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(help="worker processes sharing the database [ADVFACE_WORKERS, 1]"),
]
StorageCodecOpt = Annotated[
    str | None,
    typer.Option(
        help="stored form of new maps: float16 | float32 | uint8 | embeddings-only "
        "[ADVFACE_STORAGE_CODEC, float16]"
    ),
]
MetricsOpt = Annotated[
    bool | None,
    typer.Option(
        "--metrics/--no-metrics",
        help="GET /metrics, Prometheus text, aggregate only [ADVFACE_METRICS, off]; "
        "ADVFACE_METRICS_TOKEN makes scrapes send it as a bearer token",
    ),
]
# uvicorn's levels (uvicorn.config.LOG_LEVELS); "trace" is uvicorn's own, below debug.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LogLevelOpt = Annotated[str, typer.Option(help=f"uvicorn log level: {' | '.join(LOG_LEVELS)}")]


def serve_cmd(
    host: HostOpt = None,
    port: PortOpt = None,
    db_url: ServeDbUrlOpt = None,
    protection: ProtectionOpt = None,
    allow_unprotected: AllowUnprotectedOpt = False,
    protection_params: ProtectionParamsOpt = None,
    threshold: ThresholdOpt = None,
    max_body_bytes: MaxBodyBytesOpt = None,
    backend: BackendOpt = None,
    head: HeadOpt = None,
    torch_threads: TorchThreadsOpt = None,
    header_timeout: HeaderTimeoutOpt = None,
    read_timeout: ReadTimeoutOpt = None,
    max_concurrent_uploads: MaxConcurrentUploadsOpt = None,
    rate_limit: RateLimitOpt = None,
    rate_burst: RateBurstOpt = None,
    db_timeout: DbTimeoutOpt = None,
    vector_index: VectorIndexOpt = None,
    workers: WorkersOpt = None,
    storage_codec: StorageCodecOpt = None,
    master_key_file: MasterKeyOpt = None,
    metrics: MetricsOpt = None,
    log_level: LogLevelOpt = "info",
) -> None:
    """Run the template service (state in the database; any number of workers)."""
    with user_errors():
        if log_level.lower() not in LOG_LEVELS:
            raise ValueError(
                f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}"
            )
        params = None if protection_params is None else _json_object(protection_params)
    settings = settings_from(
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
        metrics=None if metrics is None else int(metrics),
    )
    _serve(settings, log_level)


def _backend(settings: Any) -> Any:
    """The configured networks (Psi from ``settings.head`` if set); a head whose files do not
    load is an ``error: ...`` naming them."""
    from advface.service.backend import load_backend

    if settings.head:
        check_checkpoint_dir(Path(settings.head), "--head")
    with loading(("--head", settings.head or None)):
        return load_backend(settings.backend, settings.head)


def _json_object(text: str) -> dict[str, Any]:
    """``--protection-params`` as a dict (``ValueError`` when not a JSON object)."""
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--protection-params is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ValueError("--protection-params must be a JSON object")
    return params


def _serve(settings: Any, log_level: str) -> None:
    """Build the app (bad settings: ``error: ...``, exit 2) and run it under uvicorn.

    Everything that can be checked without the database is checked first, so a refused
    start-up leaves no new database or master key behind.
    """
    import logging

    from uvicorn.config import LOG_LEVELS as UVICORN_LEVELS

    from advface.service import server
    from advface.service.app import create_app, protection_for

    # Numeric: logging knows no "TRACE" until uvicorn registers it.
    level = UVICORN_LEVELS[log_level.lower()]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")
    with user_errors():
        check_db_url(settings.db_url)
        server.check_workers(settings)
        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        net = _backend(settings)
        prot = protection_for(settings, net)
    settings = ensure_master_key(settings)
    store = open_store(settings)
    try:
        with user_errors():
            # Built here also with several workers: bad settings and a missing pgvector are
            # reported once, before any worker starts.
            app = create_app(settings, store=store, backend=net, protection=prot)
    except BaseException:
        store.close()
        raise
    typer.echo(
        f"advface serve: http://{settings.host}:{settings.port} db={db_label(settings.db_url)} "
        f"protection={settings.protection} backend={settings.backend} "
        f"psi={app.state.service.backend.embedding_version} "
        f"threshold={settings.threshold} index={type(app.state.service.index).__name__} "
        f"workers={settings.workers}",
        err=True,
    )
    server.run(app, settings, log_level.lower())


def reembed_cmd(
    db_url: DbUrlOpt = None,
    backend: BackendOpt = None,
    head: HeadOpt = None,
    batch: Annotated[int, typer.Option(min=1, max=4096, help="templates per Psi batch")] = 32,
    drop_other_versions: Annotated[
        bool, typer.Option(help="afterwards delete embeddings of other Psi versions")
    ] = False,
    torch_threads: TorchThreadsOpt = None,
    master_key_file: MasterKeyOpt = None,
) -> None:
    """Compute the embeddings this Psi version lacks (after a Psi change or an upgrade).

    Resumable (each batch is committed) and safe while the service runs: a new Psi version
    gets its own rows, the running service keeps using its own until it is restarted.
    """
    from tqdm import tqdm

    from advface.service.app import build_index
    from advface.service.core import embed_missing

    settings = existing_settings(
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
        net = _backend(settings)
    with store_session(open_store(settings), settings.db_url) as store:
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
    print_json(
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
    db_url: DbUrlOpt = None,
    backend: BackendOpt = None,
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
    from advface.service.core import public_params, reprotect

    settings = existing_settings(
        db_url=db_url, backend=backend, head=head, master_key_file=master_key_file
    )
    with user_errors():
        params = _json_object(protection_params)
        net = _backend(settings)
        target = replace(settings, protection=protection, protection_params=params)
        prot = protection_for(target, net)
    with store_session(open_store(settings), settings.db_url) as store:
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
    print_json(
        {
            "protection": prot.params(),
            "migrated": done,
            "corrupt": corrupt,
            "left": left,
            "skipped_other_models": other_models,
        }
    )
