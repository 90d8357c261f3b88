"""From the bench's arrays to rows: reconstruction, replay (SRRA, chance) and accuracy."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from advface.pipelines.context import FACENET_CODE
from advface.pipelines.robustness.models import BenchContext, code_fingerprint

DATASET_OF = {"lfw": "lfw", "cfp-fp": "cfp"}
#: The false-accept rate of the second replay threshold.
FAR = 1e-3
#: What the report prints for a FAR threshold the pairs cannot give.
FAR_UNAVAILABLE = "n/a (too few impostor pairs)"


@dataclass
class ProtocolEval:
    """The (sampled) pair protocol with clean embeddings and the system's thresholds."""

    dataset: str
    keys: list[str]
    idx_a: np.ndarray
    idx_b: np.ndarray
    issame: np.ndarray
    fold: np.ndarray
    clean: np.ndarray  # (len(keys), 512)
    threshold: float
    # None when the pairs hold fewer than 1/FAR impostor pairs: no threshold has that FAR.
    threshold_far: float | None
    chance: float  # impostor pairs accepted at ``threshold`` (FAR): SRRA of a random face
    chance_far: float | None
    impostor_pairs: int
    clean_accuracy: dict
    key: str
    full: bool

    @property
    def stored(self) -> np.ndarray:
        """Indices (into ``keys``) of the stored side's distinct images."""
        return np.unique(self.idx_a)

    def stored_images(self, ctx: BenchContext) -> np.ndarray:
        from advface.pipelines.data import aligned_images

        keys = [self.keys[i] for i in self.stored]
        return aligned_images(
            DATASET_OF[self.dataset],
            keys,
            data_root=ctx.root,
            cache=ctx.data_cache,
            progress=ctx.progress,
        )[0]


def _verification(scores: np.ndarray, issame: np.ndarray, fold: np.ndarray) -> dict:
    """10-fold accuracy with a Wilson 95% interval over the pairs, as the reproduction reports
    it (each pair is decided once, at its fold's threshold; a normal interval over 10 folds
    has zero width at 100% and passes 100% on small samples)."""
    from advface.metrics.image import proportion_ci
    from advface.metrics.verification import evaluate_pairs

    r = evaluate_pairs(scores, issame, fold, far=FAR)
    correct = sum(
        int(np.sum((scores[fold == f] >= t) == issame[fold == f]))
        for f, t in zip(np.unique(fold), r.fold_thresholds, strict=True)
    )
    half = 1.96 * r.accuracy_std / np.sqrt(len(np.unique(fold)))
    n_impostor = int(np.sum(~issame))
    return {
        "accuracy": r.accuracy,
        "accuracy_std": r.accuracy_std,
        "accuracy_ci95": list(proportion_ci(correct, len(scores))),
        "accuracy_ci95_folds": [r.accuracy - half, r.accuracy + half],
        "correct_pairs": correct,
        "threshold": r.threshold,
        "threshold_far": far_threshold(r.far_threshold, n_impostor),
        "n_pairs": int(len(scores)),
        "impostor_pairs": n_impostor,
    }


def far_threshold(threshold: float, n_impostor: int, far: float = FAR) -> float | None:
    """``threshold`` when ``n_impostor`` pairs can measure ``far``, else None: with fewer than
    1/far of them, ``threshold_at_far`` returns the highest impostor score (FAR 0 on the
    sample), which is not a FAR = ``far`` threshold."""
    return threshold if n_impostor >= round(1 / far) else None


