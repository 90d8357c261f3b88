"""``advface protect``: protect a safetensors file of client features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import check_checkpoint_dir, loading, user_errors
from advface.cli._options import DeviceOpt, JsonOpt, QuietOpt

SrcArg = Annotated[Path, typer.Argument(help="safetensors with tensor z (N,64,77,77)")]
DstArg = Annotated[Path, typer.Argument(help="output safetensors (written atomically)")]
MethodOpt = Annotated[
    str, typer.Option("--method", help="advface | embedding-shadow | random | dp | none")
]
ShadowOpt = Annotated[
    Path | None, typer.Option("--shadow", help="shadow reconstruction checkpoint (advface)")
]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", help="iterations T (advface, random; default 40)")
]
AlphaOpt = Annotated[float | None, typer.Option("--alpha", help="step size (default 0.2)")]
EpsilonOpt = Annotated[
    float | None,
    typer.Option("--epsilon", help="noise bound (advface; random bound; dp sensitivity)"),
]
ReadingOpt = Annotated[str | None, typer.Option("--reading", help="per-step | projected (advface)")]
BnOpt = Annotated[
    str | None, typer.Option("--bn", help="shadow BN statistics: batch | sample | running")
]
GeneratorOpt = Annotated[
    Path | None,
    typer.Option("--generator", help="embedding-to-image generator checkpoint (embedding-shadow)"),
]
ClampMinOpt = Annotated[
    float | None, typer.Option("--clamp-min", help="clamp AdvFace iterates (e.g. 0)")
]
KeepBestOpt = Annotated[
    bool,
    typer.Option("--keep-best", help="store each face's highest-shadow-loss iterate (advface)"),
]
EpsilonDpOpt = Annotated[
    float | None, typer.Option("--epsilon-dp", help="dp privacy budget (default 1.0)")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1)]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, help="seed (random, dp)")]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="FaceNet weights for E (default: converted)")
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace DST")]


def register(app: typer.Typer) -> None:
    app.command("protect")(protect_command)


def protect_command(
    src: SrcArg,
    dst: DstArg,
    method: MethodOpt = "advface",
    shadow: ShadowOpt = None,
    steps: StepsOpt = None,
    alpha: AlphaOpt = None,
    epsilon: EpsilonOpt = None,
    reading: ReadingOpt = None,
    bn: BnOpt = None,
    generator: GeneratorOpt = None,
    clamp_min: ClampMinOpt = None,
    keep_best: KeepBestOpt = False,
    epsilon_dp: EpsilonDpOpt = None,
    batch_size: BatchOpt = 64,
    seed: SeedOpt = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Protect the features in SRC and write them, with the protection's parameters, to DST."""
    import torch

    from advface.pipelines.protect import build_from_options, protect_file

    if threads is not None:
        torch.set_num_threads(threads)
    with user_errors():
        networks = method in ("advface", "embedding-shadow")
        checkpoints = (("--shadow", shadow), ("--generator", generator))
        extractor = head = None
        if networks:
            extractor, head = _networks(method, shadow, generator, weights)
        with loading(*checkpoints):
            protection = build_from_options(
                method,
                shadow=shadow,
                steps=steps,
                alpha=alpha,
                epsilon=epsilon,
                reading=reading,
                bn=bn,
                clamp_min=clamp_min,
                keep_best=True if keep_best else None,
                epsilon_dp=epsilon_dp,
                generator=generator,
                extractor=extractor,
                head=head,
                device=device if networks else None,
            )
        summary = protect_file(
            src,
            dst,
            protection,
            batch_size=batch_size,
            seed=seed,
            overwrite=overwrite,
            progress=not quiet,
        )
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"protected {summary['n_faces']} faces with {method} in {summary['wall_s']} s "
        f"({summary['faces_per_s']} faces/s) -> {summary['output']}"
    )


def _networks(method: str, shadow: Path | None, generator: Path | None, weights: Path | None):
    """FaceNet's E and Psi for a protection that runs networks, after checking (before FaceNet
    loads, which takes seconds) that its checkpoints are given and readable."""
    if shadow is None:
        raise ValueError(f"--method {method} needs --shadow CKPT (a reconstruction checkpoint)")
    if method == "embedding-shadow" and generator is None:
        raise ValueError("--method embedding-shadow needs --generator CKPT (an EmbDec)")
    for option, folder in (("--shadow", shadow), ("--generator", generator)):
        if folder is not None:
            check_checkpoint_dir(folder, option)
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet

    with loading(("--weights", weights)):
        return split_facenet(load_facenet(weights))
