"""``advface distill`` and ``advface eval-offline``: the paper's offline mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from advface.cli._errors import check_checkpoint_dir, loading, user_errors
from advface.cli._options import DataRootOpt, QuietOpt

SpecOpt = Annotated[
    str,
    typer.Option(
        "--protection",
        help="protection spec (advface alone: the server's shadow of advface train-protection)",
    ),
]
PairsOpt = Annotated[
    int | None,
    typer.Option(
        help="evaluate on a seeded sample of N pairs per fold, stratified (default: full protocol)"
    ),
]


TrainFromOpt = Annotated[
    str, typer.Option(help="first layer of Psi to fine-tune: all | a stage | last_linear")
]
LossOpt = Annotated[str, typer.Option(help="cosine | mse (on normalised embeddings)")]
CleanWeightOpt = Annotated[float, typer.Option(help="weight of Psi'(z) ~ Psi(z), for clean probes")]
TimeBudgetOpt = Annotated[
    float | None,
    typer.Option(
        help="training budget in seconds, feature pass included and counted across "
        "resumes (CPU time per thread on the CPU, wall time on a GPU)"
    ),
]
LimitOpt = Annotated[
    int | None, typer.Option(min=1, help="images of CelebA's server half (seeded sample)")
]
WorkDirOpt = Annotated[Path | None, typer.Option(help="resumable state (default: OUT.work)")]
EvalDatasetOpt = Annotated[
    str | None, typer.Option(help="afterwards evaluate on lfw | cfp-fp | cfp-ff")
]


def register(app: typer.Typer) -> None:
    app.command("distill")(distill_cmd)
    app.command("eval-offline")(eval_offline_cmd)


def distill_cmd(
    out: Annotated[Path, typer.Option(help="student folder (model.safetensors + config.json)")],
    protection: SpecOpt = "advface",
    limit: LimitOpt = 400,
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    train_from: TrainFromOpt = "repeat_3",
    loss: LossOpt = "cosine",
    clean_weight: CleanWeightOpt = 1.0,
    time_budget: TimeBudgetOpt = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    work_dir: WorkDirOpt = None,
    eval_dataset: EvalDatasetOpt = None,
    pairs_per_fold: PairsOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="replace an existing OUT (and drop its eval-*.json, of the old head)"),
    ] = False,
    data_root: DataRootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Distil Psi' from FaceNet's Psi for protected features on CelebA's server half.

    Rerun the same command to resume (feature chunks and a checkpoint per epoch are kept in
    the work dir). Prints the training record; with --eval-dataset also the offline row.
    """
    from advface import config
    from advface.pipelines.offline import DistillSettings, run_distill

    with user_errors():
        if eval_dataset is not None:
            _check_dataset(eval_dataset, "--eval-dataset")  # before hours of training
        config.data_root(data_root)
        replaced = overwrite and out.exists()
        settings = DistillSettings(
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            train_from=train_from,
            loss=loss,
            clean_weight=clean_weight,
            time_budget_s=time_budget,
            seed=seed,
        )
        head = run_distill(
            protection,
            out,
            limit=limit,
            settings=settings,
            work_dir=work_dir,
            overwrite=overwrite,
            data_root=data_root,
            progress=not quiet,
        )
    if replaced:
        _drop_stale_evals(out)
    typer.echo(json.dumps(_training_summary(head)))
    typer.echo(f"wrote {out}", err=True)
    if eval_dataset is not None:
        _evaluate(
            out,
            protection,
            eval_dataset,
            pairs_per_fold,
            seed=seed,
            path=_eval_path(out, eval_dataset),
            data_root=data_root,
            quiet=quiet,
        )


def _training_summary(head: dict) -> dict:
    """The distillation's outcome as ``distill`` prints it (the full record is in OUT)."""
    rec = head["record"]
    return {
        "model_version": head["model_version"],
        "images": head["data"]["images"],
        "identity_overlap": head["data"]["identity_check"]["overlap"],
        **{k: rec[k] for k in ("loss_before", "loss_after", "steps", "stopped_by", "seconds")},
    }


