"""``advface bench``: every protection against every attacker, beside the floors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import check_weights, user_errors
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
    from advface import config
    from advface.pipelines.robustness import get_profile, run_bench
    from advface.pipelines.robustness.report import summary
    from advface.pipelines.robustness.run import DATASETS

    with user_errors():
        # Checked before anything is written or trained (a typo would cost hours).
        bad = [d for d in dataset or () if d not in DATASETS]
        if bad:
            raise ValueError(
                f"--dataset takes {', '.join(DATASETS)}, got {', '.join(map(repr, bad))}"
            )
        twice = sorted({d for d in dataset or () if dataset.count(d) > 1})
        if twice:
            raise ValueError(f"--dataset {', '.join(twice)} given twice")
        overrides = {"datasets": tuple(dataset)} if dataset else {}
        prof = get_profile(profile, **overrides)
        config.data_root(data_root)
        if weights is not None:
            check_weights(weights, cache_dir)
        res = run_bench(
            prof,
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
