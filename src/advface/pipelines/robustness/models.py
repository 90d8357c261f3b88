"""The bench's trained networks: the server's (S, D) and every attacker's, cached by key.

Roles and data (:mod:`advface.data.splits`):

- server: shadow S (ResRec, clean features) and generator D (EmbDec, embeddings) on CelebA's
  server half (its people cannot be checked against the attackers' or the test people:
  CelebA's ids are anonymous);
- attackers, on LFW people outside the test folds and outside CFP (checked by name): the
  paper's attacker R
  (ResRec, clean features; also the attacker's own shadow), the embedding decoder F (EmbDec on
  Psi(E(x)): the embedding floor; also the attacker's own generator), and one adaptive ResRec
  per (protection, knowledge) trained on protected features.

Every attacker trains on the same images with the same flip setting, epochs and time budget
(:func:`check_same_training` refuses anything else): an adaptive attacker protects the
mirrored images too, as an attacker augmenting its own public faces can.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from advface.data.splits import IdentitySplit
from advface.pipelines.context import EVAL_CODE as SHARED_EVAL_CODE
from advface.pipelines.context import (  # noqa: F401 (re-exported for the bench's run)
    PROTECTION_CODE,
    TRAIN_CODE,
    RunContext,
    code_fingerprint,
)
from advface.pipelines.decoders import train_cached

#: Code of the bench's evaluation stages: the shared parts and the bench's own computing
#: modules (not its report, whose wording changes nothing computed).
EVAL_CODE = (
    *SHARED_EVAL_CODE,
    *(f"pipelines/robustness/{m}.py" for m in ("run", "models", "metrics", "profiles")),
)
#: Training-record fields that must agree between every attacker of a run.
SAME_FOR_ATTACKERS = (
    "train_set",
    "n_train",
    "data_sha256",
    "flip",
    "epochs_setting",
    "max_minutes",
)


def is_attacker(role: str) -> bool:
    """Attacker networks (the server's own are ``server-*``)."""
    return role.startswith(("attacker-", "adaptive-"))


def check_same_training(training: dict[str, dict], role: str, record: dict) -> None:
    """Raise ``ValueError`` if attacker ``role`` would train on other images or with another
    flip setting, epoch count or time budget than the attackers recorded in ``training``."""
    if not is_attacker(role):
        return
    for other, rec in training.items():
        if not is_attacker(other) or other == role:
            continue
        diff = [k for k in SAME_FOR_ATTACKERS if rec.get(k) != record.get(k)]
        if diff:
            raise ValueError(
                f"attacker {role} would train unlike {other} ({', '.join(diff)}): every bench "
                "attacker must train on the same images with the same settings"
            )


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
    """Train, resume or load one decoder (:func:`advface.pipelines.decoders.train_cached`) and
    record it; returns ``(model in eval mode, its cache key)``. An adaptive attacker's ``code``
    adds :data:`PROTECTION_CODE` and its ``depends`` the keys of the networks its protection
    uses. Every network of the run flips (or not) as the profile says; an attacker that
    would train unlike the others raises before training (:func:`check_same_training`)."""
    p = ctx.profile
    same = {
        "train_set": split.name,
        "n_train": len(split),
        "data_sha256": hashlib.sha256("\n".join(split.keys).encode()).hexdigest()[:16],
        "flip": p.flip,
        "epochs_setting": p.epochs,
        "max_minutes": p.max_minutes,
    }
    check_same_training(ctx.training, role, same)
    model, config, ckpt_name = train_cached(
        ctx,
        role,
        arch,
        split,
        lambda: ctx.images(split),
        features=features,
        feature_fn=feature_fn,
        depends=depends or {},
        code=code,
        epochs=p.epochs,
        # With flips, MemoFeatures.fill protects each image and its mirror image before the
        # clock starts, so an adaptive attacker sees the same augmented data as the others.
        flip=p.flip,
        meta={
            "role": role,
            "train_set": split.name,
            "features": features,
            "identity_check": split.notes.get("identity_check"),
        },
    )
    history = config.get("history", [])
    ctx.training[role] = {
        **same,
        "arch": arch,
        "features": features,
        "epochs": config.get("epochs"),
        "partial_epoch": config.get("partial_epoch"),
        "loss_curve": [round(h["l1"], 5) for h in history],
        "seconds": round(sum(h["seconds"] for h in history), 1),
        "budget_seconds": round(sum(h.get("budget_seconds", h["seconds"]) for h in history), 1),
        "identity_overlap_with_test": (config.get("identity_check") or {}).get("overlap"),
        "identity_check": config.get("identity_check"),
        "key": ckpt_name,
    }
    return model, ckpt_name


def embedding_features(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """feature_fn of an embedding decoder: z -> Psi(z)."""

    def fn(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return head(z)

    return fn