def _check_dataset(name: str, option: str) -> None:
    from advface.pipelines.eval_fr import DATASETS

    if name not in DATASETS:
        raise ValueError(f"{option} must be one of {', '.join(DATASETS)}, got {name!r}")


def _eval_path(student: Path, dataset: str) -> Path:
    """Where a head's own evaluation on ``dataset`` is kept (replaced by a new evaluation)."""
    return student / f"eval-{dataset}.json"


def _drop_stale_evals(student: Path) -> None:
    """Remove the evaluations of a head that ``distill --overwrite`` replaced: they describe
    the old weights. Only the files this command names (``_eval_path``) are touched."""
    from advface.pipelines.eval_fr import DATASETS

    for dataset in DATASETS:
        stale = _eval_path(student, dataset)
        if stale.is_file():
            stale.unlink()
            typer.echo(f"removed {stale} (an evaluation of the replaced head)", err=True)


def eval_offline_cmd(
    student: Annotated[Path, typer.Argument(help="distilled head folder")],
    protection: SpecOpt = "advface",
    dataset: Annotated[str, typer.Option(help="lfw | cfp-fp | cfp-ff")] = "lfw",
    pairs_per_fold: PairsOpt = None,
    seed: Annotated[int, typer.Option(min=0, help="seed of the pair sample")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="JSON file to write (default: STUDENT/eval-DATASET.json, the head's own "
            "record, which a new evaluation replaces)"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out file")] = False,
    data_root: DataRootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Verification with the student (offline), the teacher on protected (online) and clean
    features; the stored side of each pair is protected."""
    from advface import config
    from advface.models.distill import read_student_config

    with user_errors():
        _check_dataset(dataset, "--dataset")
        if out is not None:
            if out.is_dir():
                raise ValueError(f"--out {out} is a folder; give a JSON file name")
            if not out.parent.is_dir():
                raise ValueError(f"--out {out}: no folder {out.parent}")
            if out.exists() and not overwrite:
                raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
        check_checkpoint_dir(student, "STUDENT")
        read_student_config(student)  # not a head: said before FaceNet loads
        config.data_root(data_root)
        path = _eval_path(student, dataset) if out is None else out
    _evaluate(
        student,
        protection,
        dataset,
        pairs_per_fold,
        seed=seed,
        path=path,
        data_root=data_root,
        quiet=quiet,
    )


def _evaluate(
    student: Path,
    protection: str,
    dataset: str,
    pairs_per_fold: int | None,
    *,
    seed: int,
    path: Path,
    data_root: Path | None,
    quiet: bool,
) -> None:
    """Run the offline evaluation and write its row to ``path`` (atomically)."""
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet
    from advface.pipelines.offline import default_spec, offline_accuracy
    from advface.protection import protection_from_spec

    with user_errors():
        enc, head = split_facenet(load_facenet().eval())
        with loading(("--protection", protection)):
            prot = protection_from_spec(default_spec(protection), extractor=enc, head=head)
        with loading(("head", student)):
            row = offline_accuracy(
                prot,
                student,
                dataset,
                pairs_per_fold,
                seed=seed,
                data_root=data_root,
                progress=not quiet,
            )
        _write_json(path, row)
    ref = row["reference"]
    typer.echo(
        json.dumps(
            {
                "dataset": dataset,
                "pairs": row["pairs"],
                "n_pairs": row["n_pairs"],
                "clean": ref["clean"]["accuracy"],
                "online": ref["online"]["accuracy"],
                "offline": row["accuracy"],
                "offline_ci95": row["accuracy_ci95"],
            }
        )
    )
    typer.echo(f"wrote {path}", err=True)


def _write_json(path: Path, obj: object) -> None:
    """Write ``obj`` to ``path`` through a temporary file beside it: never half-written."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
