"""AdvFace protection cost: one-face latency, throughput at batch 16/64, FLOPs per face.

Usage: python benchmarks/protection_throughput.py [--width 32 --blocks 4] [--steps 40]
       [--probe-steps 4] [--threads 2] [--device cpu]

E is the converted FaceNet front (falls back to a stand-in with E's exact conv geometry when
the weights are not cached); S is an untrained ResRec (timing does not depend on weights).
Every batch size (1 = one-face latency) is timed at T=0 and T=probe-steps and extrapolated
linearly to T=steps (every PGD step does identical work); --full-latency also times the full
T on one face as a cross-check.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn

from advface.models.recon import build_recon, estimate_flops
from advface.protection.advface import AdvFace


def conv_flops(model: nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-accumulates of the Conv2d layers for input ``x`` (one sample)."""
    total = 0

    def hook(mod: nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        total += 2 * out[0].numel() * (mod.in_channels // mod.groups) * kh * kw

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total


def extractor() -> tuple[nn.Module, str]:
    try:
        from advface.models.facenet import load_facenet
        from advface.models.split import split_facenet

        return split_facenet(load_facenet())[0], "facenet"
    except Exception:  # noqa: BLE001 - benchmark only: any failure -> same-geometry stand-in

        def block(cin: int, cout: int, **kw: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, bias=False, **kw), nn.BatchNorm2d(cout), nn.ReLU()
            )

        e = nn.Sequential(block(3, 32, stride=2), block(32, 32), block(32, 64, padding=1))
        return e.eval(), "stand-in"


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) of ``fn``.

    CPU time is reported because the shared machine is often oversubscribed: wall time then
    measures the neighbours as much as this code, CPU time / threads approximates an idle run.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--probe-steps", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--full-latency", action="store_true", help="also time T steps on 1 face")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shadow = build_recon("resrec", width=args.width, blocks=args.blocks).eval()
    e, e_kind = extractor()
    s_fwd = estimate_flops(shadow)
    e_fwd = conv_flops(e, torch.zeros(1, 3, 160, 160))
    # Weights are frozen, so backward computes input gradients only: about one forward's
    # convolution work (a training backward with weight gradients would be ~2x).
    per_face = s_fwd + e_fwd + args.steps * (s_fwd + s_fwd)

    def make(steps: int) -> AdvFace:
        return AdvFace(shadow, e, steps=steps, device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(p: AdvFace, n: int) -> tuple[float, float]:
        z = torch.relu(torch.randn(n, 64, 77, 77))
        p.protect(z[:1])  # warm-up (allocator, kernels)
        sync()

        def once() -> None:
            p.protect(z)
            sync()

        return timed(once, args.repeats)

    out: dict[str, object] = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "load_avg_1m_before": os.getloadavg()[0],
        "shadow": {"arch": "resrec", "width": args.width, "blocks": args.blocks},
        "extractor": e_kind,
        "steps": args.steps,
        "probe_steps": args.probe_steps,
        "gflops": {
            "shadow_forward": s_fwd / 1e9,
            "extractor_forward": e_fwd / 1e9,
            "per_protected_face": per_face / 1e9,
            "per_face_if_backward_2x": (s_fwd + e_fwd + 3 * args.steps * s_fwd) / 1e9,
        },
    }
    if args.full_latency:
        wall, cpu = run(make(args.steps), 1)
        out["one_face_full_T"] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    batches = {}
    for n in args.batches:
        w0, c0 = run(make(0), n)
        wk, ck = run(make(args.probe_steps), n)
        wall = w0 + args.steps * (wk - w0) / args.probe_steps
        cpu = c0 + args.steps * (ck - c0) / args.probe_steps
        idle = cpu / args.threads
        batches[str(n)] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "faces_per_s_wall": round(n / wall, 4),
            "faces_per_s_cpu_over_threads": round(n / idle, 4),
            "gflops_per_s_cpu_over_threads": round(n * per_face / idle / 1e9, 2),
        }
    out["batches"] = batches
    out["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
