"""The bench's trained networks: the server's (S, D) and every attacker's, cached by key.

Roles and data (identity-disjoint, :mod:`advface.data.splits`):

- server: shadow S (ResRec, clean features) and generator D (EmbDec, embeddings) on CelebA's
  server half;
- attackers, on LFW people outside the test folds and outside CFP: the paper's attacker R
  (ResRec, clean features; also the attacker's own shadow), the embedding decoder F (EmbDec on
  Psi(E(x)): the embedding floor; also the attacker's own generator), and one adaptive ResRec
  per (protection, knowledge) trained on protected features.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from advface.attacks.train import MemoFeatures
from advface.data.splits import IdentitySplit
from advface.pipelines.context import EVAL_CODE as SHARED_EVAL_CODE
from advface.pipelines.context import (  # noqa: F401 (re-exported for the bench's run)
    PROTECTION_CODE,
    TRAIN_CODE,
    RunContext,
    code_fingerprint,
)
from advface.pipelines.robustness.profiles import BenchProfile

#: Code of the bench's evaluation stages (the shared parts and the bench's own).
EVAL_CODE = (*SHARED_EVAL_CODE, "pipelines/robustness")


@dataclass
class BenchContext(RunContext):
    """The bench's context: FaceNet's fingerprint (in every key) and the training records."""

    training: dict[str, dict] = field(default_factory=dict)
    protections: dict[str, dict] = field(default_factory=dict)
    tag: ClassVar[str] = "bench"

    def images(self, split: IdentitySplit) -> np.ndarray:
        from advface.pipelines.data import aligned_images

        return aligned_images(
            split.dataset,
            split.keys,
            data_root=self.root,
            cache=self.data_cache,
            progress=self.progress,
        )[0]


def recon_cfg(p: BenchProfile, arch: str) -> dict:
    from advface.models.recon import profile_config

    cfg = profile_config(arch, p.recon)
    if p.width is not None:
        cfg["width"] = p.width
    return cfg


def train_model(
    ctx: BenchContext,
    role: str,
    arch: str,
    split: IdentitySplit,
    *,
    features: str = "clean",
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    depends: dict | None = None,
    code: tuple[str, ...] = TRAIN_CODE,
) -> tuple[nn.Module, str]:
    """Train (or load) one decoder; returns ``(model in eval mode, its cache key)``.

    The key covers the architecture, data (keys), features (and the ``depends`` keys of the
    models a protection uses), every training setting, the FaceNet weights and the ``code``
    it runs (an adaptive attacker adds :data:`PROTECTION_CODE`)."""
    from advface.attacks.train import TrainSettings, train_recon
    from advface.models.recon import load_checkpoint, read_config

    p = ctx.profile
    settings = dict(
        role=role,
        arch=arch,
        cfg=recon_cfg(p, arch),
        data=hashlib.sha256("\n".join(split.keys).encode()).hexdigest()[:16],
        n=len(split),
        features=features,
        depends=depends or {},
        epochs=p.epochs,
        max_minutes=p.max_minutes,
        batch=p.train_batch,
        lr=p.lr,
        seed=p.seed,
        weights=ctx.weights_sha,
        code=code_fingerprint(code),
    )
    ckpt = ctx.stages.path(f"model-{role}", settings, "")
    cfg_path = ckpt / "config.json"
    done = cfg_path.exists() and read_config(ckpt).get("done")
    if not done:
        ctx.log(f"training {role} ({arch}, {features}) on {len(split)} images of {split.name}")
        t0 = time.perf_counter()
        images = ctx.images(split)
        # Adaptive attackers: one protected feature per image, as a stolen database holds
        # (flips would double the protection cost). Embedding decoders flip.
        flip = feature_fn is None or features == "embedding"
        if isinstance(feature_fn, MemoFeatures):
            # Features first, so that a training time budget buys training, not protection.
            ctx.timings[f"features {role}"] = round(
                feature_fn.fill(
                    images,
                    ctx.encoder,
                    device=ctx.device,
                    batch_size=p.protect_batch,
                    flips=flip,
                    progress=ctx.progress,
                    desc=f"features {role}",
                ),
                1,
            )
        res = train_recon(
            images,
            ctx.encoder,
            arch=arch,
            cfg=settings["cfg"],
            settings=TrainSettings(
                epochs=p.epochs,
                batch_size=p.train_batch,
                lr=p.lr,
                seed=p.seed,
                device=str(ctx.device),
                progress=ctx.progress,
                flip=flip,
                max_minutes=p.max_minutes,
            ),
            out_dir=ckpt,
            resume=cfg_path.exists(),
            feature_fn=feature_fn,
            meta={
                "role": role,
                "train_set": split.name,
                "features": features,
                "identity_check": split.notes.get("identity_check"),
            },
        )
        _mark_done(ckpt)
        ctx.timings[f"train {role}"] = round(time.perf_counter() - t0, 1)
        if res.stopped_early:  # the time budget ran out: the model is what that budget buys
            ctx.log(f"{role}: time budget reached after {res.epochs_done} epoch(s)")
    model, config = load_checkpoint(ckpt, device=ctx.device)
    ctx.training[role] = {
        "arch": arch,
        "features": features,
        "train_set": split.name,
        "n_train": len(split),
        "epochs": config.get("epochs"),
        "partial_epoch": config.get("partial_epoch"),
        "loss_curve": [round(h["l1"], 5) for h in config.get("history", [])],
        "seconds": round(sum(h["seconds"] for h in config.get("history", [])), 1),
        "identity_overlap_with_test": (config.get("identity_check") or {}).get("overlap"),
        "identity_check": config.get("identity_check"),
        "key": ckpt.name,
    }
    return model.eval(), ckpt.name


def _mark_done(ckpt: Path) -> None:
    """Record that training finished (or used its whole time budget): a run killed mid-way
    leaves a checkpoint without the mark, and the next run resumes it."""
    import json

    from advface.models.recon.checkpoint import atomic_write_bytes

    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config["done"] = True
    atomic_write_bytes(path, json.dumps(config, indent=2).encode())


def embedding_features(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """feature_fn of an embedding decoder: z -> Psi(z)."""

    def fn(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(z)

    return fn
