"""Bytes per template and accuracy for each stored form of the protected map.

Usage: python benchmarks/storage_bench.py [--pairs-per-fold 30] [--advface-pairs-per-fold 10]
       [--steps 40] [--threads 2] [--seed 0]

For a seeded sample of LFW View 2 pairs, stratified over the ten folds (half genuine, half
impostor per fold; ``advface.pipelines.eval_fr.sample_pairs``), the first face of each pair is
enrolled as the service does it - E(x), the protection, the stored form (``encode_stored``),
decode, Psi - and the second is the fresh, unprotected probe (the paper's online case):
score = cos(Psi(stored map of a), Psi(E(b))). Per stored form: 10-fold verification accuracy on
the sample (mean +- std over folds), decisions that differ from float32's at float32's
per-fold thresholds, the cosine between Psi(decoded map) and Psi(protected map in float32),
and the bytes of the stored blob (payload, and sealed with AES-256-GCM as the service stores
it) plus the embedding row. ``embeddings-only`` keeps the float32 embedding of the protected
map and no map. Protections: ``none`` and ``advface`` (default shadow of ``advface
train-protection``, projected reading, alpha = epsilon = 0.2) on a smaller sample.
Needs the aligned LFW cache (``advface prepare lfw``) and ADVFACE_DATA_ROOT. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from advface.config import data_root
from advface.data.protocols import load_protocol
from advface.metrics.verification import evaluate_pairs
from advface.models.facenet import load_facenet, preprocess
from advface.models.split import split_facenet
from advface.pipelines.data import aligned_images
from advface.pipelines.eval_fr import sample_pairs
from advface.service import crypto, payload
from advface.service.core import encode_stored
from advface.service.tables import encode_vector

CODECS = ("float32", "float16", "uint8", "embeddings-only")


def batched(fn: Any, x: torch.Tensor, size: int = 16) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def embed(psi: Any, z: torch.Tensor) -> np.ndarray:
    e = batched(lambda b: torch.nn.functional.normalize(psi(b.float()), dim=1), z)
    return e.numpy()


def sealed_len(value: bytes) -> int:
    key = crypto.new_data_key()
    return len(crypto.seal(key, value, crypto.aad("map", 1, 1, "0" * 32)))


def evaluate(
    name: str, zp: torch.Tensor, probes: np.ndarray, sub: Any, psi: Any, shape: tuple[int, ...]
) -> dict[str, Any]:
    """Every stored form of the protected maps ``zp`` (one per pair's first face)."""
    ref = embed(psi, zp)  # float32 protected map: the reference embedding
    out: dict[str, Any] = {"faces": len(zp)}
    thresholds = None
    ref_decision = None
    for codec in CODECS:
        t0 = time.perf_counter()
        blobs = [encode_stored(z.numpy(), codec) for z in zp]
        if codec in ("embeddings-only", "float32"):  # float32 decodes bit-exact: no Psi again
            if codec == "float32":
                back = np.stack([payload.decode(b, expected_shape=shape) for b in blobs])
                assert np.array_equal(back, zp.numpy())
            emb = ref
        else:
            dec = torch.from_numpy(
                np.stack([payload.decode(b, expected_shape=shape) for b in blobs])
            )
            emb = embed(psi, dec)
        scores = (emb * probes).sum(1)
        res = evaluate_pairs(scores, sub.issame, sub.fold)
        per_fold = np.array(res.fold_thresholds)[np.searchsorted(np.unique(sub.fold), sub.fold)]
        if thresholds is None:
            thresholds, ref_decision = per_fold, scores >= per_fold
        cos = (emb * ref).sum(1)
        map_bytes = [len(b) for b in blobs]
        vec = len(encode_vector(ref[0]))
        out[codec] = {
            "accuracy": round(res.accuracy, 4),
            "accuracy_std_over_folds": round(res.accuracy_std, 4),
            "decisions_changed_vs_float32": int(((scores >= thresholds) != ref_decision).sum()),
            "cosine_to_float32_mean": round(float(cos.mean()), 6),
            "cosine_to_float32_min": round(float(cos.min()), 6),
            "map_bytes_mean": round(float(np.mean(map_bytes)), 1),
            "map_bytes_sealed_mean": round(float(np.mean([sealed_len(b) for b in blobs])), 1),
            "embedding_bytes": vec,
            "embedding_bytes_sealed": sealed_len(encode_vector(ref[0])),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    print(f"{name}: done", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs-per-fold", type=int, default=30)
    ap.add_argument("--advface-pairs-per-fold", type=int, default=10, help="0: skip advface")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = data_root()
    protocol = load_protocol("lfw", root, check_files=False)
    e, psi = split_facenet(load_facenet())
    shape = (64, 77, 77)
    out: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "load_1m_start": round(os.getloadavg()[0], 2),
        "protocol": "LFW View 2, seeded sample stratified over the 10 folds",
        "seed": args.seed,
    }
    runs: list[tuple[str, int]] = [("none", args.pairs_per_fold)]
    if args.advface_pairs_per_fold:
        runs.append(("advface", args.advface_pairs_per_fold))
    for name, per_fold in runs:
        sub = sample_pairs(protocol, pairs_per_fold=per_fold, seed=args.seed)
        images, _ = aligned_images("lfw", sub.keys, data_root=root, progress=False)
        z = batched(e, preprocess(images)).float()
        probes = embed(psi, z[sub.idx_b])
        za = z[sub.idx_a]
        t0 = time.perf_counter()
        if name == "advface":
            from advface.protection import build_protection
            from advface.protection.embedding_shadow import default_weights_dir

            prot = build_protection(
                "advface", shadow=default_weights_dir() / "shadow", extractor=e, steps=args.steps
            )
            za = torch.cat([prot.protect(za[i : i + 16]) for i in range(0, len(za), 16)])
        res = evaluate(name, za, probes, sub, psi, shape)
        res.update(pairs=len(sub.issame), protect_seconds=round(time.perf_counter() - t0, 1))
        if name == "advface":
            res["protection"] = {"steps": args.steps, "alpha": 0.2, "epsilon": 0.2}
        out[name] = res
    out["load_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
