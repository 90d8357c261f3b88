"""Benchmark of the in-process identification index (``HnswIndex``, usearch) at gallery scale.

N synthetic 512-d unit embeddings sampled around identity centres (random unit vectors, rows
of ``--embeddings FILE.npy``, or a Gaussian model fitted to labelled real embeddings with
``--fit FILE.npz`` holding ``emb`` and ``ids``, e.g. FaceNet on all of LFW), all in one tenant:
build time, then for each search breadth ef: recall@1 against exact search and identify latency
p50/p99 at top-k 5 from 1 and 8 threads; start-up time (the service's path: stored embeddings
read from SQLite + graph build; and restoring a saved graph), bytes per template.

    python benchmarks/index_bench.py --n 200000 --out index_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from advface.service.index import HnswIndex, top_subjects
from advface.service.store import Store

TENANT = 1
VERSION = "bench-psi"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sample(
    n: int, a: argparse.Namespace, seed: int, centres: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around identity centres, and each row's identity.

    Centres: rows of ``centres`` (real embeddings), else random unit vectors in a random
    ``a.subspace``-dimensional subspace (0: the whole space). Face embeddings are not isotropic:
    in a 64-d subspace two identities' centres have cosine std ~0.12, like LFW impostor pairs
    under FaceNet (-0.22..0.35 measured); isotropic 512-d centres give ~0.04.
    """
    rng = np.random.default_rng(seed)
    if centres is None:
        z = rng.standard_normal((a.identities, a.subspace or a.dim)).astype(np.float32)
        if a.subspace:
            z = z @ rng.standard_normal((a.subspace, a.dim)).astype(np.float32)
        centres = _unit(z)
    ident = rng.integers(0, len(centres), n)
    out = np.empty((n, centres.shape[1]), np.float32)
    for lo in range(0, n, 65536):  # chunks: bounded temporary memory
        hi = min(n, lo + 65536)
        noise = rng.standard_normal((hi - lo, centres.shape[1])).astype(np.float32)
        out[lo:hi] = _unit(centres[ident[lo:hi]] + a.spread * noise)
    return out, ident


def fit_faces(emb: np.ndarray, ids: list[str]) -> dict[str, np.ndarray]:
    """Gaussian model of real face embeddings: identity centres ~ N(mu, C_between) and a
    template = unit(centre + N(0, C_within)), fitted on labelled real embeddings (e.g. FaceNet
    on all of LFW). Lets the benchmark draw a million identities that look like real ones."""
    emb = _unit(emb.astype(np.float64))
    names, inv = np.unique(np.asarray(ids), return_inverse=True)
    counts = np.bincount(inv)
    means = np.zeros((len(names), emb.shape[1]))
    np.add.at(means, inv, emb)
    means /= counts[:, None]
    multi = counts[inv] >= 2  # within-identity spread from people with two or more images
    resid = (emb - means[inv])[multi] * np.sqrt(counts[inv][multi] / (counts[inv][multi] - 1))[
        :, None
    ]
    within = resid.T @ resid / len(resid)
    # Means of n images carry within/n of noise; take it out of the between-identity spread.
    between = np.cov(means.T) - within * float(np.mean(1.0 / counts))
    return {"mu": means.mean(0), "between": _psd_root(between), "within": _psd_root(within)}


def _psd_root(c: np.ndarray) -> np.ndarray:
    """A matrix L with L @ L.T == c (negative eigenvalues from estimation noise dropped)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))).astype(np.float32)


def sample_fitted(
    n: int, identities: int, model: dict[str, np.ndarray], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) templates of ``identities`` people drawn from :func:`fit_faces`'s model."""
    rng = np.random.default_rng(seed)
    dim = len(model["mu"])
    centres = (
        model["mu"].astype(np.float32)
        + rng.standard_normal((identities, dim), dtype=np.float32) @ model["between"].T
    )
    ident = rng.integers(0, identities, n)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32) @ model["within"].T
        out[lo:hi] = _unit(centres[ident[lo:hi]] + noise)
    return out, ident


