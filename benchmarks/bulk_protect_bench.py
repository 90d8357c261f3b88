"""Bulk protection throughput: ``advface protect-bulk`` on Ray (1 and 2 actors) vs the plain
``advface protect`` loop, same faces, same protection, same batch size.

Usage: python benchmarks/bulk_protect_bench.py [--n 64] [--steps 40] [--batch-size 16]
       [--shard-size 16] [--threads 2] [--out DIR]

Faces: the first ``--n`` LFW faces of the aligned cache (``advface prepare lfw``) through the
converted FaceNet's E; without the cache, ReLU noise maps of E's shape (timing does not depend
on the values). Protection: AdvFace (projected, alpha=epsilon=0.2) with the default shadow of
``advface train-protection`` ($ADVFACE_CACHE_DIR/weights/embedding-shadow/shadow) when it is
there, else an untrained ResRec of the same size (width 16, 2 blocks). Ray runs on a local
cluster of ``--threads`` CPUs started once (its start-up is reported apart); each run's
wall time includes starting its actors and loading FaceNet in each. The plain loop runs before
and after the Ray runs (the load of a shared machine drifts). Prints one JSON object.
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


def plain(src: Path, dst: Path, spec: str, batch: int) -> dict[str, Any]:
    t0, l0 = time.perf_counter(), load()
    prot = protection_from_spec(spec)  # loads FaceNet's E, like `advface protect`
    built = time.perf_counter() - t0
    s = protect_file(src, dst, prot, batch_size=batch)
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "build_s": round(built, 2),
        "faces_per_s": round(s["n_faces"] / wall, 4),
        "faces_per_s_protect_only": s["faces_per_s"],
        "load_1m_before": l0,
        "load_1m_after": load(),
    }


def bulk(src: Path, dst: Path, spec: str, args: argparse.Namespace, actors: int) -> dict:
    cpus = args.threads / actors
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
        "shards": s["shards"],
        "load_1m_before": l0,
        "load_1m_after": load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    import ray

    torch.set_num_threads(args.threads)
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
        out.update(batch_size=args.batch_size, shard_size=args.shard_size, threads=args.threads)
        out["plain_protect"] = plain(src, work / "plain.safetensors", spec, args.batch_size)
        t0 = time.perf_counter()
        os.environ.setdefault("RAY_worker_niceness", "0")  # as run_bulk does for its own Ray
        ray.init(num_cpus=args.threads, include_dashboard=False, logging_level=logging.WARNING)
        out["ray_init_s"] = round(time.perf_counter() - t0, 2)
        out["ray"] = [bulk(src, work / f"ray-{a}", spec, args, a) for a in args.actors]
        ray.shutdown()
        # Again after the Ray runs: on a shared machine the load drifts during the benchmark.
        out["plain_protect_after"] = plain(src, work / "plain2.safetensors", spec, args.batch_size)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    out["load_1m_end"] = load()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
