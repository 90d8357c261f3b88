"""AdvFace from Python: protect a few faces' features, then see what recognition and an
attacker make of them.

    python examples/protect_and_attack.py FACE.jpg [FACE.jpg ...] --shadow SHADOW_DIR \
        [--attacker ATTACKER_DIR] [--steps 40] [--grid grid.png]

SHADOW_DIR and ATTACKER_DIR are reconstruction networks written by ``advface train-recon``:
the server's shadow S, and a decoder an attacker trained on other people. The faces are
aligned with MTCNN, E runs as the client would, and the server's protection replaces each
feature map before it would be stored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from advface.attacks.train import to_unit
from advface.data.align import Aligner
from advface.metrics.image import image_metrics
from advface.models.facenet import load_facenet, preprocess
from advface.models.recon import load_checkpoint
from advface.models.split import split_facenet
from advface.protection import build_protection


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", type=Path, help="face images (any size: aligned here)")
    ap.add_argument("--shadow", required=True, type=Path, help="the server's shadow S")
    ap.add_argument("--attacker", type=Path, help="an attacker's decoder (optional)")
    ap.add_argument("--steps", type=int, default=40, help="AdvFace's PGD steps T")
    ap.add_argument("--grid", type=Path, help="PNG: faces, then reconstructions (clean, protected)")
    args = ap.parse_args(argv)

    # Client: align, then E(x) -> (N, 64, 77, 77).
    aligner = Aligner()
    faces = np.stack([aligner.align_file(p).image for p in args.images])  # (N,160,160,3) uint8
    extractor, psi = split_facenet(load_facenet().eval())
    with torch.no_grad():
        z = extractor(preprocess(faces))

    # Server: the protection in front of storage; Psi keeps recognising the stored features.
    advface = build_protection("advface", shadow=args.shadow, extractor=extractor, steps=args.steps)
    stored = advface.protect(z)
    with torch.no_grad():
        cosine = (psi(z) * psi(stored)).sum(dim=1)  # both unit-norm
    # AdvFace perturbs the shadow image S(z) and stores E of it, so z' is a new feature map,
    # not z plus a small bounded change.
    change = (stored - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    out = {
        "relative_change": change.tolist(),
        "cosine_clean_vs_stored": cosine.tolist(),
        "protection": advface.params(),
    }
    print(f"AdvFace ({args.steps} steps), per face: ||z' - z|| / ||z||, cosine of Psi(z), Psi(z')")
    rows = zip(args.images, out["relative_change"], out["cosine_clean_vs_stored"], strict=True)
    for path, d, c in rows:
        print(f"  {path.name}: {d:.3f}  {c:.3f}")

    # Thief: the attacker's decoder on the clean features and on what was stored.
    if args.attacker is not None:
        decoder, _ = load_checkpoint(args.attacker)
        target = to_unit(faces)
        with torch.no_grad():
            recs = {"clean": decoder(z).clamp(0, 1), "stored": decoder(stored).clamp(0, 1)}
        for name, rec in recs.items():
            m = {k: float(v.mean()) for k, v in image_metrics(rec, target).items()}
            out[f"attack_{name}"] = m
            print(f"  attacker on {name} features: SSIM {m['ssim']:.3f}  PSNR {m['psnr']:.2f} dB")
        if args.grid is not None:
            _write_grid(args.grid, [target, recs["clean"], recs["stored"]])
    return out


def _write_grid(path: Path, rows: list[torch.Tensor]) -> None:
    import cv2

    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, N*W)
    rgb = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