def pair_stats(vecs: np.ndarray, ident: np.ndarray, pairs: int = 5000) -> dict[str, float]:
    """Cosine of genuine (same identity) and impostor pairs of the sample, to compare with
    FaceNet on LFW (genuine mean 0.71, impostor mean 0.01)."""
    rng = np.random.default_rng(3)
    order = np.argsort(ident, kind="stable")
    same = np.flatnonzero(ident[order][1:] == ident[order][:-1])[:pairs]
    gen = np.einsum("ij,ij->i", vecs[order[same]], vecs[order[same + 1]])
    i, j = rng.integers(0, len(vecs), (2, pairs))
    imp = np.einsum("ij,ij->i", vecs[i], vecs[j])[ident[i] != ident[j]]
    return {
        "genuine_mean": round(float(gen.mean()), 3),
        "impostor_mean": round(float(imp.mean()), 3),
        "impostor_std": round(float(imp.std()), 3),
    }


def latency(index: HnswIndex, probes: np.ndarray, threads: int, k: int) -> dict[str, float]:
    """identify (top-k distinct subjects) latencies from ``threads`` concurrent callers."""
    times: list[float] = []
    lock = threading.Lock()

    def one(q: np.ndarray) -> None:
        t0 = time.perf_counter()
        top_subjects(index, TENANT, q, k)
        dt = time.perf_counter() - t0
        with lock:
            times.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, probes))
    wall = time.perf_counter() - t0
    ms = np.array(times) * 1000
    return {
        "threads": threads,
        "queries": len(probes),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "qps": round(len(probes) / wall, 1),
    }


def recall_at_1(index: HnswIndex, vecs: np.ndarray, probes: np.ndarray) -> float:
    """Share of probes whose HNSW top-1 template is the exact (brute-force) top-1."""
    hits = 0
    for q in probes:
        exact = int(np.argmax(vecs @ q))
        got = index.search(TENANT, q, 1)
        hits += bool(got) and got[0].template_id == f"t{exact}"
    return hits / len(probes)


def db_read_seconds(path: Path, vecs: np.ndarray, ident: np.ndarray) -> tuple[float, float]:
    """Seconds to read the N stored embeddings as start-up does, and database bytes each."""
    store = Store(f"sqlite:///{path}")
    store.create_key("bench")
    con = sqlite3.connect(path)
    con.executemany(
        "INSERT INTO subjects (id, tenant_id, subject_id, created_at) VALUES (?, ?, ?, 0)",
        ((int(i) + 1, TENANT, f"s{i}") for i in np.unique(ident)),
    )
    con.executemany(
        "INSERT INTO templates (id, tenant_id, subject_pk, blob, protection, protection_params,"
        " model_version, request_sha256, created_at) VALUES (?, ?, ?, x'', 'none', '{}', 'm',"
        " '', 0)",
        ((f"t{i}", TENANT, int(s) + 1) for i, s in enumerate(ident)),
    )
    con.executemany(
        "INSERT INTO template_embeddings (template_id, version, tenant_id, vector, created_at)"
        " VALUES (?, ?, ?, ?, 0)",
        ((f"t{i}", VERSION, TENANT, v.tobytes()) for i, v in enumerate(vecs)),
    )
    con.commit()
    con.close()
    t0 = time.perf_counter()
    n = sum(1 for _ in store.iter_embeddings(VERSION))
    seconds = time.perf_counter() - t0
    store.close()
    assert n == len(vecs)
    # Embedding rows only: a real template also holds its ~430 KB protected map.
    return seconds, path.stat().st_size / len(vecs)


def build(a: argparse.Namespace, vecs: np.ndarray, ident: np.ndarray) -> tuple[HnswIndex, float]:
    params = dict(connectivity=a.m, expansion_add=a.ef_add, expansion_search=a.ef_search[0])
    index = HnswIndex(vecs.shape[1], **params)
    t0 = time.perf_counter()
    for lo in range(0, a.n, 4096):  # the service's chunk size (core._add_grouped)
        hi = min(a.n, lo + 4096)
        index.add(TENANT, [(f"t{i}", f"s{ident[i]}", vecs[i]) for i in range(lo, hi)])
    return index, time.perf_counter() - t0


