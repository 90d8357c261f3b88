"""Verification benchmark (paper Sec. 5.1): LFW View 2, CFP-FP, CFP-FF, optionally with a
protection applied to the stored side's feature maps (online mode, Sec. 4.4)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from advface.metrics.verification import evaluate_pairs
from advface.pipelines.data import aligned_images
from advface.pipelines.embed import FeatureFn, embed_cached, embed_split, model_fingerprint

DATASETS: dict[str, str] = {"lfw": "lfw", "cfp-fp": "cfp", "cfp-ff": "cfp"}
ProtectMode = Literal["stored", "both"]
#: Protected faces per cached chunk: an interrupted run loses at most one chunk's work.
PROTECT_CHUNK = 256
#: Sources the clean and the protected embeddings run (hashed into their cache keys).
CLEAN_CODE: tuple[str, ...] = ("models/facenet.py", "models/split.py", "pipelines/embed.py")
PROTECTED_CODE: tuple[str, ...] = ("protection", "checks.py", *CLEAN_CODE)


@dataclass
class PairSubset:
    """A protocol restricted to some folds / pairs per fold, with image indices."""

    keys: list[str]
    idx_a: np.ndarray
    idx_b: np.ndarray
    issame: np.ndarray
    fold: np.ndarray


def select_pairs(protocol, *, folds: int | None = None, pairs_per_fold: int | None = None):
    """Keep the first ``folds`` folds and, in each, the first ``pairs_per_fold`` pairs split
    evenly between genuine and impostor (so small runs stay balanced)."""
    issame = np.asarray(protocol.issame, dtype=bool)
    fold = np.asarray(protocol.fold)
    keep = np.ones(len(issame), dtype=bool)
    if folds is not None:
        if folds < 2:
            raise ValueError("folds must be >= 2 (a threshold is chosen on the other folds)")
        keep &= fold < folds
    if pairs_per_fold is not None:
        if pairs_per_fold < 2:
            raise ValueError("pairs_per_fold must be >= 2")
        for f in np.unique(fold):
            for same in (True, False):
                ids = np.flatnonzero((fold == f) & (issame == same) & keep)
                keep[ids[pairs_per_fold // 2 :]] = False
    sel = np.flatnonzero(keep)
    keys_a = [protocol.keys_a[i] for i in sel]
    keys_b = [protocol.keys_b[i] for i in sel]
    keys = sorted(set(keys_a) | set(keys_b))
    pos = {k: i for i, k in enumerate(keys)}
    return PairSubset(
        keys=keys,
        idx_a=np.array([pos[k] for k in keys_a], dtype=np.int64),
        idx_b=np.array([pos[k] for k in keys_b], dtype=np.int64),
        issame=issame[sel],
        fold=fold[sel],
    )


def sample_pairs(
    protocol, *, pairs_per_fold: int | None, seed: int = 0, folds: int | None = None
) -> PairSubset:
    """A seeded random sample of ``pairs_per_fold`` pairs from every fold (of the first
    ``folds``), half genuine and half impostor (all pairs when ``pairs_per_fold`` is None):
    unlike :func:`select_pairs`, which takes the first pairs (alphabetical names), a sample
    spans the whole protocol."""
    if pairs_per_fold is None:
        return select_pairs(protocol, folds=folds)
    if pairs_per_fold < 2:
        raise ValueError("pairs_per_fold must be >= 2")
    if folds is not None and folds < 2:
        raise ValueError("folds must be >= 2 (a threshold is chosen on the other folds)")
    rng = np.random.default_rng(seed)
    issame = np.asarray(protocol.issame, dtype=bool)
    fold = np.asarray(protocol.fold)
    keep = np.zeros(len(issame), dtype=bool)
    for f in np.unique(fold):
        if folds is not None and f >= folds:
            continue
        for same in (True, False):
            ids = np.flatnonzero((fold == f) & (issame == same))
            keep[rng.permutation(ids)[: pairs_per_fold // 2]] = True
    sub = _SubProtocol(
        [k for k, m in zip(protocol.keys_a, keep, strict=True) if m],
        [k for k, m in zip(protocol.keys_b, keep, strict=True) if m],
        issame[keep],
        fold[keep],
    )
    return select_pairs(sub)


@dataclass
class _SubProtocol:
    keys_a: list[str]
    keys_b: list[str]
    issame: np.ndarray
    fold: np.ndarray


def _protected_stage(
    protection: FeatureFn,
    dataset: str,
    model: nn.Module,
    cache: str | Path | None,
    flip: bool,
    batch_size: int,
    device: str,
):
    """Where a protection's stored-side embeddings are cached in chunks (a long run resumes
    at its first missing chunk): ``(stages, name, key)``, or None for a bare function (no
    ``key_params``: nothing to key a cache by). The key holds the protection's complete
    parameters and network fingerprints, FaceNet's weights, the batch (a protection sees
    whole batches), the device and the code run."""
    if not hasattr(protection, "key_params"):
        return None
    from advface.config import cache_dir
    from advface.pipelines.context import code_fingerprint
    from advface.pipelines.stages import StageCache

    key = dict(
        dataset=dataset,
        protection=protection.key_params(),
        weights=model_fingerprint(model),
        flip=flip,
        batch=batch_size,
        device=str(torch.device(device)),
        code=code_fingerprint(PROTECTED_CODE),
    )
    return StageCache(cache_dir(cache) / "eval-fr"), f"protected-{dataset}", key


def pair_scores(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of L2-normalised embeddings."""
    return np.sum(emb_a * emb_b, axis=1).astype(np.float64)


