"""``advface reproduce``: every table and figure of the paper in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import check_weights, user_errors
from advface.cli._options import CacheDirOpt, DataRootOpt, DeviceOpt, QuietOpt, WeightsOpt


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce_cmd)
    app.command("report")(report_cmd)
    app.command("stage")(stage_cmd)
    app.command("unstage")(unstage_cmd)


def reproduce_cmd(
    profile: Annotated[str, typer.Option(help="smoke | cpu | cpu-full | paper")] = "cpu",
    out: Annotated[Path, typer.Option(help="output folder (reused stages are cached here)")] = Path(
        "runs/reproduce"
    ),
    data_root: DataRootOpt = None,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "cpu",
    weights: WeightsOpt = None,
    head: Annotated[
        list[str] | None,
        typer.Option(
            help="LABEL=DIR: a head distilled by `advface distill` for an offline row of "
            "Table 2 (repeat)"
        ),
    ] = None,
    quiet: QuietOpt = False,
    datasets: Annotated[
        str | None,
        typer.Option(help="comma-separated subset of the profile's datasets (default: all)"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads (default: torch's choice)")
    ] = None,
    stages_only: Annotated[
        bool,
        typer.Option(help="compute and cache the stages, write no results (a helper process)"),
    ] = False,
) -> None:
    """Run (or resume) the paper's experiments; write results.json, CSVs, report.md, PNGs.

    Every stage is cached under OUT/cache (training checkpoints every epoch): rerun the same
    command to resume an interrupted run. Once the decoders and offline heads are trained
    (in one process: their time budgets count CPU time per thread), a helper process may
    share OUT, e.g. --datasets cfp-fp --threads 1 --stages-only beside the main run
    with --threads 1 (on two cores about a fifth more throughput than one process with two
    threads); the main run reuses the helper's stages and writes the results."""
    from advface import config
    from advface.pipelines.reproduce.headline import headline_table
    from advface.pipelines.reproduce.profiles import get_profile
    from advface.pipelines.reproduce.run import reproduce

    with user_errors():
        heads = parse_heads(head or [])
        prof = get_profile(profile)
        if datasets is not None:
            prof = get_profile(profile, datasets=parse_datasets(datasets, prof.datasets))
        # Before OUT/cache is made: a missing data root or unloadable weights create nothing.
        config.data_root(data_root)
        if weights is not None:
            check_weights(weights, cache_dir)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        res = reproduce(
            prof,
            out,
            data_root=data_root,
            cache=cache_dir,
            device=device,
            progress=not quiet,
            weights=weights,
            head_dirs=heads,
            write=not stages_only,
        )
    if stages_only:
        typer.echo(f"stages cached under {out / 'cache'}  ({res['wall_s']:.0f} s)")
        return
    typer.echo(headline_table(res["rows"]))
    typer.echo(f"\nreport: {out / 'report.md'}  ({res['wall_s']:.0f} s)")


def report_cmd(
    folder: Annotated[Path, typer.Argument(help="a reproduction's or a bench's output folder")],
) -> None:
    """Re-render FOLDER's report.md and table CSVs from its results.json (no computation):
    after a change to the report, or to read a partial run's results. A bench's folder
    (advface bench) gets the bench's report."""
    from advface.pipelines.reproduce.report import (
        load_results_json,
        read_results,
        render_results,
        write_csvs,
        write_report,
    )
    from advface.pipelines.robustness.report import is_bench_results, rerender

    with user_errors():
        results = folder / "results.json"
        data = load_results_json(results)  # read once, then rendered by its kind
        if is_bench_results(data):
            typer.echo(f"wrote {rerender(folder, data)}")
            return
        meta, rows = read_results(results, data)
        text = render_results(results, meta, rows)  # in memory: nothing written unless it renders
        write_csvs(folder, rows)
        path = write_report(folder, meta, rows, text)
    typer.echo(f"wrote {path}")


def parse_datasets(spec: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``lfw,cfp-fp`` -> a tuple in the profile's order; unknown or repeated names and an
    empty list are a ValueError."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"--datasets takes distinct names of {', '.join(allowed)}, got {spec!r}")
    return tuple(d for d in allowed if d in names)


def parse_heads(specs: list[str]) -> dict[str, Path]:
    """``LABEL=DIR`` options -> {label: folder}; a bad form, a label given twice, the label
    ``psi`` or a missing folder is a ValueError."""
    heads: dict[str, Path] = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        label, folder = label.strip(), folder.strip()
        if not sep or not label or not folder:
            raise ValueError(f"--head takes LABEL=DIR, got {spec!r}")
        if label in heads:
            raise ValueError(f"--head label {label!r} given twice")
        if label == "psi":  # reproduce() refuses it too; here before the data root is checked
            raise ValueError("an extra head cannot be labelled 'psi' (FaceNet's own head)")
        if not Path(folder).is_dir():
            raise ValueError(f"--head {label}: no folder {folder}")
        heads[label] = Path(folder)
    return heads


def stage_cmd(
    out: Annotated[Path, typer.Option(help="stage folder (must not exist)")] = Path(".stage"),
    data_root: DataRootOpt = None,
    cache_dir: CacheDirOpt = None,
    dataset: Annotated[
        list[str] | None, typer.Option(help="lfw / cfp / celeba (repeat; default all)")
    ] = None,
    part_mib: Annotated[
        float,
        typer.Option(
            help="size of each part, 8-62 (one transfer to the GPU machine, which also carries "
            "the working tree: leave room for it)"
        ),
    ] = 40.0,
    quality: Annotated[int, typer.Option(help="JPEG quality of the staged faces")] = 95,
    celeba_part: Annotated[
        str, typer.Option(help="all | server | attacker half of CelebA's identities")
    ] = "all",
    quiet: QuietOpt = False,
) -> None:
    """Stage aligned faces + fp16 FaceNet into parts of at most PART_MIB, for a remote GPU
    machine that takes a limited transfer per call."""
    from advface.pipelines.staging import STAGE_DATASETS, stage

    with user_errors():
        manifest = stage(
            out,
            data_root=data_root,
            cache=cache_dir,
            datasets=tuple(dataset) if dataset else STAGE_DATASETS,
            part_mib=part_mib,
            quality=quality,
            celeba_part=celeba_part,
            progress=not quiet,
        )
    for d, info in manifest["datasets"].items():
        typer.echo(
            f"{d}: {info['images']} faces, {info['jpeg_bytes'] / 2**20:.1f} MiB, "
            f"JPEG PSNR {info['jpeg_psnr_db']} dB"
        )
    w = manifest["weights"]
    typer.echo(f"weights fp16: min cosine {w['min_cosine']:.6f} on {w['probe_faces']} faces")
    typer.echo(f"{len(manifest['parts'])} parts in {out}: send one per command to the GPU machine")


def unstage_cmd(
    stage_dir: Annotated[Path, typer.Argument(help="folder holding part-00 ... part-NN")],
    root: Annotated[Path, typer.Option(help="staged data root to write")],
) -> None:
    """Verify a stage's parts and write the staged data root (on the GPU machine)."""
    from advface.pipelines.staging import unstage

    with user_errors():
        path = unstage(stage_dir, root)
    typer.echo(str(path))