def clean_protocol(ctx: BenchContext, dataset: str, embed: Callable) -> ProtocolEval:
    """Clean embeddings of the profile's pairs (all, or a seeded stratified sample), the
    operating threshold (10-fold), the FAR = 1e-3 threshold (None with fewer than 1,000
    impostor pairs) and the chance acceptance rates."""
    from advface.data.protocols import load_protocol
    from advface.pipelines.data import aligned_images
    from advface.pipelines.eval_fr import pair_scores, sample_pairs

    p = ctx.profile
    sub = sample_pairs(
        load_protocol(dataset, ctx.root), pairs_per_fold=p.pairs_per_fold, seed=p.seed
    )
    key = hashlib.sha256("\n".join(sub.keys).encode()).hexdigest()[:16]
    # Clean embeddings run FaceNet only: keyed by its code and weights.
    code = code_fingerprint(FACENET_CODE)
    settings = dict(dataset=dataset, keys=key, weights=ctx.weights_sha, code=code)

    def compute() -> dict[str, np.ndarray]:
        images = aligned_images(
            DATASET_OF[dataset],
            sub.keys,
            data_root=ctx.root,
            cache=ctx.data_cache,
            progress=ctx.progress,
        )[0]
        return {"emb": embed(ctx, images, f"{dataset} clean pairs")}

    clean = ctx.stages.arrays(f"clean-{dataset}", settings, compute)["emb"]
    scores = pair_scores(clean[sub.idx_a], clean[sub.idx_b])
    ver = _verification(scores, sub.issame, sub.fold)
    impostor = scores[~sub.issame]
    far_thr = ver["threshold_far"]
    return ProtocolEval(
        dataset=dataset,
        keys=sub.keys,
        idx_a=sub.idx_a,
        idx_b=sub.idx_b,
        issame=sub.issame,
        fold=sub.fold,
        clean=clean,
        threshold=ver["threshold"],
        threshold_far=ver["threshold_far"],
        chance=float(np.mean(impostor >= ver["threshold"])),
        chance_far=None if far_thr is None else float(np.mean(impostor >= far_thr)),
        impostor_pairs=ver["impostor_pairs"],
        clean_accuracy=ver,
        key=key,
        full=p.pairs_per_fold is None,
    )


def _row(dataset: str, method: str, attacker: str | None, **values) -> dict:
    return {
        "table": "robustness",
        "dataset": dataset,
        "method": method,
        "attacker": attacker,
        **values,
    }


def recon_rows(
    dataset: str,
    method: str,
    results: dict[str, dict[str, np.ndarray]],
    clean_emb: np.ndarray,
    proto: ProtocolEval,
    *,
    attacker: str | None = None,
) -> list[dict]:
    """One row per attacker: SSIM / PSNR / MSE (mean, 95% CI), SRRA at both thresholds
    (:func:`advface.pipelines.recon_eval.summarize_recon`, as ``attack`` and ``reproduce``;
    the FAR one None when the pairs cannot give it) and the replay cosine with its 95% CI."""
    from advface.attacks.replay import pair_cosine
    from advface.metrics.image import summarize
    from advface.pipelines.recon_eval import summarize_recon

    thresholds = {"operating": proto.threshold}
    if proto.threshold_far is not None:
        thresholds["far_1e-3"] = proto.threshold_far
    rows = []
    for a, res in results.items():
        per = {k: res[f"{a}/{k}"] for k in ("ssim", "psnr", "mse", "emb")}
        vals = summarize_recon(per, clean_emb, thresholds)
        vals["srra_far"] = vals.pop("srra_far_1e-3", None)
        vals["srra_far_ci95"] = vals.pop("srra_far_1e-3_ci95", None)
        emb = np.asarray(per["emb"])
        cos = summarize(pair_cosine(emb, np.asarray(clean_emb)[: len(emb)]))
        vals["replay_cosine_ci95"] = [cos.ci_low, cos.ci_high]
        vals.update(
            chance_srra=proto.chance,
            chance_srra_far=proto.chance_far,
            threshold=proto.threshold,
            threshold_far=proto.threshold_far,
            impostor_pairs=proto.impostor_pairs,
        )
        rows.append(_row(dataset, method if attacker is None else attacker, a, **vals))
    return rows


def accuracy_rows(
    dataset: str, method: str, stored_emb: np.ndarray, proto: ProtocolEval
) -> list[dict]:
    """Online verification: the stored side protected, the probe side clean."""
    from advface.pipelines.eval_fr import pair_scores

    pos = {int(i): j for j, i in enumerate(proto.stored)}
    a = stored_emb[[pos[int(i)] for i in proto.idx_a]]
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    ver = _verification(pair_scores(a, proto.clean[proto.idx_b]), proto.issame, proto.fold)
    identity = np.sum(a * proto.clean[proto.idx_a], axis=1)
    return [
        _row(
            dataset,
            method,
            None,
            accuracy=ver["accuracy"],
            accuracy_std=ver["accuracy_std"],
            accuracy_ci95=ver["accuracy_ci95"],
            accuracy_ci95_folds=ver["accuracy_ci95_folds"],
            correct_pairs=ver["correct_pairs"],
            n_pairs=ver["n_pairs"],
            full_protocol=proto.full,
            clean_accuracy=proto.clean_accuracy["accuracy"],
            stored_identity_cosine=float(np.mean(identity)),
        )
    ]