def _clean_embeddings(
    images: np.ndarray,
    keys: list[str],
    model: nn.Module,
    dataset: str,
    cache: str | Path | None,
    embedding_cache: bool,
    kw: dict,
) -> np.ndarray:
    """Psi(E(x)) of every image, cached per image under ``CACHE/embeddings`` (keyed by the
    model's fingerprint, the code that embeds and flip) unless ``embedding_cache`` is False."""
    store = None
    if embedding_cache:
        from advface.config import cache_dir
        from advface.pipelines.context import code_fingerprint

        code = code_fingerprint(CLEAN_CODE)[:8]
        tag = f"{DATASETS[dataset]}-{model_fingerprint(model)}-{code}"
        tag += "-flip" if kw["flip"] else ""
        store = str(cache_dir(cache) / "embeddings" / f"{tag}.safetensors")
    return embed_cached(images, keys, model, store, desc="embed", **kw)


def _protected_embeddings(
    images: np.ndarray,
    sub: PairSubset,
    clean: np.ndarray,
    model: nn.Module,
    protection: FeatureFn,
    protection_name: str,
    stored_ids: np.ndarray,
    stage: tuple | None,
    kw: dict,
) -> np.ndarray:
    """``clean`` with the rows ``stored_ids`` replaced by Psi(protect(E(x))): each stored
    image protected once, as a service would at enrolment, in cached chunks when ``stage``
    is given."""
    from advface.models.split import split_facenet

    enc, head = split_facenet(model)
    prot = clean.copy()

    def compute(sl: slice) -> dict[str, np.ndarray]:
        ids = stored_ids[sl]
        desc = f"embed {protection_name} [{sl.start}:{sl.start + len(ids)}/{len(stored_ids)}]"
        return {"emb": embed_split(images[ids], enc, head, protection, desc=desc, **kw)}

    if stage is None:
        prot[stored_ids] = compute(slice(0, len(stored_ids)))["emb"]
    else:
        stages, name, key = stage
        stored_keys = [sub.keys[i] for i in stored_ids]
        prot[stored_ids] = stages.chunked(name, key, stored_keys, PROTECT_CHUNK, compute)["emb"]
    return prot


def _pairs_label(pairs_per_fold: int | None, folds: int | None, seed: int) -> str:
    if pairs_per_fold is not None:
        return f"seeded sample (seed {seed}) of {pairs_per_fold} pairs per fold, half genuine"
    return "full protocol" if folds is None else f"first {folds} folds"


def eval_fr(
    dataset: str,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    model: nn.Module | None = None,
    protection: FeatureFn | None = None,
    protection_name: str = "none",
    mode: ProtectMode = "stored",
    flip: bool = False,
    folds: int | None = None,
    pairs_per_fold: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    embedding_cache: bool = True,
) -> dict:
    """Run the verification benchmark and return a JSON-ready dict.

    Without protection every image is embedded once by the full network. With a
    ``protection`` (a map on E's feature maps), the stored side (first image of each pair)
    is embedded as Psi(protect(E(x))) and the probe as Psi(E(x)) (``mode="stored"``, the
    deployment case), or both sides are protected (``mode="both"``). Unprotected embeddings
    are cached per image under the cache dir (keyed by the model's fingerprint); a
    protection's (one with ``key_params``) in chunks under ``CACHE/eval-fr``, so an
    interrupted run resumes (``embedding_cache=False``: neither is cached).
    ``pairs_per_fold`` takes a seeded (``seed``) random sample from every fold, half genuine.
    """
    from advface.config import data_root as resolve_root
    from advface.data.protocols import load_protocol
    from advface.models.facenet import load_facenet

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if mode not in ("stored", "both"):
        raise ValueError(f"mode must be 'stored' or 'both', got {mode!r}")
    t0 = time.perf_counter()
    root = resolve_root(data_root)
    protocol = load_protocol(dataset, root)
    sub = sample_pairs(protocol, pairs_per_fold=pairs_per_fold, seed=seed, folds=folds)
    images, found = aligned_images(
        DATASETS[dataset], sub.keys, data_root=root, cache=cache, progress=progress
    )
    model = (model or load_facenet(cache=cache)).to(device).eval()
    kw = dict(batch_size=batch_size, device=device, flip=flip, progress=progress)
    clean = _clean_embeddings(images, sub.keys, model, dataset, cache, embedding_cache, kw)
    emb_a, emb_b = clean[sub.idx_a], clean[sub.idx_b]
    if protection is not None:
        stored_ids = np.unique(sub.idx_a if mode == "stored" else np.r_[sub.idx_a, sub.idx_b])
        stage = (
            _protected_stage(protection, dataset, model, cache, flip, batch_size, device)
            if embedding_cache
            else None
        )
        prot = _protected_embeddings(
            images, sub, clean, model, protection, protection_name, stored_ids, stage, kw
        )
        emb_a = prot[sub.idx_a]
        emb_b = (prot if mode == "both" else clean)[sub.idx_b]
    result = evaluate_pairs(pair_scores(emb_a, emb_b), sub.issame, sub.fold)
    used = np.unique(np.r_[sub.idx_a, sub.idx_b])
    return {
        "dataset": dataset,
        "accuracy": result.accuracy,
        "accuracy_std": result.accuracy_std,
        "tar_at_far_1e-3": result.tar_at_far,
        "auc": result.auc,
        "threshold": result.threshold,
        "threshold_far_1e-3": result.far_threshold,
        "n_pairs": result.n_pairs,
        "pairs": _pairs_label(pairs_per_fold, folds, seed),
        "n_images": int(len(used)),
        "no_face": int((~found[used]).sum()),
        "fold_accuracies": list(result.fold_accuracies),
        "protection": protection_name,
        "protect_mode": mode if protection is not None else None,
        "flip": flip,
        "device": str(torch.device(device)),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
