"""``advface train-recon`` and ``advface attack``: reconstruction attacks on stored features."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import user_errors
from advface.cli._options import DeviceOpt, JsonOpt

ARCH_HELP = "transrec | resrec | urec"

TrainSetOpt = Annotated[
    str,
    typer.Option(
        "--train-set",
        help="lfw-attacker (identity-disjoint from LFW folds 1-5 and CFP) | lfw-nonpairs | "
        "celeba | PATH (aligned faces)",
    ),
]
DepthOpt = Annotated[
    int | None,
    typer.Option("--depth", help="transrec: extra layers; resrec: blocks; urec: levels"),
]
OverwriteCkptOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace a checkpoint already in --out (without it or --resume: an error)",
    ),
]
MaxMinutesOpt = Annotated[
    float | None,
    typer.Option(
        "--max-minutes",
        help="Stop and checkpoint after this many minutes of training (on the CPU: CPU "
        "time per thread, so other jobs on the cores do not shorten it)",
    ),
]
FeaturesOpt = Annotated[
    str,
    typer.Option(
        "--features",
        help="clean | advface:SHADOW_CKPT[,epsilon=..] (adaptive attacker: trains on "
        "features protected with its own shadow)",
    ),
]


def _parse_cfg(width: int | None, depth: int | None, arch: str, profile: str) -> dict[str, int]:
    """The profile's cfg with the generic --width/--depth mapped onto each network's names."""
    from advface.models.recon import profile_config

    cfg = profile_config(arch, profile)
    if width is not None:
        cfg["width"] = width
    if depth is not None:
        cfg[{"transrec": "depth", "resrec": "blocks", "urec": "levels"}.get(arch, "depth")] = depth
    return cfg


def train_recon_command(
    arch: Annotated[str, typer.Option("--arch", help=ARCH_HELP)] = "resrec",
    train_set: TrainSetOpt = "lfw-attacker",
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory")] = Path("runs/recon"),
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (paper: 1e-4)")] = 1e-4,
    profile: Annotated[
        str, typer.Option("--profile", help="cpu (narrow, default) | gpu (wide, deep)")
    ] = "cpu",
    width: Annotated[int | None, typer.Option("--width", help="Channels (profile's)")] = None,
    depth: DepthOpt = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=2, help="First N images")] = None,
    device: DeviceOpt = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from --out")] = False,
    overwrite: OverwriteCkptOpt = False,
    max_minutes: MaxMinutesOpt = None,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips")] = True,
    features: FeaturesOpt = "clean",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a reconstruction network R(E(x)) ~ x with L1 loss; prints a JSON summary.

    A checkpoint already in --out is refused unless --resume continues it or --overwrite
    replaces it."""
    import torch

    from advface.attacks.train import TrainSettings
    from advface.pipelines.attack import train_attacker

    if threads is not None:
        torch.set_num_threads(threads)
    with user_errors():
        settings = TrainSettings(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            flip=flip,
            max_minutes=max_minutes,
            progress=progress,
        )
        summary = train_attacker(
            arch,
            train_set,
            out,
            cfg=_parse_cfg(width, depth, arch, profile),
            settings=settings,
            limit=limit,
            resume=resume,
            overwrite=overwrite,
            features=features,
            data_root=data_root,
        )
    typer.echo(json.dumps(summary))


def attack_command(
    attacker: Annotated[Path, typer.Option("--attacker", help="Reconstruction checkpoint dir")],
    dataset: Annotated[str, typer.Option("--dataset", help="lfw | cfp-fp")] = "lfw",
    protection: Annotated[
        str, typer.Option("--protection", help="Protection applied to stored features")
    ] = "none",
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Random subset of N test images")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --limit subset")] = 0,
    as_json: JsonOpt = False,
    grid: Annotated[
        Path | None,
        typer.Option("--grid", help="Write a PNG of original | reconstruction pairs here"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --grid file")
    ] = False,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Operating threshold, a cosine in [-1, 1] (default: from eval-fr on DATASET)",
        ),
    ] = None,
    threshold_far: Annotated[
        float | None,
        typer.Option("--threshold-far", help="FAR=1e-3 threshold in [-1, 1] (with --threshold)"),
    ] = None,
    threshold_pairs: Annotated[
        int | None,
        typer.Option(
            "--threshold-pairs-per-fold",
            min=2,
            help="Estimate the thresholds on N pairs per fold (CPU shortcut; default: all)",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Reconstruct the faces of DATASET's pairs from their stored features; report SSIM, PSNR,
    MSE and the replay success rate (SRRA) at the operating and FAR=1e-3 thresholds."""
    import torch

    from advface.pipelines.attack import run_attack

    if threads is not None:
        torch.set_num_threads(threads)
    with user_errors():
        thresholds = _thresholds(threshold, threshold_far)
        res = run_attack(
            attacker,
            dataset,
            protection=protection,
            limit=limit,
            seed=seed,
            data_root=data_root,
            batch_size=batch_size,
            device=device,
            grid=grid,
            overwrite=overwrite,
            thresholds=thresholds,
            threshold_pairs_per_fold=threshold_pairs,
            progress=progress and not as_json,
        )
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(
        f"{res['dataset']} ({res['n_images']} images, protection {res['protection']}): "
        f"SSIM {res['ssim']:.3f}  PSNR {res['psnr']:.2f} dB  MSE {res['mse']:.4f}  "
        f"SRRA {100 * res['srra']:.2f}%"
        + (f"  SRRA@FAR1e-3 {100 * res['srra_far_1e-3']:.2f}%" if "srra_far_1e-3" in res else "")
    )
    if "grid" in res:
        typer.echo(f"grid: {res['grid']}")


def _thresholds(threshold: float | None, threshold_far: float | None) -> dict | None:
    """The replay thresholds given on the command line (None: the attack measures its own)."""
    for flag, value in (("--threshold", threshold), ("--threshold-far", threshold_far)):
        # A cosine: NaN or a value outside [-1, 1] would make SRRA meaningless.
        if value is not None and not (math.isfinite(value) and -1 <= value <= 1):
            raise ValueError(f"{flag} must be a cosine similarity in [-1, 1], got {value}")
    if threshold is None:
        if threshold_far is not None:
            raise ValueError("--threshold-far needs --threshold")
        return None
    far = {} if threshold_far is None else {"far_1e-3": threshold_far}
    return {"operating": threshold, **far}


def register(app: typer.Typer) -> None:
    app.command("train-recon")(train_recon_command)
    app.command("attack")(attack_command)
