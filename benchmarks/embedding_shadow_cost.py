"""Protection cost per face: AdvFace vs embedding-shadow, at batch 1 and 16 (the targets are
stated per face on 2 CPU cores, amortised at batch 16).

Usage: python benchmarks/embedding_shadow_cost.py [--recon cpu] [--threads 2] [--repeats 2]
       [--device cpu] [--es-steps 20] [--advface-steps 40] [--es-identity-every 1,2]

Networks: the converted FaceNet split (E, Psi), untrained decoders of the chosen recon profile
(ResRec shadow S, EmbDec generator D; timing does not depend on weights). Inputs are random
feature maps of E's shape. FLOPs are convolution FLOPs (forward; x3 for forward+backward).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from advface.models.recon import build_recon, estimate_flops, profile_config
from advface.protection import build_protection


def _time(prot, batch: int, repeats: int, device: str) -> float:
    z = torch.rand(batch, 64, 77, 77, device=device)
    prot.protect(z[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prot.protect(z)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recon", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--es-steps", type=int, default=20)
    ap.add_argument("--advface-steps", type=int, default=40)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument(
        "--es-identity-every",
        default="1",
        help="comma-separated k: embedding-shadow runs Psi's backward every k-th step",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet

    enc, head = split_facenet(load_facenet().eval())
    shadow = build_recon("resrec", **profile_config("resrec", args.recon)).eval()
    gen = build_recon("embdec", **profile_config("embdec", args.recon)).eval()
    psi_flops = estimate_psi_flops(head)
    prots = {
        "advface": build_protection(
            "advface", shadow=shadow, extractor=enc, steps=args.advface_steps, device=args.device
        ),
    }
    s_fl, d_fl = estimate_flops(shadow), estimate_flops(gen)
    gflop = {"advface": (args.advface_steps * 3 * s_fl) / 1e9}
    for k in (int(x) for x in args.es_identity_every.split(",")):
        name = "embedding-shadow" if k == 1 else f"embedding-shadow/identity_every={k}"
        prots[name] = build_protection(
            "embedding-shadow",
            generator=gen,
            shadow=shadow,
            extractor=enc,
            head=head,
            steps=args.es_steps,
            epsilon=0.5,
            identity_every=k,
            device=args.device,
        )
        psi_steps = -(-args.es_steps // k)  # ceil: Psi's forward+backward on every k-th step
        gflop[name] = (d_fl + args.es_steps * 3 * s_fl + psi_steps * 3 * psi_flops) / 1e9
    out = {
        "machine": f"{platform.machine()}, {args.threads} threads, load {os.getloadavg()[0]:.1f}",
        "device": args.device,
        "recon": args.recon,
        "gflop_per_face": {k: round(v, 1) for k, v in gflop.items()},
        "ms_per_face": {},
    }
    for name, prot in prots.items():
        for b in (int(x) for x in args.batches.split(",")):
            out["ms_per_face"][f"{name}@{b}"] = round(_time(prot, b, args.repeats, args.device))
    print(json.dumps(out, indent=1))


def estimate_psi_flops(head: torch.nn.Module) -> float:
    """Convolution + linear FLOPs of Psi for one (64,77,77) input (forward)."""
    total = 0

    def hook(mod, inp, out) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total += 2 * out[0].numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += 2 * mod.in_features * mod.out_features

    mods = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    hs = [m.register_forward_hook(hook) for m in mods]
    with torch.no_grad():
        head(torch.zeros(1, 64, 77, 77))
    for h in hs:
        h.remove()
    return float(total)


if __name__ == "__main__":
    main()
