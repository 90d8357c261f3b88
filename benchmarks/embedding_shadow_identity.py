"""How well embedding-shadow keeps the identity per ``identity_every`` setting.

Usage: python benchmarks/embedding_shadow_identity.py [K ...]   (default: 1 2 3)

Protects 32 seeded LFW test faces (folds 1-5, ``lfw_test_split(...).sample(32, 0)``) with the
networks of ``advface train-protection`` and prints, per K, the mean cosine between
Psi(protected feature) and the clean embedding, and the wall seconds per face (batch 16, 2
threads; only comparable on an idle machine). Needs ADVFACE_DATA_ROOT.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from advface.data.splits import lfw_test_split
from advface.models.facenet import load_facenet, preprocess
from advface.models.split import split_facenet
from advface.pipelines.data import aligned_images
from advface.protection import build_protection


def main(ks: list[int]) -> None:
    torch.set_num_threads(2)
    root = os.environ["ADVFACE_DATA_ROOT"]
    split = lfw_test_split(root).sample(32, 0)
    images = aligned_images("lfw", split.keys, data_root=root, progress=False)[0]
    enc, head = split_facenet(load_facenet().eval())
    with torch.no_grad():
        z = enc(preprocess(images))
        e = head(z)
    out = {}
    for k in ks:
        prot = build_protection(
            "embedding-shadow", extractor=enc, head=head, identity_every=k, seed=0
        )
        t0 = time.perf_counter()
        zp = torch.cat([prot.protect(z[s : s + 16]) for s in range(0, len(z), 16)])
        seconds = (time.perf_counter() - t0) / len(z)
        with torch.no_grad():
            cos = F.cosine_similarity(head(zp), e).mean().item()
        out[f"identity_every={k}"] = {"mean_cos": round(cos, 4), "s_per_face": round(seconds, 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 2, 3])
