"""``advface train-protection``: the networks embedding-shadow uses by default.

Trains the server's shadow S (ResRec) and generator D (EmbDec) of the CPU profile on CelebA's
server half (identity-disjoint from CelebA's attacker half and from every test set by source),
stores them in float16 as recon checkpoints, and writes ``manifest.json`` with the training data,
settings, loss curves, the FaceNet fingerprint, file hashes and a check of the result: the mean
cosine between Psi(protected) and the clean embedding on LFW test faces (folds 1-5).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advface.protection.embedding_shadow import default_weights_dir


def _train(images: np.ndarray, enc, arch: str, feature_fn, epochs: int, seed: int, progress):
    from advface.attacks.train import TrainSettings, train_recon
    from advface.models.recon import profile_config

    res = train_recon(
        images,
        enc,
        arch=arch,
        cfg=profile_config(arch, "cpu"),
        settings=TrainSettings(epochs=epochs, batch_size=32, lr=1e-3, seed=seed, progress=progress),
        feature_fn=feature_fn,
    )
    return res


def _check(out: Path, root: Path, n: int, seed: int) -> dict[str, float]:
    from advface.data.splits import lfw_test_split
    from advface.models.facenet import load_facenet, preprocess
    from advface.models.split import split_facenet
    from advface.pipelines.data import aligned_images
    from advface.protection import build_protection

    enc, head = split_facenet(load_facenet().eval())
    test = lfw_test_split(root).sample(n, seed)
    images = aligned_images("lfw", test.keys, data_root=root, progress=False)[0]
    prot = build_protection(
        "embedding-shadow",
        generator=out / "generator",
        shadow=out / "shadow",
        extractor=enc,
        head=head,
    )
    with torch.no_grad():
        z = enc(preprocess(images))
        e = head(z)
    zp = prot.protect(z)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(head(zp), e)
    return {
        "lfw_test_faces": n,
        "identity_cosine_mean": round(float(cos.mean()), 4),
        "identity_cosine_min": round(float(cos.min()), 4),
    }


def _save_networks(tmp: Path, nets: dict[str, tuple[str, Any]], train_set: str) -> dict:
    """Write each trained network in float16 under ``tmp/ROLE``; returns their manifest
    entries (architecture, epochs, loss curve, sha256)."""
    from advface.fileio import sha256_file
    from advface.models.recon import profile_config, save_checkpoint

    out = {}
    for role, (arch, res) in nets.items():
        save_checkpoint(
            tmp / role,
            res.model.half(),
            arch,
            profile_config(arch, "cpu"),
            train_set=train_set,
            role=role,
            history=res.history,
            epochs=res.epochs_done,
        )
        out[role] = {
            "arch": arch,
            "cfg": profile_config(arch, "cpu"),
            "epochs": res.epochs_done,
            "l1_per_epoch": [round(h["l1"], 5) for h in res.history],
            "seconds": round(res.wall_s, 1),
            "sha256": sha256_file(tmp / role / "model.safetensors"),
        }
    return out


def train_default_protection(
    out: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    epochs: int = 5,
    limit: int | None = None,
    seed: int = 0,
    check_faces: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train S and D on CelebA's server half into ``out`` (which must not exist unless
    ``overwrite``: then it is replaced once the new networks are written); returns the
    manifest."""
    from advface import config
    from advface.attacks.train import MemoFeatures
    from advface.data.splits import celeba_split
    from advface.fileio import atomic_folder
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet
    from advface.pipelines.data import aligned_images
    from advface.protection.advface import fingerprint

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    root = config.data_root(data_root)
    out = Path(out) if out is not None else default_weights_dir()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    facenet = load_facenet().eval()
    for p in facenet.parameters():
        p.requires_grad_(False)
    enc, head = split_facenet(facenet)
    split = celeba_split(root, "server").sample(limit, seed)
    images = aligned_images("celeba", split.keys, data_root=root, progress=progress)[0]

    def embed(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(z)

    nets = {
        "shadow": ("resrec", _train(images, enc, "resrec", None, epochs, seed, progress)),
        "generator": (
            "embdec",
            _train(images, enc, "embdec", MemoFeatures(embed), epochs, seed, progress),
        ),
    }
    manifest: dict[str, Any] = {
        "command": f"advface train-protection --epochs {epochs}"
        + (f" --limit {limit}" if limit else ""),
        "train_set": split.name,
        "images": len(split),
        "people": len(split.people),
        "facenet_sha256": fingerprint(facenet),
        "dtype": "float16",
    }
    staging = out.with_name(out.name + ".new")
    with atomic_folder(staging) as tmp:
        manifest["networks"] = _save_networks(tmp, nets, split.name)
        manifest["check"] = _check(tmp, root, check_faces, seed)
        manifest["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return manifest
