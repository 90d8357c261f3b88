"""``run_bench``: the robustness bench's stages, cached under ``OUT/cache`` and resumable.

1. splits (attackers identity-disjoint from the test people, checked by name; the server's
   CelebA half cannot be checked against either: CelebA's ids are anonymous) and the trained
   networks (:mod:`.models`), every attacker on the same images and settings;
2. per dataset: clean embeddings of every protocol image (operating thresholds, chance SRRA),
   then per protection the test images' protected features, each attacker's reconstructions
   (SSIM / PSNR / MSE, replayed embeddings) and the stored side of the pairs (accuracy);
3. rows (``table: "robustness"``), report and figures.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advface.pipelines.robustness.models import (
    EVAL_CODE,
    PROTECTION_CODE,
    SAME_FOR_ATTACKERS,
    TRAIN_CODE,
    BenchContext,
    batches,
    check_same_training,
    code_fingerprint,
    embed_clean,
    embedding_features,
    fit_ridge,
    is_attacker,
    train_model,
)
from advface.pipelines.robustness.profiles import BenchProfile

METHODS: tuple[str, ...] = ("none", "random", "dp", "advface", "embedding-shadow")
#: Evaluation order: the unprotected baseline, then the two methods this bench is about, so a
#: run stopped by a time limit has measured what matters most.
ORDER: tuple[str, ...] = ("none", "embedding-shadow", "advface", "random", "dp")
#: Protections whose output depends on server secrets (an adaptive attacker may have them or not).
SECRET_METHODS = ("advface", "embedding-shadow")
DATASETS = {"lfw": "lfw", "cfp-fp": "cfp"}
#: Optimisation attackers: too slow for every test face, they run on the profile's first
#: ``inversion_n`` ones.
INVERSIONS = ("inversion", "embedding-inversion", "floor-embedding-inversion")
SERVER_IDENTITY_CHECK = (
    "unchecked: CelebA's identity ids are anonymous, so overlap with the attackers' and the "
    "test people (LFW/CFP names) cannot be checked"
)


@dataclass
class Networks:
    """Trained networks and their cache keys."""

    server_shadow: nn.Module
    server_generator: nn.Module
    recon: nn.Module  # the paper's attacker R (also the attacker's own shadow)
    emb_decoder: nn.Module  # F: the embedding floor (also the attacker's own generator)
    ridge: nn.Module  # the closed-form embedding floor (advface.attacks.ridge)
    keys: dict[str, str]
    mean_face: torch.Tensor


# -- protections --------------------------------------------------------------------------------


def build_method(
    ctx: BenchContext,
    method: str,
    *,
    shadow: nn.Module | None = None,
    generator: nn.Module | None = None,
):
    """A protection with the bench's settings; ``shadow``/``generator`` pick whose networks
    (the server's, or an adaptive attacker's own)."""
    from advface.protection import build_protection

    p = ctx.profile
    if method == "none":
        return build_protection("none")
    if method == "random":
        # AdvFace's budget with a random direction: sign steps of alpha, projected to epsilon.
        return build_protection(
            "random",
            steps=p.steps,
            bound=p.alpha,
            distribution="sign",
            reading="projected",
            epsilon=p.epsilon,
        )
    if method == "dp":
        return build_protection("dp")
    if method == "advface":
        return build_protection(
            "advface",
            shadow=shadow,
            extractor=ctx.encoder,
            steps=p.steps,
            alpha=p.alpha,
            epsilon=p.epsilon,
            reading="projected",
            device=ctx.device,
        )
    if method == "embedding-shadow":
        return build_protection(
            "embedding-shadow",
            generator=generator,
            shadow=shadow,
            extractor=ctx.encoder,
            head=ctx.head,
            steps=p.es_steps,
            alpha=p.es_alpha,
            epsilon=p.es_epsilon,
            identity_weight=p.es_identity_weight,
            device=ctx.device,
        )
    raise ValueError(f"unknown method {method!r}")


def method_settings(p: BenchProfile, method: str) -> dict:
    """The profile settings a method's output depends on (for cache keys)."""
    if method == "embedding-shadow":
        return dict(s=p.es_steps, a=p.es_alpha, e=p.es_epsilon, w=p.es_identity_weight)
    if method in ("advface", "random"):
        return dict(s=p.steps, a=p.alpha, e=p.epsilon)
    return {}


