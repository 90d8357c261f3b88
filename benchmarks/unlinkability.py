"""Unlinkability of the per-tenant index transforms, and the Procrustes attack on them.

The service's index holds ``Q_t e`` for a template with embedding ``e`` in tenant ``t``
(``advface.service.transform``). On a seeded LFW subset (people with >= 2 images) this script:

- measures the Gomez-Barrero et al. (2018) global unlinkability measure D<->sys between two
  tenants: mated scores = cosine(Q_A e_i, Q_B e_j) for two different images i, j of the same
  person, non-mated = the same for images of different people (the service's score, cosine);
  with the same comparisons on clean embeddings (no transform) and a noise floor (two disjoint
  samples of non-mated scores) for reference;
- runs the attack of someone who knows k (embedding, stored vector) pairs of one tenant and
  estimates Q_t by orthogonal Procrustes: the relative Frobenius error of the estimate, and
  how often the stored vectors of the other templates, mapped back, link to their own clean
  embedding (rank 1 among all n) or to another image of the same person.

``python benchmarks/unlinkability.py --n 2000 --out docs/results/unlinkability.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from advface.service.transform import orthogonal


def select_subset(keys: list[str], n: int, per_person: int, seed: int) -> list[str]:
    """``n`` images of people with >= 2 images: people in a seeded order, up to
    ``per_person`` images each (seeded), until ``n``."""
    by_person: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        by_person[k.split("/")[0]].append(k)
    rng = np.random.default_rng(seed)
    people = sorted(p for p, ks in by_person.items() if len(ks) >= 2)
    out: list[str] = []
    for p in rng.permutation(people):
        take = sorted(rng.choice(by_person[p], min(per_person, len(by_person[p])), replace=False))
        if len(out) + len(take) > n:
            take = take[: n - len(out)]
        if len(take) >= 2:
            out.extend(take)
        if len(out) >= n:
            break
    return out


def embed(keys: list[str], batch: int) -> np.ndarray:
    """FaceNet embeddings (the service's Psi(E(x)), L2-normalised) of aligned LFW faces."""
    from advface.models.facenet import load_facenet, preprocess
    from advface.pipelines.data import aligned_images

    images, _ = aligned_images("lfw", keys, progress=False)
    model = load_facenet()
    out = []
    with torch.inference_mode():
        for i in range(0, len(keys), batch):
            out.append(model(preprocess(np.asarray(images[i : i + batch]))).numpy())
    return np.concatenate(out).astype(np.float32)


def d_sys(mated: np.ndarray, nonmated: np.ndarray, bins: int) -> float:
    """Global unlinkability D<->sys (Gomez-Barrero et al., 2018), omega = 1, histogram
    estimates of the score densities over their common range."""
    lo, hi = min(mated.min(), nonmated.min()), max(mated.max(), nonmated.max())
    edges = np.linspace(lo, hi, bins + 1)
    pm, _ = np.histogram(mated, edges, density=True)
    pn, _ = np.histogram(nonmated, edges, density=True)
    lr = np.where(pn > 0, pm / np.where(pn > 0, pn, 1), np.inf)
    with np.errstate(invalid="ignore"):  # inf / inf where only mated scores fall
        d = np.where(lr > 1, np.where(np.isinf(lr), 1.0, 2 * lr / (1 + lr) - 1), 0.0)
    return float(np.sum(d * pm * np.diff(edges)))


def pairs(people: np.ndarray, n_nonmated: int, rng: np.random.Generator) -> tuple:
    """(mated (i, j) with i != j of one person, non-mated (i, j) of different people)."""
    idx: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(people):
        idx[p].append(i)
    mated = np.array([(i, j) for ids in idx.values() for i in ids for j in ids if i != j])
    a = rng.integers(0, len(people), 3 * n_nonmated)
    b = rng.integers(0, len(people), 3 * n_nonmated)
    keep = people[a] != people[b]
    return mated, np.stack([a[keep], b[keep]], 1)[:n_nonmated]


def unlinkability(e: np.ndarray, people: np.ndarray, seed: int, n_nonmated: int) -> dict:
    rng = np.random.default_rng(seed)
    mated, non = pairs(people, n_nonmated, rng)
    bins = int(min(len(mated) / 10, 100))
    qa, qb = (orthogonal(rng.bytes(32), e.shape[1]) for _ in range(2))
    ta, tb = e @ qa.T, e @ qb.T

    def scores(x: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
        return np.einsum("nd,nd->n", x[p[:, 0]], y[p[:, 1]])

    sm, sn = scores(ta, tb, mated), scores(ta, tb, non)
    cm, cn = scores(e, e, mated), scores(e, e, non)
    same = np.einsum("nd,nd->n", ta, tb)  # the very same image under the two tenants
    half = len(non) // 2
    return {
        "mated_pairs": len(mated),
        "nonmated_pairs": len(non),
        "bins": bins,
        "d_sys_two_tenants": d_sys(sm, sn, bins),
        "d_sys_two_tenants_same_image": d_sys(same, sn, bins),
        "d_sys_no_transform": d_sys(cm, cn, bins),
        "d_sys_noise_floor": d_sys(sn[:half][: len(mated)], sn[half:], bins),
        "two_tenants_mated_mean_std": [float(sm.mean()), float(sm.std())],
        "two_tenants_nonmated_mean_std": [float(sn.mean()), float(sn.std())],
        "no_transform_mated_mean_std": [float(cm.mean()), float(cm.std())],
        "no_transform_nonmated_mean_std": [float(cn.mean()), float(cn.std())],
    }


def procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The orthogonal W minimising ||x W^T - y||_F (rows are vectors)."""
    u, _, vt = np.linalg.svd(y.T.astype(np.float64) @ x.astype(np.float64))
    return u @ vt


def attack(e: np.ndarray, people: np.ndarray, ks: list[int], seed: int, repeats: int) -> list:
    """Procrustes from k known pairs: transform error and linking accuracy of the rest."""
    rng = np.random.default_rng(seed + 1)
    n, dim = e.shape
    same_person = people[:, None] == people[None, :]
    np.fill_diagonal(same_person, False)
    rows = []
    for k in [0, *ks]:
        err, link, ident = [], [], []
        for _ in range(repeats):
            q = orthogonal(rng.bytes(32), dim).astype(np.float64)
            stored = e @ q.T
            order = rng.permutation(n)
            known, rest = order[:k], order[k:]
            w = procrustes(e[known], stored[known]) if k else np.eye(dim)
            err.append(float(np.linalg.norm(w - q) / np.linalg.norm(q)))
            back = stored[rest] @ w  # w^T applied to each row: the attacker's estimate of e
            sims = back @ e.T
            link.append(float(np.mean(sims.argmax(1) == rest)))
            sims[np.arange(len(rest)), rest] = -np.inf  # identity: another image of the person
            ident.append(float(np.mean(same_person[rest, sims.argmax(1)])))
        rows.append(
            {
                "k": k,
                "transform_rel_error": float(np.mean(err)),
                "link_rank1_same_template": float(np.mean(link)),
                "link_rank1_same_person": float(np.mean(ident)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--per-person", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nonmated", type=int, default=200_000)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100, 200, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--embeddings", type=Path, help="cache of the embeddings (.npz)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/unlinkability.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    from advface.data.prepare import load_aligned

    keys = select_subset(list(load_aligned("lfw").keys), a.n, a.per_person, a.seed)
    t0, cached_run = time.perf_counter(), a.embeddings is not None and a.embeddings.exists()
    if cached_run:
        cached = np.load(a.embeddings)
        assert list(cached["keys"]) == keys, "embedding cache is of another subset"
        e = cached["e"]
    else:
        e = embed(keys, a.batch)
        if a.embeddings is not None:
            np.savez(a.embeddings, keys=np.array(keys), e=e)
    embed_s = time.perf_counter() - t0
    people = np.array([k.split("/")[0] for k in keys])
    out = {
        "subset": {
            "dataset": "LFW (deep-funneled, MTCNN-aligned 160x160)",
            "images": len(keys),
            "people": len(set(people)),
            "selection": f"people with >= 2 images in a seeded order (seed {a.seed}), "
            f"up to {a.per_person} images each, until {a.n} images",
        },
        "model": "FaceNet Inception-ResNet-v1 (CASIA-WebFace), clean embeddings Psi(E(x))",
        "embed_seconds": None if cached_run else round(embed_s, 1),
        "embeddings_from_cache": cached_run,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "unlinkability": unlinkability(e, people, a.seed, a.nonmated),
        "procrustes_attack": {
            "repeats": a.repeats,
            "rows": attack(e, people, a.k, a.seed, a.repeats),
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["unlinkability"], indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
