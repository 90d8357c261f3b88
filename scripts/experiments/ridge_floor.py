"""The ridge embedding decoder against the mean face on LFW (the figures in docs/ATTACKS.md).

Fits :func:`advface.attacks.ridge.fit_ridge_decoder` on a seeded sample of N people-disjoint
LFW attacker images and their mirror images (one cross-validation group each), then scores it
and the mean training face by SSIM on a seeded sample of M LFW test images (folds 1-5).

    export ADVFACE_DATA_ROOT=../shared/data
    python scripts/experiments/ridge_floor.py --train 300 --test 64
    python scripts/experiments/ridge_floor.py --train 1500 --test 200

About 0.25 s of FaceNet per image on one CPU core, then seconds to a minute for the fit.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from advface.attacks.ridge import fit_ridge_decoder
from advface.data.splits import lfw_attacker_split, lfw_test_split
from advface.metrics.image import ssim
from advface.models.facenet import load_facenet, preprocess
from advface.pipelines.data import aligned_images


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=os.environ.get("ADVFACE_DATA_ROOT"))
    args = ap.parse_args()
    root = args.data_root
    train = lfw_attacker_split(root).sample(args.train, args.seed)
    test = lfw_test_split(root).sample(args.test, args.seed)
    faces = aligned_images("lfw", train.keys, data_root=root)[0]
    test_faces = aligned_images("lfw", test.keys, data_root=root)[0]
    net = load_facenet(None).eval()

    @torch.no_grad()
    def embed(a: np.ndarray) -> torch.Tensor:
        return torch.cat([net(preprocess(a[i : i + 32])) for i in range(0, len(a), 32)])

    both = np.concatenate([faces, faces[:, :, ::-1]])
    groups = np.concatenate([np.arange(len(faces))] * 2)
    t0 = time.perf_counter()
    fit = fit_ridge_decoder(embed(both), _unit(both), groups=groups, seed=args.seed)
    target = _unit(test_faces)
    mean = _unit(both).mean(0, keepdim=True).expand_as(target)
    out = {
        "train_images": len(faces),
        "test_images": len(test_faces),
        "lambda": fit.lam,
        "ssim_ridge": round(float(ssim(fit.decoder(embed(test_faces)), target).mean()), 4),
        "ssim_mean_face": round(float(ssim(mean, target).mean()), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
