"""``advface eval-fr``: the verification benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import loading, user_errors
from advface.cli._options import DeviceOpt, JsonOpt, QuietOpt


def register(app: typer.Typer) -> None:
    app.command("eval-fr")(eval_fr_cmd)


def eval_fr_cmd(
    dataset: Annotated[str, typer.Option(help="lfw | cfp-fp | cfp-ff")] = "lfw",
    data_root: Annotated[
        Path | None, typer.Option(help="dataset root (or ADVFACE_DATA_ROOT)")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="cache (or ADVFACE_CACHE_DIR)")] = None,
    weights: Annotated[
        Path | None, typer.Option(help="facenet-pytorch-format weights; default: converted CASIA")
    ] = None,
    flip: Annotated[bool, typer.Option(help="flip test-time augmentation")] = False,
    protection: Annotated[
        str,
        typer.Option(
            help="protection of the stored side's feature maps: none | random | dp | "
            "advface:SHADOW_CKPT[,epsilon=0.2,reading=per-step,...]"
        ),
    ] = "none",
    protect_mode: Annotated[
        str, typer.Option(help="stored (probe fresh, the deployment case) | both")
    ] = "stored",
    folds: Annotated[int | None, typer.Option(help="use only the first N folds")] = None,
    pairs_per_fold: Annotated[
        int | None,
        typer.Option(help="a seeded random sample of N pairs per fold, half genuine"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the --pairs-per-fold sample")] = 0,
    batch_size: int = 64,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """10-fold verification accuracy, TAR at FAR=1e-3 and ROC AUC, optionally with the
    stored side protected (online mode)."""
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet
    from advface.pipelines.eval_fr import eval_fr
    from advface.protection import protection_from_spec

    with user_errors():
        with loading(("--weights", weights)):
            model = load_facenet(weights, cache=cache_dir)
        prot = None
        if protection.strip().lower() not in ("none", "clean"):
            enc, head = split_facenet(model)
            with loading(("--protection", protection)):
                prot = protection_from_spec(protection, extractor=enc, head=head, device=device)
        res = eval_fr(
            dataset,
            protection=prot,
            protection_name=protection,
            mode=protect_mode,
            data_root=data_root,
            cache=cache_dir,
            model=model,
            flip=flip,
            folds=folds,
            pairs_per_fold=pairs_per_fold,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=not quiet,
        )
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(
        f"{res['dataset']}: accuracy {100 * res['accuracy']:.2f}% ± {100 * res['accuracy_std']:.2f}"
        f"  TAR@FAR=1e-3 {100 * res['tar_at_far_1e-3']:.2f}%  AUC {res['auc']:.4f}"
        f"  ({res['n_pairs']} pairs: {res['pairs']}; {res['no_face']} no-face fallbacks,"
        f" {res['wall_s']} s)"
    )