def _server_protection(ctx: BenchContext, nets: Networks, method: str):
    return build_method(ctx, method, shadow=nets.server_shadow, generator=nets.server_generator)


# -- networks -----------------------------------------------------------------------------------


def _train_networks(ctx: BenchContext, server_split, attacker_split) -> Networks:
    from advface.attacks.inversion import MeanFace
    from advface.attacks.train import MemoFeatures

    server_shadow, k_ss = train_model(ctx, "server-shadow", "resrec", server_split)
    server_gen, k_sg = train_model(
        ctx,
        "server-generator",
        "embdec",
        server_split,
        features="embedding",
        feature_fn=MemoFeatures(embedding_features(ctx.head)),
    )
    recon, k_r = train_model(ctx, "attacker-resrec", "resrec", attacker_split)
    emb_dec, k_f = train_model(
        ctx,
        "attacker-embedding",
        "embdec",
        attacker_split,
        features="embedding",
        feature_fn=MemoFeatures(embedding_features(ctx.head)),
    )
    ridge, k_rd = fit_ridge(ctx, "attacker-ridge", attacker_split)
    mean = MeanFace.from_images(ctx.images(attacker_split)).mean_image
    keys = {
        "server-shadow": k_ss,
        "server-generator": k_sg,
        "attacker-resrec": k_r,
        "attacker-embedding": k_f,
        "attacker-ridge": k_rd,
    }
    return Networks(server_shadow, server_gen, recon, emb_dec, ridge, keys, mean)


def _adaptive_attackers(
    ctx: BenchContext, nets: Networks, split, method: str
) -> dict[str, nn.Module]:
    """ResRec decoders trained on ``method``'s protected features of the attackers' own
    training images (each image and, with flips, its mirror image): with the attacker's own
    networks ("adaptive-own") and with the server's leaked ones and settings
    ("adaptive-leaked"); a method without secrets has the leaked variant only."""
    from advface.attacks.train import MemoFeatures

    if method == "none":
        return {}
    p = ctx.profile
    out: dict[str, nn.Module] = {}
    for v in ("own", "leaked") if method in SECRET_METHODS else ("leaked",):
        if v == "own":
            prot = build_method(ctx, method, shadow=nets.recon, generator=nets.emb_decoder)
            dep = {k: nets.keys[k] for k in ("attacker-resrec", "attacker-embedding")}
        else:
            prot = _server_protection(ctx, nets, method)
            dep = {k: nets.keys[k] for k in ("server-shadow", "server-generator")}
        out[f"adaptive-{v}"], _ = train_model(
            ctx,
            f"adaptive-{v}-{method}",
            "resrec",
            split,  # the paper's attacker's and the embedding floor's images, no sample
            features=f"{method}:{method_settings(p, method)}",
            feature_fn=MemoFeatures(prot.protect),
            depends=dep if method in SECRET_METHODS else {},
            code=TRAIN_CODE + PROTECTION_CODE,
        )
    return out


# -- evaluation stages --------------------------------------------------------------------------


