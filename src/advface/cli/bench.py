"""``advface bench``: every protection against every attacker, beside the floors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import user_errors
from advface.cli._options import CacheDirOpt, DataRootOpt, DeviceOpt, QuietOpt, WeightsOpt


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
    app.command("train-protection")(train_protection_cmd)


def bench_cmd(
    profile: Annotated[str, typer.Option(help="smoke | cpu | gpu")] = "cpu",
    out: Annotated[Path, typer.Option(help="output folder (cached stages live here)")] = Path(
        "runs/bench"
    ),
    data_root: DataRootOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "cpu",
    dataset: Annotated[
        list[str] | None, typer.Option(help="lfw / cfp-fp (repeat; default: the profile's)")
    ] = None,
    weights: WeightsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run (or resume) the robustness bench; write results.json, report.md and figures."""
    from advface.pipelines.robustness import get_profile, run_bench
    from advface.pipelines.robustness.report import summary

    with user_errors():
        overrides = {"datasets": tuple(dataset)} if dataset else {}
        res = run_bench(
            get_profile(profile, **overrides),
            out,
            data_root=data_root,
            cache=cache_dir,
            device=device,
            progress=not quiet,
            weights=weights,
        )
    typer.echo(summary(res["rows"]))
    typer.echo(f"\nreport: {out / 'report.md'}  ({res['wall_s']:.0f} s)")


def train_protection_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="folder (default: $ADVFACE_CACHE_DIR/weights/embedding-shadow)"),
    ] = None,
    data_root: DataRootOpt = None,
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    limit: Annotated[int | None, typer.Option(help="images of CelebA's server half")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing folder")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the shadow and generator embedding-shadow uses by default (CelebA server half)."""
    from advface.pipelines.default_weights import train_default_protection
    from advface.protection.embedding_shadow import default_weights_dir

    with user_errors():
        manifest = train_default_protection(
            out,
            data_root=data_root,
            epochs=epochs,
            limit=limit,
            overwrite=overwrite,
            progress=not quiet,
        )
    typer.echo(json.dumps(manifest["check"]))
    typer.echo(f"wrote {out or default_weights_dir()} ({manifest['seconds']} s)")
