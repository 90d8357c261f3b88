"""Benchmark of the in-process identification index (``HnswIndex``, usearch) at gallery scale.

N synthetic 512-d unit embeddings sampled around identity centres (random unit vectors, or
rows of ``--embeddings FILE.npy`` such as real Psi embeddings of LFW), all in one tenant:
build time, identify latency p50/p99 at top-k 5 from 1 and 8 threads, recall@1 against exact
search, start-up time (the service's path: stored embeddings read from SQLite + graph build;
and restoring a saved graph), bytes per template.

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

from advface.service.core import IndexSync
from advface.service.index import HnswIndex, top_subjects
from advface.service.store import Store

TENANT = 1
VERSION = "bench-psi"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sample(
    n: int, dim: int, identities: int, spread: float, seed: int, centres: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors around ``identities`` centres, and each row's identity."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = _unit(rng.standard_normal((identities, dim)).astype(np.float32))
    ident = rng.integers(0, len(centres), n)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 65536):  # chunks: bounded temporary memory
        hi = min(n, lo + 65536)
        noise = rng.standard_normal((hi - lo, dim)).astype(np.float32)
        out[lo:hi] = _unit(centres[ident[lo:hi]] + spread * noise)
    return out, ident


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


def store_embeddings(path: Path, vecs: np.ndarray, ident: np.ndarray) -> Store:
    """A service database holding the N templates' embeddings (tiny blobs), bulk-inserted."""
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
    return store


def run(a: argparse.Namespace) -> dict[str, Any]:
    centres = None
    if a.embeddings:
        centres = _unit(np.load(a.embeddings).astype(np.float32))
    identities = a.identities or max(1, a.n // 5)
    vecs, ident = sample(a.n, a.dim, identities, a.spread, 0, centres)
    dim = vecs.shape[1]
    probe_ids = np.random.default_rng(1).choice(len(vecs), a.queries)
    # Genuine probes: a fresh sample of an enrolled identity (another "photo" of them).
    probes = _unit(
        vecs[probe_ids]
        + a.spread * np.random.default_rng(2).standard_normal((a.queries, dim)).astype(np.float32)
    )
    out: dict[str, Any] = {"n": a.n, "dim": dim, "identities": identities, "spread": a.spread}
    params = dict(connectivity=a.m, expansion_add=a.ef_add, expansion_search=a.ef_search)
    out["params"] = params

    index = HnswIndex(dim, **params)
    t0 = time.perf_counter()
    for lo in range(0, a.n, 50_000):
        hi = min(a.n, lo + 50_000)
        index.add(TENANT, [(f"t{i}", f"s{ident[i]}", vecs[i]) for i in range(lo, hi)])
    out["build_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps({"build_s": out["build_s"]}), flush=True)

    out["recall_at_1"] = round(recall_at_1(index, vecs, probes[: a.recall_queries]), 4)
    out["latency"] = [latency(index, probes, t, a.top_k) for t in (1, 8)]
    print(json.dumps({"recall_at_1": out["recall_at_1"], "latency": out["latency"]}), flush=True)
    out["memory_bytes_per_template"] = round(index.memory_bytes() / a.n, 1)

    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "ix")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "ix").iterdir())
        out["saved_bytes_per_template"] = round(disk / a.n, 1)
        t0 = time.perf_counter()
        HnswIndex.load(Path(tmp) / "ix")
        out["restore_saved_s"] = round(time.perf_counter() - t0, 2)
        del index
        if not a.no_db:
            db = Path(tmp) / "service.db"
            store = store_embeddings(db, vecs, ident)
            out["db_bytes_per_template"] = round(db.stat().st_size / a.n, 1)
            t0 = time.perf_counter()
            IndexSync(store, HnswIndex(dim, **params), VERSION).reload()
            out["startup_from_db_s"] = round(time.perf_counter() - t0, 2)
            store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="templates in the index")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--identities", type=int, default=0, help="default n/5 (5 per identity)")
    # sigma 0.04 per dimension: about cos 0.75 between two samples of one 512-d identity,
    # like two photos of one face under FaceNet.
    ap.add_argument("--spread", type=float, default=0.04)
    ap.add_argument("--embeddings", type=Path, help="(k, dim) .npy of real embeddings: centres")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--recall-queries", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--m", type=int, default=16, help="HNSW connectivity")
    ap.add_argument("--ef-add", type=int, default=128)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--no-db", action="store_true", help="skip the SQLite start-up measurement")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
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