def _attack_stage(
    ctx: BenchContext,
    name: str,
    key: dict,
    images: np.ndarray,
    protect: Callable[[torch.Tensor], torch.Tensor],
    attackers: dict[str, nn.Module],
    limits: dict[str, int],
) -> dict[str, np.ndarray]:
    """Protect the test images, run every attacker, keep per-image metrics and replays."""
    from advface.models.facenet import preprocess
    from advface.pipelines.recon_eval import measure_batch

    p = ctx.profile

    def compute() -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        t0 = time.perf_counter()
        bs = p.protect_batch
        for s in batches(len(images), bs, name, ctx):
            batch = images[s : s + bs]
            target = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(ctx.device)
            with torch.no_grad():
                zp = protect(ctx.encoder(preprocess(batch).to(ctx.device)))
            for a, net in attackers.items():
                take = min(len(batch), max(0, limits.get(a, len(images)) - s))
                if not take:
                    continue
                rec = net(zp[:take]).clamp(0, 1)
                # The measurement shared with `advface attack` and `advface reproduce`.
                for k, v in measure_batch(rec, target[:take], ctx.facenet).items():
                    out.setdefault(f"{a}/{k}", []).append(v)
                keep = max(0, p.grid_n - s)
                if keep:
                    grid = (rec[:keep] * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                    out.setdefault(f"{a}/grid", []).append(grid)
        ctx.timings[name] = round(time.perf_counter() - t0, 1)
        return {k: np.concatenate(v) for k, v in out.items()}

    return ctx.stages.arrays(name, key, compute)


def _stored_embeddings(
    ctx: BenchContext, name: str, key: dict, images: np.ndarray, protect
) -> np.ndarray:
    """Psi(protect(E(x))) for the stored side of the pairs."""
    from advface.models.facenet import preprocess

    def compute() -> dict[str, np.ndarray]:
        out, bs, t0 = [], ctx.profile.protect_batch, time.perf_counter()
        for s in batches(len(images), bs, name, ctx):
            with torch.no_grad():
                z = ctx.encoder(preprocess(images[s : s + bs]).to(ctx.device))
            zp = protect(z)
            with torch.no_grad():
                out.append(ctx.head(zp).float().cpu().numpy())
        ctx.timings[name] = round(time.perf_counter() - t0, 1)
        return {"emb": np.concatenate(out)}

    return ctx.stages.arrays(name, key, compute)["emb"]


# -- the bench ----------------------------------------------------------------------------------


def _context(
    profile: BenchProfile, out: Path, data_root, cache, device: str, progress: bool, weights
) -> BenchContext:
    from advface.protection.advface import fingerprint

    ctx = BenchContext.create(
        profile,
        out,
        data_root=data_root,
        cache=cache,
        device=device,
        progress=progress,
        weights=weights,
    )
    ctx.weights_sha = fingerprint(ctx.facenet)[:16]
    return ctx


def _test_split(ctx: BenchContext, dataset: str):
    from advface.data.splits import IdentitySplit, cfp_identities, lfw_test_split

    if dataset == "lfw":
        split = lfw_test_split(ctx.root)
    else:
        names = cfp_identities(ctx.root)
        split = IdentitySplit("cfp-test", "cfp", list(names), list(names.values()))
    return split.sample(ctx.profile.test_n, ctx.profile.seed)


def run_bench(
    profile: BenchProfile,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    weights: str | Path | None = None,
) -> dict:
    """Run (or resume) the bench and write ``results.json``, CSV, report and figures."""
    from advface.data.splits import celeba_split, lfw_attacker_split
    from advface.pipelines.context import git_commit
    from advface.pipelines.robustness import report

    t_start = time.perf_counter()
    commit = git_commit()  # the code this run started with, whatever changes meanwhile
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(profile.seed)
    if str(device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    ctx = _context(profile, out, data_root, cache, device, progress, weights)
    p = profile
    attacker_split = lfw_attacker_split(ctx.root).sample(p.train_limit, p.seed)
    # The server's people against the attackers' and the test people: not checkable (CelebA's
    # ids are anonymous numbers, LFW's and CFP's are names), and recorded as unchecked.
    server_split = celeba_split(ctx.root, "server").sample(p.train_limit, p.seed)
    nets = _train_networks(ctx, server_split, attacker_split)
    evals = {d: _prepare_dataset(ctx, d, nets) for d in p.datasets}
    rows = [r for ev in evals.values() for r in ev.rows]
    splits = {
        "attacker": {
            "name": attacker_split.name,
            "images": len(attacker_split),
            "people": len(attacker_split.people),
            **attacker_split.notes,
        },
        "server": {
            "name": server_split.name,
            "images": len(server_split),
            "people": len(server_split.people),
            "identity_check": SERVER_IDENTITY_CHECK,
        },
    }
    # One method at a time (its adaptive attackers, then every dataset), results written after
    # each: a run stopped by a time limit keeps what it finished.
    for i, method in enumerate(ORDER):
        adaptive = _adaptive_attackers(ctx, nets, attacker_split, method)
        for ev in evals.values():
            method_rows, ctx.protections[method] = _evaluate_method(ctx, ev, nets, adaptive, method)
            rows += method_rows
        meta = _meta(ctx, splits, t_start, complete=i == len(ORDER) - 1, commit=commit)
        report.write_all(out, meta, rows)
    grids = {d: ev.grid for d, ev in evals.items()}
    meta["figures"] = report.write_figures(out, rows, grids)
    report.write_all(out, meta, rows)
    return {**meta, "rows": rows}


def _public_params(prot) -> dict:
    """A protection's parameters without machine paths (they name this run's cache)."""
    return {k: v for k, v in prot.params().items() if not k.endswith("_path")}


def attacker_training(training: dict[str, dict]) -> dict | None:
    """What every attacker of the run trained on (the same for all, :func:`check_same_training`),
    which attackers those are, and which of them are fit in closed form (same images, no
    epochs or budget)."""
    roles = [r for r in training if is_attacker(r)]
    if not roles:
        return None
    trained = [r for r in roles if not training[r].get("closed_form")]
    ref = (trained or roles)[0]
    for r in roles:
        if r != ref:
            check_same_training({ref: training[ref]}, r, training[r])
    return {
        **{k: training[ref].get(k) for k in SAME_FOR_ATTACKERS},
        "attackers": trained,
        "closed_form": [r for r in roles if r not in trained],
    }


def _meta(
    ctx: BenchContext, splits: dict, t_start: float, *, complete: bool, commit: str | None
) -> dict:
    from advface import __version__

    dev = ctx.device
    return {
        "profile": ctx.profile.to_dict(),
        "complete": complete,
        "git_commit": commit,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "advface_version": __version__,
        "torch_version": torch.__version__,
        "splits": splits,
        "protections": ctx.protections,
        "training": ctx.training,
        "attacker_training": attacker_training(ctx.training),
        "stage_seconds": ctx.timings,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _embedding_inversion(ctx: BenchContext, nets: Networks) -> nn.Module:
    """An image optimised so that its embedding matches Psi of the input, nothing else."""
    from advface.attacks.inversion import EmbeddingInversion, FeatureInversion, InversionSettings

    settings = InversionSettings(
        steps=ctx.profile.inversion_steps, feature_weight=0.0, id_weight=1.0
    )
    return EmbeddingInversion(
        FeatureInversion(ctx.encoder, ctx.head, settings, init=nets.mean_face)
    )


def _attackers_for(
    ctx: BenchContext, nets: Networks, adaptive: dict[str, nn.Module], method: str
) -> dict[str, nn.Module]:
    """The attackers of ``method``'s stored features. ``inversion`` matches the stored feature
    itself (and its embedding); ``embedding-inversion`` matches only its embedding Psi(z'),
    the optimiser adapted to a protection that moves the feature but keeps the embedding (for
    ``none`` it is ``floor-embedding-inversion``, so it is not run twice)."""
    from advface.attacks.inversion import EmbeddingAttack, FeatureInversion, InversionSettings

    p = ctx.profile
    attackers: dict[str, nn.Module] = {"paper-resrec": nets.recon}
    attackers.update(adaptive)
    attackers["embedding"] = EmbeddingAttack(nets.emb_decoder, ctx.head)
    attackers["embedding-ridge"] = EmbeddingAttack(nets.ridge, ctx.head)
    attackers["inversion"] = FeatureInversion(
        ctx.encoder,
        ctx.head,
        InversionSettings(steps=p.inversion_steps),
        init=nets.mean_face,
    )
    if method != "none":
        attackers["embedding-inversion"] = _embedding_inversion(ctx, nets)
    return attackers


@dataclass
class DatasetEval:
    """One dataset's test faces, pairs and clean embeddings, and what was measured so far."""

    dataset: str
    proto: object  # metrics.ProtocolEval
    images: np.ndarray
    clean_emb: np.ndarray
    base_key: dict
    grid: dict[str, np.ndarray]
    rows: list[dict]


def _prepare_dataset(ctx: BenchContext, dataset: str, nets: Networks) -> DatasetEval:
    """Clean protocol, test faces, and the floors: what the clean embedding e alone gives (a
    decoder trained on e; an image optimised to e), and the mean face (nothing)."""
    from advface.attacks.inversion import MeanFace
    from advface.pipelines.robustness.metrics import clean_protocol, recon_rows

    p = ctx.profile
    proto = clean_protocol(ctx, dataset, embed_clean)
    images = ctx.images(_test_split(ctx, dataset))
    img_key = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    clean_emb = embed_clean(ctx, images, f"{dataset} test embeddings")
    base_key = dict(
        dataset=dataset,
        images=img_key,
        weights=ctx.weights_sha,
        code=code_fingerprint(EVAL_CODE),
        nets=nets.keys,
        batch=p.protect_batch,
        inv=(p.inversion_n, p.inversion_steps),
        grid=p.grid_n,
    )
    ev = DatasetEval(
        dataset, proto, images, clean_emb, base_key, {"original": images[: p.grid_n]}, []
    )
    embedding_only = _attackers_for(ctx, nets, {}, "none")
    floors = {
        "floor-embedding": embedding_only["embedding"],
        "floor-embedding-ridge": embedding_only["embedding-ridge"],
        "floor-embedding-inversion": _embedding_inversion(ctx, nets),
        "floor-mean-face": MeanFace(nets.mean_face),
    }
    res = _attack_stage(
        ctx,
        f"floors-{dataset}",
        base_key,
        images,
        lambda z: z,
        floors,
        dict.fromkeys(INVERSIONS, p.inversion_n),
    )
    for f in floors:
        ev.rows += recon_rows(dataset, f, {f: res}, clean_emb, proto, attacker=f)
        ev.grid[f] = res[f"{f}/grid"]
    return ev


def _evaluate_method(
    ctx: BenchContext,
    ev: DatasetEval,
    nets: Networks,
    adaptive: dict[str, nn.Module],
    method: str,
) -> tuple[list[dict], dict]:
    """Every attacker against ``method`` on one dataset, its verification accuracy, and the
    protection's parameters (without paths)."""
    from advface.pipelines.robustness.metrics import accuracy_rows, recon_rows

    p, d = ctx.profile, ev.dataset
    prot = _server_protection(ctx, nets, method)
    attackers = _attackers_for(ctx, nets, adaptive, method)
    key = {
        **ev.base_key,
        "method": method,
        "params": prot.params(),
        "attackers": sorted(attackers),
        "adaptive": {a: ctx.training[f"{a}-{method}"]["key"] for a in adaptive},
    }
    res = _attack_stage(
        ctx,
        f"attack-{d}-{method}",
        key,
        ev.images,
        prot.protect,
        attackers,
        dict.fromkeys(INVERSIONS, p.inversion_n),
    )
    rows = recon_rows(d, method, {a: res for a in attackers}, ev.clean_emb, ev.proto)
    for a in attackers:
        ev.grid[f"{method}|{a}"] = res[f"{a}/grid"]
    stored_key = {**ev.base_key, "method": method, "params": prot.params(), "pairs": ev.proto.key}
    emb = _stored_embeddings(
        ctx, f"stored-{d}-{method}", stored_key, ev.proto.stored_images(ctx), prot.protect
    )
    return rows + accuracy_rows(d, method, emb, ev.proto), _public_params(prot)
