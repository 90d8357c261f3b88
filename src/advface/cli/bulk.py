"""``advface protect-bulk``: protect a large set of feature maps (or faces) on Ray Data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import check_weights, user_errors
from advface.cli._options import JsonOpt, check_device_name

SrcArg = Annotated[
    Path,
    typer.Argument(
        help="a .safetensors/.npy file or a folder of them (z feature maps or uint8 "
        "'images' aligned faces), or the output folder of an earlier protect-bulk run"
    ),
]
DstArg = Annotated[Path, typer.Argument(help="output folder: manifest.json + shards/")]
ProtectionOpt = Annotated[
    str,
    typer.Option(
        "--protection",
        help="protection spec: 'advface:SHADOW_CKPT[,steps=40,...]', 'random,seed=3', "
        "'dp', 'none', 'embedding-shadow,generator=CKPT,shadow=CKPT'",
    ),
]
BatchOpt = Annotated[int, typer.Option(min=1, help="faces per protection call")]
ShardOpt = Annotated[int, typer.Option(min=1, help="faces per output shard (the unit of resume)")]
SeedOpt = Annotated[
    int | None, typer.Option(min=0, help="seed of random protections (one stream per shard)")
]
ActorsOpt = Annotated[int, typer.Option(min=1, help="Ray actors, each holding one protection")]
NumCpusOpt = Annotated[
    float, typer.Option(min=0.01, help="CPUs per actor (also its torch threads)")
]
NumGpusOpt = Annotated[float, typer.Option(min=0.0, help="GPUs per actor (0: CPU only)")]
AddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (e.g. 'auto', 'ray://head:10001'); default: local"),
]
RayCpusOpt = Annotated[
    int | None, typer.Option(min=1, help="CPUs of the local Ray (default: actors x --num-cpus)")
]
EngineOpt = Annotated[
    str, typer.Option(help="ray | serial (this process, no Ray: same shards and results)")
]
WeightsOpt = Annotated[Path | None, typer.Option(help="FaceNet weights for E (default: converted)")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(help="cpu | cuda (default: cuda when --num-gpus > 0)", callback=check_device_name),
]
PrecheckOpt = Annotated[
    bool, typer.Option(help="scan every feature map for NaN/Inf before writing anything")
]
OverwriteOpt = Annotated[
    bool, typer.Option(help="replace a DST that holds a run with other settings")
]


def register(app: typer.Typer) -> None:
    app.command("protect-bulk")(protect_bulk_command)


def protect_bulk_command(
    src: SrcArg,
    dst: DstArg,
    protection: ProtectionOpt,
    batch_size: BatchOpt = 64,
    shard_size: ShardOpt = 1024,
    seed: SeedOpt = None,
    actors: ActorsOpt = 1,
    num_cpus: NumCpusOpt = 1.0,
    num_gpus: NumGpusOpt = 0.0,
    address: AddressOpt = None,
    ray_cpus: RayCpusOpt = None,
    engine: EngineOpt = "ray",
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
    precheck: PrecheckOpt = True,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Protect every face of SRC into resumable shards under DST, on Ray actors.

    Rerunning the same command resumes: finished shards are skipped. See docs/SERVICE.md
    ("Bulk protection").
    """
    from advface.pipelines.bulk import ProtectionFactory, RayOptions, run_bulk

    with user_errors():
        opts = RayOptions(
            actors=actors,
            cpus_per_actor=num_cpus,
            gpus_per_actor=num_gpus,
            address=address,
            num_cpus=ray_cpus,
        )
        if engine == "ray":
            _require_ray()
        if weights is not None:
            check_weights(weights)  # names the file; the workers would not
        factory = ProtectionFactory(
            protection,
            weights=None if weights is None else str(weights),
            device=device or ("cuda" if num_gpus > 0 else "cpu"),
        )
        bar = None
        if not as_json:
            from tqdm.auto import tqdm

            bar = tqdm(desc="protect-bulk", unit="shard", delay=1.0)  # no bar before an error
        try:
            summary = run_bulk(
                src,
                dst,
                factory,
                shard_size=shard_size,
                batch_size=batch_size,
                seed=seed,
                engine=engine,
                ray_options=opts,
                precheck=precheck,
                overwrite=overwrite,
                on_shard=None if bar is None else (lambda r: bar.update(1)),
            )
        finally:
            if bar is not None:
                bar.close()
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"protected {summary['faces_computed']} faces in {summary['shards_computed']} shards "
        f"({summary['shards_skipped']} already done) in {summary['wall_s']} s -> {dst}"
    )


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError(
            "Ray is not installed: pip install 'advface[bulk]' (or use --engine serial)"
        ) from None
