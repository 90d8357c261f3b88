"""``advface reproduce``: every table and figure of the paper in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_cmd)


def reproduce_cmd(
    profile: Annotated[str, typer.Option(help="smoke | cpu | paper")] = "cpu",
    out: Annotated[Path, typer.Option(help="output folder (reused stages are cached here)")] = Path(
        "runs/reproduce"
    ),
    data_root: Annotated[
        Path | None, typer.Option(help="dataset root (or ADVFACE_DATA_ROOT)")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="cache (or ADVFACE_CACHE_DIR)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Run (or resume) the paper's experiments; write results.json, CSVs, report.md, PNGs."""
    from advface.pipelines.reproduce.headline import headline_table
    from advface.pipelines.reproduce.profiles import get_profile
    from advface.pipelines.reproduce.run import reproduce

    try:
        prof = get_profile(profile)
        res = reproduce(
            prof, out, data_root=data_root, cache=cache_dir, device=device, progress=not quiet
        )
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(headline_table(res["rows"]))
    typer.echo(f"\nreport: {out / 'report.md'}  ({res['wall_s']:.0f} s)")
