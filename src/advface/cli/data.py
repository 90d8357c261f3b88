"""``advface prepare``: build aligned image caches (and optionally download LFW)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import user_errors


def prepare_command(
    dataset: Annotated[
        str, typer.Argument(help="lfw | cfp | celeba | PATH to a folder of <identity>/<image>")
    ],
    data_root: Annotated[
        Path | None,
        typer.Option("--data-root", help="Folder holding lfw/, cfp/, celeba/ [$ADVFACE_DATA_ROOT]"),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Cache folder [$ADVFACE_CACHE_DIR, ~/.cache/advface]"),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Only the first N images (a separate small cache)"),
    ] = None,
    download: Annotated[
        bool,
        typer.Option("--download", help="lfw only: fetch LFW from its public source if absent"),
    ] = False,
    download_url: Annotated[
        str | None,
        typer.Option("--download-url", help="Base URL to download LFW from (with --download)"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="OpenCV threads (default: OpenCV's choice)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if complete")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Align DATASET with MTCNN into a 160x160 uint8 cache (resumable), then print a summary."""
    from advface import config
    from advface.data.prepare import load_aligned, prepare

    with user_errors():
        if download_url is not None and not download:
            raise ValueError("--download-url applies only with --download")
        if download and dataset != "lfw":
            raise ValueError("--download is only available for lfw")
        root = config.data_root(data_root, must_exist=False) if download else None
    if threads is not None:
        import cv2

        cv2.setNumThreads(threads)
    if root is not None:
        from advface.data.download import LFW_BASE_URL, ensure_lfw

        # A failed download is no bad input: exit status 1, as for any failed run.
        with user_errors(code=1):
            ensure_lfw(root, base_url=download_url or LFW_BASE_URL, progress=progress)
        data_root = root
    with user_errors():
        t0 = time.perf_counter()
        out = prepare(
            dataset,
            data_root=data_root,
            cache=cache_dir,
            limit=limit,
            progress=progress,
            force=force,
        )
        elapsed = time.perf_counter() - t0
        aligned = load_aligned(dataset, cache=cache_dir, limit=limit)
    fallback = aligned.meta.get("settings", {}).get("fallback", "already aligned crops")
    typer.echo(
        f"{dataset}: {len(aligned)} images, {aligned.n_fallback} no-face fallbacks "
        f"({fallback}), {elapsed:.1f} s -> {out}"
    )
    if aligned.n_fallback:
        missed = [k for k, f in zip(aligned.keys, aligned.found, strict=True) if not f]
        more = f" (+{len(missed) - 5} more in index.json)" if len(missed) > 5 else ""
        typer.echo(f"no face found in: {', '.join(missed[:5])}{more}")


def register(app: typer.Typer) -> None:
    """Add ``prepare`` to the ``advface`` app."""
    app.command("prepare")(prepare_command)
