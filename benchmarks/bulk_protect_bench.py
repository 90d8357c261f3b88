"""Bulk protection throughput: ``advface protect-bulk`` on Ray (1 and 2 actors) vs the plain
``advface protect`` loop, same faces, same protection, same batch size.

Usage: python benchmarks/bulk_protect_bench.py [--n 16] [--steps 40] [--batch-size 8]
       [--shard-size 8] [--plain-threads 1 2] [--ray 1x1 2x1 1x2] [--cpus 2] [--out DIR]

Faces: the first ``--n`` LFW faces of the aligned cache (``advface prepare lfw``) through the
converted FaceNet's E; without the cache, ReLU noise maps of E's shape (timing does not depend
on the values). Protection: AdvFace (projected, alpha=epsilon=0.2) with the default shadow of
``advface train-protection`` ($ADVFACE_CACHE_DIR/weights/embedding-shadow/shadow) when it is
there, else an untrained ResRec of the same size (width 16, 2 blocks). The plain loop
(``protect_file``, one process) runs with each of ``--plain-threads`` torch threads, before and
after the Ray runs (the load of a shared machine drifts). Ray runs on a local cluster of
``--cpus`` CPUs started once (its start-up is reported apart), ``--ray AxC``: A actors of C CPUs
(= torch threads) each; each run's wall time includes starting its actors and loading FaceNet in
each. CPU seconds (process time, all threads) are reported beside wall time: on an
oversubscribed machine they show work, wall time shows the share of the cores we got. Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from advface.pipelines.bulk import ProtectionFactory, RayOptions, run_bulk
from advface.pipelines.protect import protect_file
from advface.protection import protection_from_spec


def make_maps(n: int) -> tuple[torch.Tensor, str]:
    """E(x) of the first ``n`` aligned LFW faces, or noise maps when the cache is absent."""
    try:
        from advface.data.prepare import load_aligned
        from advface.models.facenet import load_facenet, preprocess
        from advface.models.split import split_facenet

        images = load_aligned("lfw").images[:n]
        e, _ = split_facenet(load_facenet())
        with torch.inference_mode():
            z = torch.cat([e(preprocess(images[i : i + 16])) for i in range(0, len(images), 16)])
        return z.float().contiguous(), f"lfw[:{n}] through E"
    except (FileNotFoundError, ValueError, OSError) as exc:
        g = torch.Generator().manual_seed(0)
        return torch.relu(torch.randn(n, 64, 77, 77, generator=g)), f"noise ({exc})"


def shadow_path(tmp: Path) -> tuple[Path, str]:
    from advface.models.recon import build_recon, save_checkpoint
    from advface.protection.embedding_shadow import default_weights_dir

    default = default_weights_dir() / "shadow"
    if (default / "config.json").exists():
        return default, f"default ({default})"
    torch.manual_seed(0)
    model = build_recon("resrec", width=16, blocks=2).eval()
    return save_checkpoint(tmp / "shadow", model, "resrec", {"width": 16, "blocks": 2}), (
        "untrained resrec width 16, 2 blocks"
    )


def load() -> float:
    return round(os.getloadavg()[0], 2)


def plain(src: Path, dst: Path, spec: str, batch: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    t0, c0, l0 = time.perf_counter(), time.process_time(), load()
    prot = protection_from_spec(spec)  # loads FaceNet's E, like `advface protect`
    built = time.perf_counter() - t0
    s = protect_file(src, dst, prot, batch_size=batch, overwrite=True)
    wall = time.perf_counter() - t0
    return {
        "threads": threads,
        "wall_s": round(wall, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "build_s": round(built, 2),
        "faces_per_s": round(s["n_faces"] / wall, 4),
        "faces_per_s_protect_only": s["faces_per_s"],
        "load_1m_before": l0,
        "load_1m_after": load(),
    }


def bulk(src: Path, dst: Path, spec: str, args: argparse.Namespace, config: str) -> dict:
    actors, cpus = (int(x) for x in config.split("x"))
    t0, l0 = time.perf_counter(), load()
    s = run_bulk(
        src,
        dst,
        ProtectionFactory(spec),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        ray_options=RayOptions(actors=actors, cpus_per_actor=cpus),
    )
    wall = time.perf_counter() - t0
    return {
        "actors": actors,
        "cpus_per_actor": cpus,
        "wall_s": round(wall, 2),
        "faces_per_s": round(s["faces_computed"] / wall, 4),
        "shard_seconds_sum": s["shard_seconds"],
        "worker_cpu_s": s["worker_cpu_seconds"],
        "shards": s["shards"],
        "load_1m_before": l0,
        "load_1m_after": load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--plain-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ray", nargs="+", default=["1x1", "2x1", "1x2"], help="ACTORSxCPUS")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    import ray

    work = Path(args.out or tempfile.mkdtemp(prefix="bulk-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "load_1m_start": load(),
    }
    try:
        z, what = make_maps(args.n)
        src = work / "maps.safetensors"
        save_file({"z": z}, str(src))
        shadow, shadow_kind = shadow_path(work)
        spec = f"advface:{shadow},steps={args.steps}"
        out.update(faces=args.n, maps=what, shadow=shadow_kind, steps=args.steps)
        out.update(batch_size=args.batch_size, shard_size=args.shard_size, ray_cpus=args.cpus)
        dst = work / "plain.safetensors"
        out["plain_protect"] = [
            plain(src, dst, spec, args.batch_size, t) for t in args.plain_threads
        ]
        t0 = time.perf_counter()
        os.environ.setdefault("RAY_worker_niceness", "0")  # as run_bulk does for its own Ray
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        out["ray_init_s"] = round(time.perf_counter() - t0, 2)
        out["ray"] = [bulk(src, work / f"ray-{c}", spec, args, c) for c in args.ray]
        ray.shutdown()
        # Again after the Ray runs: on a shared machine the load drifts during the benchmark.
        out["plain_protect_after"] = [
            plain(src, dst, spec, args.batch_size, t) for t in args.plain_threads
        ]
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    out["load_1m_end"] = load()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
