"""The reproduction's measurements: protections, cached stages and the values of a row.

Per dataset (:func:`prepare_dataset`): the verification pairs (the full protocol or a seeded
stratified sample) with their clean embeddings and the unprotected system's thresholds, and the
reconstruction test faces (LFW folds 1-5, CFP's faces: no attacker has seen their people).
Per protection: :func:`recon_stage` (every attacker on the test faces' protected features,
measured by :mod:`advface.pipelines.recon_eval`) and :func:`stored_stage` (the stored side of
the pairs through Psi, or an extra head). Each stage is keyed by the protection's complete
``params()`` (shadow and E weights included), FaceNet's weights, the attackers' keys and the
code it runs, and cached in chunks. :func:`measure` turns both into a setting's small record
(:class:`Measured`: every table's values and grids, one JSON file keyed by both stages' keys),
so a finished setting never needs its chunks again, and a record can be carried to another
machine's cache (``scripts/cpu-full.sh``'s ledger).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from advface.pipelines.context import EVAL_CODE, FACENET_CODE, code_fingerprint
from advface.pipelines.eval_fr import PairSubset
from advface.pipelines.reproduce.networks import Context, Networks

# The recon and stored stages run this module's code too (the bench keys its own likewise).
STAGE_CODE: tuple[str, ...] = (*EVAL_CODE, "pipelines/reproduce/evaluate.py")
#: A record's values also come from the verification code.
RECORD_CODE: tuple[str, ...] = (*STAGE_CODE, "pipelines/eval_fr.py")

#: Attackers whose reconstructions are replayed (SRRA) under every protection: Table 1's and
#: the adaptive attacker. On unprotected features every attacker is replayed.
REPLAYED = ("resrec", "adaptive-resrec")
#: The two readings of eq. 6 (see advface.protection.advface) and of the random baseline.
OTHER_READING = {"per-step": "projected", "projected": "per-step"}
ALIGNED = {"lfw": "lfw", "cfp-fp": "cfp"}


@dataclass(frozen=True)
class ProtectionConfig:
    """One protection setting of the experiments (``reading``: None = the profile's)."""

    method: str
    shadow: str | None = None
    epsilon: float | None = None
    reading: str | None = None

    @property
    def label(self) -> str:
        if self.method == "random":
            return "random" if self.reading in (None, "projected") else f"random-{self.reading}"
        if self.method != "advface":
            return self.method
        suffix = f"-{self.reading}" if self.reading else ""
        return f"advface-{self.shadow}-eps{self.epsilon:.2f}{suffix}"


@dataclass(frozen=True)
class ExtraHead:
    """A recognition head besides FaceNet's Psi, for extra Table 2 rows (the offline mode: a
    Psi' fine-tuned on ``method``'s protected features, e.g. distilled to match Psi on clean
    ones). The stored side's protected features go through ``module``, the probe side's clean
    features through Psi; the stage is keyed by ``module``'s weights. ``version``: its
    ``model_version`` (a distilled head's), recorded in the row."""

    module: nn.Module
    method: str = "advface"
    mode: str = "offline"
    version: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("random", "dp", "advface"):
            raise ValueError(f"an extra head protects random, dp or advface, not {self.method!r}")


@dataclass
class TestFaces:
    """Reconstruction test faces of a dataset and their clean FaceNet embeddings."""

    dataset: str
    keys: list[str]
    images: np.ndarray
    clean: np.ndarray


@dataclass
class Measured:
    """What the tables read of one protection setting: per attacker its
    :func:`recon_values`, per head (``"psi"`` or an extra head's label) the online
    :func:`accuracy_values`, and per attacker the first ``grid_n`` reconstructions (uint8
    (n,160,160,3); for display only, so the record keeps them as JPEG at quality 95, which
    keeps a record small enough to carry: every metric is computed before). The accessors
    return copies (a table may add to a row's values)."""

    recon: dict[str, dict]
    accuracy: dict[str, dict]
    grids: dict[str, np.ndarray]

    def recon_values(self, attacker: str) -> dict:
        return copy.deepcopy(self.recon[attacker])

    def accuracy_values(self, head: str = "psi") -> dict:
        return copy.deepcopy(self.accuracy[head])

    def to_json(self) -> dict:
        return {
            "recon": _plain(self.recon),
            "accuracy": _plain(self.accuracy),
            "grids": {a: _encode_grid(g) for a, g in self.grids.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> Measured:
        grids = {a: _decode_grid(g) for a, g in data["grids"].items()}
        return cls(data["recon"], data["accuracy"], grids)


def _plain(value):
    """JSON-ready copy: numpy scalars and arrays as Python numbers and lists, tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


def _encode_grid(grid: np.ndarray) -> dict:
    """uint8 (n,H,W,3) RGB faces -> one JPEG strip (quality 95, base64) and n."""
    import cv2

    n, h, w, c = grid.shape
    strip = np.ascontiguousarray(grid.transpose(1, 0, 2, 3).reshape(h, n * w, c)[..., ::-1])
    ok, jpg = cv2.imencode(".jpg", strip, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("could not encode a reconstruction grid as JPEG")
    return {"n": int(n), "jpeg": base64.b64encode(jpg.tobytes()).decode("ascii")}


def _decode_grid(data: dict) -> np.ndarray:
    import cv2

    buf = np.frombuffer(base64.b64decode(data["jpeg"]), dtype=np.uint8)
    strip = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if strip is None:
        raise ValueError("a cached reconstruction grid is not a readable JPEG")
    n = data["n"]
    h, nw, c = strip.shape
    return np.ascontiguousarray(strip[..., ::-1].reshape(h, n, nw // n, c).transpose(1, 0, 2, 3))


@dataclass
class DatasetEval:
    """One dataset's pairs, clean embeddings, thresholds and test faces; results so far."""

    dataset: str
    pairs: PairSubset
    full: bool  # the pairs are the whole protocol
    clean: np.ndarray  # clean embeddings of pairs.keys
    unprotected: dict  # the unprotected system (full protocol when the profile says so)
    faces: TestFaces
    #: Extra heads of Table 2 by label: each sees its method's main setting's stored features,
    #: computed in the same pass as Psi's (the protection runs once).
    heads: dict[str, ExtraHead] = field(default_factory=dict)
    grids: dict[str, np.ndarray] = field(default_factory=dict)
    #: Each protection setting's record, by label (:func:`measure`).
    measured: dict[str, Measured] = field(default_factory=dict)
    #: Source fingerprints (:func:`_faces_key`) of the stored side's faces, and what the
    #: unprotected system's thresholds were computed from: in the keys of the stages and
    #: records that read them.
    stored_faces: str = ""
    thresholds_key: dict = field(default_factory=dict)

    @property
    def stored_idx(self) -> np.ndarray:
        return np.unique(self.pairs.idx_a)

    @property
    def thresholds(self) -> dict[str, float]:
        u = self.unprotected
        return {"operating": u["threshold"], "far_1e-3": u["threshold_far_1e-3"]}


# -- protections --------------------------------------------------------------------------------


def main_config(ctx: Context, method: str) -> ProtectionConfig:
    """Tables 1/2's setting of ``method`` (AdvFace: ResRec shadow, the profile's epsilon)."""
    if method == "advface":
        return ProtectionConfig("advface", "resrec", ctx.profile.epsilon)
    return ProtectionConfig(method)


def advface_protection(ctx: Context, shadow: nn.Module, epsilon: float, reading: str):
    from advface.protection import build_protection

    p = ctx.profile
    return build_protection(
        "advface",
        shadow=shadow,
        extractor=ctx.encoder,
        steps=p.steps,
        alpha=p.alpha,
        epsilon=epsilon,
        reading=reading,
        seed=p.seed,
        device=ctx.device,
        # Measured on 2 cores with the cpu decoders: 30-40% less time per PGD step; float
        # rounding only, and an execution detail outside key_params().
        channels_last=True,
    )


def build(ctx: Context, cfg: ProtectionConfig, nets: Networks):
    """The protection of ``cfg`` with the profile's settings; its parameters are recorded."""
    from advface.protection import build_protection

    p = ctx.profile
    if cfg.method == "none":
        prot = build_protection("none", seed=p.seed)
    elif cfg.method == "random":
        # Default: AdvFace's budget (steps of alpha, projected onto the epsilon ball).
        reading = cfg.reading or "projected"
        kw = dict(epsilon=p.epsilon) if reading == "projected" else {}
        prot = build_protection(
            "random", steps=p.steps, bound=p.alpha, reading=reading, seed=p.seed, **kw
        )
    elif cfg.method == "dp":
        prot = build_protection(
            "dp", epsilon_dp=p.dp_epsilon, sensitivity=p.dp_sensitivity, seed=p.seed
        )
    elif cfg.method == "advface":
        prot = advface_protection(
            ctx, nets.shadows[cfg.shadow], cfg.epsilon, cfg.reading or p.reading
        )
    else:
        raise ValueError(f"unknown method {cfg.method!r}")
    ctx.protections[cfg.label] = prot.key_params()
    return prot


# -- stages -------------------------------------------------------------------------------------


def _bar(ctx: Context, n: int, desc: str):
    bs = ctx.profile.protect_batch
    return tqdm(range(0, n, bs), desc=desc, disable=not ctx.progress, unit="batch", leave=False)


def clean_stage(ctx: Context, dataset: str, keys: list[str]) -> np.ndarray:
    """Unit-norm FaceNet embeddings of ``keys`` (chunked; keyed by weights and code)."""
    from advface.pipelines.recon_eval import clean_embeddings

    key = dict(
        dataset=dataset,
        faces=_faces_key(ctx, ALIGNED[dataset], keys),
        weights=ctx.weights_sha,
        code=code_fingerprint(FACENET_CODE),
    )
    bs = ctx.profile.protect_batch

    def compute(sl: slice) -> dict[str, np.ndarray]:
        images = ctx.images(ALIGNED[dataset], keys[sl])
        out = [clean_embeddings(ctx.facenet, images[s : s + bs], ctx.device)
               for s in _bar(ctx, len(images), f"{dataset} clean")]  # fmt: skip
        return {"emb": np.concatenate(out)}

    return ctx.stages.chunked(f"clean-{dataset}", key, keys, ctx.profile.chunk, compute)["emb"]


def recon_stage(
    ctx: Context,
    faces: TestFaces,
    label: str,
    prot,
    attackers: dict[str, nn.Module],
    attacker_keys: dict[str, str],
    replayed: set[str],
) -> dict[str, np.ndarray]:
    """Protect the test faces' features; per attacker ``a``: ``a/ssim``, ``a/psnr``, ``a/mse``,
    ``a/emb`` (replayed attackers) and ``a/grid`` (the first ``grid_n`` reconstructions)."""
    from advface.attacks.train import to_unit
    from advface.models.facenet import preprocess
    from advface.pipelines.recon_eval import measure_batch

    p = ctx.profile
    key = _recon_key(ctx, faces, prot, {a: attacker_keys[a] for a in attackers}, replayed)

    def compute(sl: slice) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        images, t0, bs = faces.images[sl], time.perf_counter(), p.protect_batch
        for s in _bar(ctx, len(images), f"{faces.dataset} {label}"):
            batch = images[s : s + bs]
            target = to_unit(batch).to(ctx.device)
            with torch.no_grad():
                zp = prot.protect(ctx.encoder(preprocess(batch).to(ctx.device)))
            for a, net in attackers.items():
                with torch.no_grad():
                    rec = net(zp).clamp(0, 1)
                m = measure_batch(rec, target, ctx.facenet if a in replayed else None)
                for k, v in m.items():
                    out.setdefault(f"{a}/{k}", []).append(v)
                keep = max(0, p.grid_n - (sl.start + s))
                if keep:
                    grid = (rec[:keep] * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                    out.setdefault(f"{a}/grid", []).append(grid)
        ctx.timings[f"recon {faces.dataset} {label}"] = round(
            ctx.timings.get(f"recon {faces.dataset} {label}", 0) + time.perf_counter() - t0, 1
        )
        return {k: np.concatenate(v) for k, v in out.items()}

    name = f"recon-{faces.dataset}-{label}"
    return ctx.stages.chunked(name, key, faces.keys, p.chunk, compute)


def _recon_key(
    ctx: Context, faces: TestFaces, prot, attacker_keys: dict[str, str], replayed: set[str]
) -> dict:
    """The reconstruction stage's key (``attacker_keys``: the cache key of each attacker)."""
    p = ctx.profile
    return dict(
        dataset=faces.dataset,
        faces=_faces_key(ctx, ALIGNED[faces.dataset], faces.keys),
        protection=prot.key_params(),
        attackers=dict(sorted(attacker_keys.items())),
        replayed=sorted(replayed),
        batch=p.protect_batch,
        grid_n=p.grid_n,
        weights=ctx.weights_sha,
        code=code_fingerprint(STAGE_CODE),
    )


def stored_stage(
    ctx: Context,
    ev: DatasetEval,
    label: str,
    prot,
    heads: dict[str, nn.Module] | None = None,
) -> dict[str, np.ndarray]:
    """Embeddings head(protect(E(x))) of the pairs' stored side by head name: Psi's under
    ``"psi"`` and one per extra head of ``heads`` (name -> module), all from one protection
    pass (the stage is keyed by every head's weights)."""
    from advface.models.facenet import preprocess

    if heads and "psi" in heads:
        raise ValueError("an extra head cannot be labelled 'psi' (FaceNet's own head)")
    named = {"psi": ctx.head, **(heads or {})}
    keys = [ev.pairs.keys[i] for i in ev.stored_idx]
    key = _stored_key(ctx, ev, prot, named)

    def compute(sl: slice) -> dict[str, np.ndarray]:
        images = ctx.images(ALIGNED[ev.dataset], keys[sl])
        out: dict[str, list[np.ndarray]] = {n: [] for n in named}
        bs, t0 = ctx.profile.protect_batch, time.perf_counter()
        for s in _bar(ctx, len(images), f"{ev.dataset} stored {label}"):
            with torch.no_grad():
                z = ctx.encoder(preprocess(images[s : s + bs]).to(ctx.device))
            zp = prot.protect(z)
            with torch.no_grad():
                for n, head in named.items():
                    emb = nn.functional.normalize(head(zp).float(), dim=1)
                    out[n].append(emb.cpu().numpy())
        name = f"stored {ev.dataset} {label}"
        ctx.timings[name] = round(ctx.timings.get(name, 0) + time.perf_counter() - t0, 1)
        return {n: np.concatenate(v) for n, v in out.items()}

    name = f"stored-{ev.dataset}-{label}"
    return ctx.stages.chunked(name, key, keys, ctx.profile.chunk, compute)


def _stored_key(ctx: Context, ev: DatasetEval, prot, named: dict[str, nn.Module]) -> dict:
    return dict(
        dataset=ev.dataset,
        faces=ev.stored_faces,
        protection=prot.key_params(),
        head={n: _head_key(ctx, m) for n, m in sorted(named.items())},
        batch=ctx.profile.protect_batch,
        weights=ctx.weights_sha,
        code=code_fingerprint(STAGE_CODE),
    )


def _head_key(ctx: Context, head: nn.Module) -> str:
    """FaceNet's weights for Psi, else the head's own weights fingerprint."""
    from advface.pipelines.context import weights_fingerprint

    return ctx.weights_sha if head is ctx.head else weights_fingerprint(head)


# -- a dataset's pairs and test faces ------------------------------------------------------------


def verification(scores: np.ndarray, pairs: PairSubset) -> dict:
    """10-fold verification of ``scores`` with a Wilson 95% interval over the pairs."""
    from advface.metrics.image import proportion_ci
    from advface.metrics.verification import evaluate_pairs

    r = evaluate_pairs(scores, pairs.issame, pairs.fold)
    n = int(r.n_pairs)
    return {
        "accuracy": r.accuracy,
        "accuracy_ci95": list(proportion_ci(int(round(r.accuracy * n)), n)),
        "accuracy_std": r.accuracy_std,
        "n_pairs": n,
        "threshold": r.threshold,
        "threshold_far_1e-3": r.far_threshold,
        "tar_at_far_1e-3": r.tar_at_far,
    }


def _test_faces(ctx: Context, dataset: str, known: dict[str, np.ndarray]) -> TestFaces:
    """A seeded sample of the faces of people no attacker trained on: LFW folds 1-5, CFP."""
    from advface.data.splits import IdentitySplit, cfp_identities, lfw_test_split

    p = ctx.profile
    if dataset == "lfw":
        split = lfw_test_split(ctx.root)
    else:
        names = cfp_identities(ctx.root)
        split = IdentitySplit("cfp-test", "cfp", list(names), list(names.values()))
    split = split.sample(p.test_n, p.seed)
    ctx.count_fallbacks(split.dataset, split.keys, f"{dataset} test faces")
    if all(k in known for k in split.keys):  # already embedded with the pairs
        clean = np.stack([known[k] for k in split.keys])
    else:
        clean = clean_stage(ctx, dataset, split.keys)
    return TestFaces(dataset, split.keys, ctx.images(split.dataset, split.keys), clean)


def prepare_dataset(
    ctx: Context, dataset: str, heads: dict[str, ExtraHead] | None = None
) -> DatasetEval:
    """Pairs (full protocol or a seeded stratified sample), their clean embeddings, the
    unprotected system (its thresholds: on the full protocol when ``fr_full``), test faces
    and Table 2's extra ``heads``."""
    from advface.data.protocols import load_protocol
    from advface.pipelines.eval_fr import pair_scores, sample_pairs, select_pairs

    p = ctx.profile
    proto = load_protocol(dataset, ctx.root)
    pairs = sample_pairs(proto, pairs_per_fold=p.pairs_per_fold, seed=p.seed)
    bench = select_pairs(proto) if p.fr_full else pairs
    ctx.count_fallbacks(ALIGNED[dataset], bench.keys, f"{dataset} pairs")
    emb = clean_stage(ctx, dataset, bench.keys)
    unprotected = verification(pair_scores(emb[bench.idx_a], emb[bench.idx_b]), bench)
    unprotected["full_protocol"] = p.fr_full or p.pairs_per_fold is None
    known = dict(zip(bench.keys, emb, strict=True))
    clean = np.stack([known[k] for k in pairs.keys])
    faces = _test_faces(ctx, dataset, known)
    ev = DatasetEval(
        dataset, pairs, p.pairs_per_fold is None, clean, unprotected, faces, dict(heads or {})
    )
    ev.grids["original"] = faces.images[: p.grid_n]
    ev.stored_faces = _faces_key(ctx, ALIGNED[dataset], [pairs.keys[i] for i in ev.stored_idx])
    # The thresholds are floats of this machine's arithmetic: a record is keyed by their inputs.
    ev.thresholds_key = dict(
        full=p.fr_full,
        pairs=_pairs_digest(bench),
        faces=_faces_key(ctx, ALIGNED[dataset], bench.keys),
    )
    return ev


# -- measurements and row values ----------------------------------------------------------------


def measure(ctx: Context, ev: DatasetEval, nets: Networks, cfg: ProtectionConfig) -> Measured:
    """The record of ``cfg`` on ``ev``: its reconstruction stage on the test faces and its
    stored-side stage (Psi and the extra heads of ``cfg``'s method, one protection pass),
    reduced to the tables' values. Cached as one JSON file keyed by both stages' keys, the
    faces, the pairs and the thresholds."""
    label = cfg.label
    if label in ev.measured:
        return ev.measured[label]
    prot = build(ctx, cfg, nets)
    every = set(nets.attackers)
    replayed = every if cfg.method == "none" else every & set(REPLAYED)
    heads = {} if cfg.method == "none" else {
        n: h.module for n, h in ev.heads.items() if main_config(ctx, h.method) == cfg
    }  # fmt: skip
    stages = (f"recon-{ev.dataset}-{label}", f"stored-{ev.dataset}-{label}")
    key = dict(
        recon=_recon_key(ctx, ev.faces, prot, {a: nets.keys[a] for a in nets.attackers}, replayed),
        faces=_digest(ev.faces.keys),
        stored=None if cfg.method == "none" else _stored_key(
            ctx, ev, prot, {"psi": ctx.head, **heads}),
        pairs=_pairs_digest(ev.pairs),
        thresholds=ev.thresholds_key,
        code=code_fingerprint(RECORD_CODE),
    )  # fmt: skip
    computed = False

    def compute() -> dict:
        nonlocal computed
        computed = True
        res = recon_stage(ctx, ev.faces, label, prot, nets.attackers, nets.keys, replayed)
        if cfg.method == "none":
            stored = {"psi": ev.clean[ev.stored_idx]}
        else:
            stored = stored_stage(ctx, ev, label, prot, heads)
        record = Measured(
            recon={a: recon_values(res, a, ev) for a in nets.attackers},
            accuracy={n: accuracy_values(v, ev) for n, v in stored.items()},
            grids={a: res[f"{a}/grid"] for a in nets.attackers if f"{a}/grid" in res},
        ).to_json()
        seconds = ctx.stages.compute_seconds
        record["seconds"] = {n: seconds[n] for n in stages if n in seconds}
        return record

    data = ctx.stages.json(f"record-{ev.dataset}-{label}", key, compute)
    if not computed:  # the stages' compute time, as if their chunks had been read
        for name, spent in data.get("seconds", {}).items():
            ctx.stages.tally(name, spent)
    ev.measured[label] = Measured.from_json(data)
    return ev.measured[label]


def _faces_key(ctx: Context, aligned: str, keys: list[str]) -> str:
    """What a stage's faces are made from (their names, source files and crop settings: the
    same on every machine, so a record can be carried), not only their names."""
    from advface.data.prepare import source_fingerprint

    return source_fingerprint(aligned, keys, data_root=ctx.root)


def _digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _pairs_digest(pairs: PairSubset) -> str:
    h = hashlib.sha256("\n".join(pairs.keys).encode())
    for a in (pairs.idx_a, pairs.idx_b, pairs.issame, pairs.fold):
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


def _values(measured: dict) -> dict:
    """Split measured values into a row's columns and its ``extra`` entries."""
    from advface.pipelines.reproduce.report import ROW_KEYS

    vals = {k: v for k, v in measured.items() if k in ROW_KEYS}
    vals["extra"] = {k: v for k, v in measured.items() if k not in ROW_KEYS}
    return vals


def recon_values(res: dict[str, np.ndarray], attacker: str, ev: DatasetEval) -> dict:
    """SSIM / PSNR / MSE and (replayed attackers) SRRA of ``attacker``: the function
    ``advface attack`` uses (:func:`advface.pipelines.recon_eval.summarize_recon`)."""
    from advface.pipelines.recon_eval import summarize_recon

    per = {k: res[f"{attacker}/{k}"] for k in ("ssim", "psnr", "mse", "emb")
           if f"{attacker}/{k}" in res}  # fmt: skip
    return _values(summarize_recon(per, ev.faces.clean, ev.thresholds))


def accuracy_values(stored: np.ndarray, ev: DatasetEval) -> dict:
    """Online verification: stored side protected, probe side clean."""
    from advface.pipelines.eval_fr import pair_scores

    pos = {int(i): j for j, i in enumerate(ev.stored_idx)}
    a = stored[[pos[int(i)] for i in ev.pairs.idx_a]]
    ver = verification(pair_scores(a, ev.clean[ev.pairs.idx_b]), ev.pairs)
    return _values(
        {
            "accuracy": ver["accuracy"],
            "accuracy_ci95": ver["accuracy_ci95"],
            "accuracy_std": ver["accuracy_std"],
            "n_pairs": ver["n_pairs"],
            "full_protocol": ev.full,
        }
    )


def merge(a: dict, b: dict) -> dict:
    return {**a, **b, "extra": {**a.get("extra", {}), **b.get("extra", {})}}
