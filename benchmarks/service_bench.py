"""Bounded loopback benchmark of the template service: enroll/verify/identify latency and
throughput.

Starts ``advface serve`` (real uvicorn process(es), SQLite) on 127.0.0.1 with W worker
processes, sends pre-computed client payloads of real LFW faces from C concurrent client
threads (the client-side alignment + E is timed separately, once), and optionally measures the
start-up gallery rebuild for N stored templates.

    python benchmarks/service_bench.py --workers 1 2 4 --clients 4 --requests 10 \
        --protection advface --protection-params shadow=PATH
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from advface.service import payload
from advface.service.backend import FACENET_VERSION, TOY_VERSION
from advface.service.process import ServerProcess
from advface.service.sdk import AdvFaceClient
from advface.service.store import Store


def _client_payloads(backend: str, n: int) -> tuple[list[bytes], dict[str, float]]:
    """n payloads of real LFW faces (align + E here) when data and FaceNet are available."""
    root = os.environ.get("ADVFACE_DATA_ROOT")
    if backend == "facenet" and root:
        from advface.data.align import Aligner

        lfw = Path(root) / "lfw" / "lfw-deepfunneled"
        people = sorted(p for p in lfw.iterdir() if p.is_dir())[:n]
        images = [sorted(p.glob("*.jpg"))[0] for p in people]
        client = AdvFaceClient("http://unused", "unused", aligner=Aligner(prefer_center=True))
        client.payload(images[0])  # load MTCNN and E before timing
        t0 = time.perf_counter()
        out = [client.payload(img) for img in images]
        per_face = (time.perf_counter() - t0) / len(out)
        return out, {"client_align_e_encode_ms": round(1000 * per_face, 1)}
    rng = np.random.default_rng(0)
    maps = [np.maximum(rng.standard_normal((64, 77, 77)).astype(np.float32), 0) for _ in range(n)]
    return [payload.encode(z) for z in maps], {}


def _pct(x: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(x) * 1000, q)), 1)


def _load(url: str, key: str, clients: int, requests: int, fn_name: str, payloads: list[bytes]):  # noqa: ANN202
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        with AdvFaceClient(url, key, retries=0) as c:
            sid = f"bench-{w}"
            for i in range(requests):
                body = payloads[(w + i) % len(payloads)]
                t0 = time.perf_counter()
                try:
                    if fn_name == "enroll":
                        c._binary(
                            f"/v1/subjects/{sid}/templates",
                            body,
                            {"Idempotency-Key": uuid.uuid4().hex},
                        )
                    elif fn_name == "verify":
                        c._binary(f"/v1/subjects/{sid}/verify", body)
                    else:
                        c._binary("/v1/identify", body, params={"top_k": 5})
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(repr(exc))
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "op": fn_name,
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "p50_ms": _pct(lat, 50) if lat else None,
        "p99_ms": _pct(lat, 99) if lat else None,
        "throughput_rps": round(len(lat) / wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="facenet", choices=["facenet", "toy"])
    ap.add_argument("--protection", default="none")
    ap.add_argument("--protection-params", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="server processes")
    ap.add_argument("--requests", type=int, default=20, help="per client and phase (bounded)")
    ap.add_argument("--rebuild", type=int, default=0, help="also time a rebuild of N templates")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", dest="json_out", default=None, help="write results here")
    a = ap.parse_args()
    if a.requests > 500 or max(a.clients) > 16 or a.rebuild > 20000 or max(a.workers) > 8:
        ap.error(
            "keep it bounded: --requests <= 500, --clients <= 16, --rebuild <= 20000,"
            " --workers <= 8"
        )

    work = Path(a.workdir or tempfile.mkdtemp(prefix="advface-bench-"))
    db_url = f"sqlite:///{work / 'bench.db'}"
    store = Store(db_url)
    key = store.create_key("bench")
    for w in range(max(a.clients)):
        store.create_subject(1, f"bench-{w}")
    payloads, client_info = _client_payloads(a.backend, 8)
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "backend": a.backend,
        "protection": a.protection,
        "protection_params": a.protection_params,
        "payload_bytes_mean": int(np.mean([len(p) for p in payloads])),
        **client_info,
        "runs": [],
    }
    srv_kw = dict(
        db_url=db_url,
        backend=a.backend,
        protection=a.protection,
        protection_params=a.protection_params,
        allow_unprotected=a.protection == "none",  # the benchmark's baseline, on purpose
        log_path=work / "server.log",
        # Measure the service, not the per-key limiter: all load clients share one key.
        extra_args=["--rate-limit", "0"],
    )
    results["loadavg_1m_start"] = os.getloadavg()[0]
    for w in a.workers:
        kw = dict(srv_kw, extra_args=[*srv_kw["extra_args"], "--workers", str(w)])
        with ServerProcess(**kw) as srv:
            # One enrollment per subject first, so verify always has a template.
            _load(srv.url, key, max(a.clients), 1, "enroll", payloads)
            # and one identification: the first one of a worker loads its index (start-up cost).
            _load(srv.url, key, 1, 1, "identify", payloads)
            for c in a.clients:
                for op in ("enroll", "verify", "identify"):
                    r = _load(srv.url, key, c, a.requests, op, payloads)
                    r["workers"] = w
                    r["loadavg_1m"] = os.getloadavg()[0]
                    print(json.dumps(r), flush=True)
                    results["runs"].append(r)  # type: ignore[union-attr]
    if a.rebuild:
        version = FACENET_VERSION if a.backend == "facenet" else TOY_VERSION
        have = store.count_templates()
        blobs = payloads
        for i in range(max(0, a.rebuild - have)):
            store.add_template(
                1,
                "bench-0",
                blobs[i % len(blobs)],
                protection="none",
                protection_params={},
                model_version=version,
                request_sha256="0" * 64,
            )
        log_file = Path(srv_kw["log_path"])
        offset = log_file.stat().st_size if log_file.exists() else 0
        with ServerProcess(**dict(srv_kw, log_level="info")):
            pass
        # /ready says only ready or not: the start-up figures are in the server's log.
        n, sec, cpu = _startup_figures(log_file.read_bytes()[offset:].decode(errors="replace"))
        results["rebuild"] = {
            "templates": n,
            "seconds": round(sec, 2),
            "cpu_seconds": round(cpu, 2),
            "seconds_per_10k_extrapolated": round(sec * 10000 / max(n, 1), 1),
            "cpu_seconds_per_10k_extrapolated": round(cpu * 10000 / max(n, 1), 1),
            "loadavg_1m": os.getloadavg()[0],
        }
        print(json.dumps(results["rebuild"]), flush=True)
    store.close()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


def _startup_figures(log: str) -> tuple[int, float, float]:
    """(templates, index build seconds, start-up CPU seconds) from a server log's lines."""
    import re

    ready = re.search(r"index ready: (\d+) templates in ([0-9.]+)s", log)
    cpu = re.search(r"start-up ([0-9.]+) s CPU", log)
    if not ready or not cpu:
        raise RuntimeError(f"no start-up figures in the server log: {log[-2000:]}")
    return int(ready.group(1)), float(ready.group(2)), float(cpu.group(1))


if __name__ == "__main__":
    main()