def run(a: argparse.Namespace) -> dict[str, Any]:
    model = None
    if a.fit:
        with np.load(a.fit) as f:
            emb, ids = f["emb"], [str(x) for x in f["ids"]]
        model = fit_faces(emb, ids)
        vecs, ident = sample_fitted(a.n, a.identities, model, 0)
        real = pair_stats(_unit(emb.astype(np.float32)), np.unique(ids, return_inverse=True)[1])
        source = f"Gaussian fit to {len(emb)} real embeddings of {len(set(ids))} people ({a.fit})"
    else:
        centres = _unit(np.load(a.embeddings).astype(np.float32)) if a.embeddings else None
        if centres is not None:
            a.identities = len(centres)  # one identity per real embedding
        vecs, ident = sample(a.n, a, 0, centres)
        real = None
        source = str(a.embeddings) if a.embeddings else f"random, subspace {a.subspace}"
    dim = vecs.shape[1]
    probe_ids = np.random.default_rng(1).choice(len(vecs), a.queries)
    # Genuine probes: a fresh sample of an enrolled identity (another "photo" of them).
    rng = np.random.default_rng(2)
    if model is not None:
        noise = rng.standard_normal((a.queries, dim), dtype=np.float32) @ model["within"].T
        probes = _unit(vecs[probe_ids] + noise)
    else:
        noise = rng.standard_normal((a.queries, dim)).astype(np.float32)
        probes = _unit(vecs[probe_ids] + a.spread * noise)
    out: dict[str, Any] = {
        "n": a.n,
        "dim": dim,
        "identities": a.identities,
        "centres": source,
        "spread": None if model is not None else a.spread,
        "real_pairs": real,
        "pairs": pair_stats(vecs, ident),
        "connectivity": a.m,
        "expansion_add": a.ef_add,
    }
    print(json.dumps(out), flush=True)
    index, out["build_s"] = build(a, vecs, ident)
    print(json.dumps({"build_s": round(out["build_s"], 1)}), flush=True)
    out["search"] = []
    for ef in a.ef_search:
        index.set_expansion_search(ef)
        r = {"ef": ef, "recall_at_1": recall_at_1(index, vecs, probes[: a.recall_queries])}
        r["latency"] = [latency(index, probes, t, a.top_k) for t in (1, 8)]
        print(json.dumps(r), flush=True)
        out["search"].append(r)
    out["memory_bytes_per_template"] = round(index.memory_bytes() / a.n, 1)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "ix")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "ix").iterdir())
        out["saved_bytes_per_template"] = round(disk / a.n, 1)
        del index
        t0 = time.perf_counter()
        HnswIndex.load(Path(tmp) / "ix")
        out["restore_saved_s"] = round(time.perf_counter() - t0, 2)
        if not a.no_db:
            read_s, per = db_read_seconds(Path(tmp) / "service.db", vecs, ident)
            out["db_read_s"], out["db_bytes_per_template"] = round(read_s, 2), round(per, 1)
            # The service's start-up = reading the stored embeddings + building the graph.
            out["startup_from_db_s"] = round(read_s + out["build_s"], 1)
    out["build_s"] = round(out["build_s"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="templates in the index")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--identities", type=int, default=0, help="default n/5 (5 per identity)")
    ap.add_argument("--subspace", type=int, default=64, help="centres' subspace (0: isotropic)")
    # 0.028 per dimension: two samples of one identity at cosine ~0.7, like LFW genuine pairs.
    ap.add_argument("--spread", type=float, default=0.028)
    ap.add_argument("--embeddings", type=Path, help="(k, dim) .npy of real embeddings: centres")
    ap.add_argument(
        "--fit", type=Path, help=".npz with emb (k, dim) and ids (k,): fit a face model"
    )
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--recall-queries", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--m", type=int, default=16, help="HNSW connectivity")
    ap.add_argument("--ef-add", type=int, default=128)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--no-db", action="store_true", help="skip the SQLite start-up measurement")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    a.identities = a.identities or max(1, a.n // 5)
    if a.n < 10 or a.queries < 1 or a.recall_queries > a.queries:
        ap.error("need --n >= 10, --queries >= 1, --recall-queries <= --queries")
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    result = run(a)
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = machine
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
