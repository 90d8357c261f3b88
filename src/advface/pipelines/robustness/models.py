"""The bench's trained networks: the server's (S, D) and every attacker's, cached by key.

Roles and data (:mod:`advface.data.splits`):

- server: shadow S (ResRec, clean features) and generator D (EmbDec, embeddings) on CelebA's
  server half (its people cannot be checked against the attackers' or the test people:
  CelebA's ids are anonymous);
- attackers, on LFW people outside the test folds and outside CFP (checked by name): the
  paper's attacker R
  (ResRec, clean features; also the attacker's own shadow), the embedding decoder F (EmbDec on
  Psi(E(x)): the embedding floor; also the attacker's own generator), the ridge decoder
  (:mod:`advface.attacks.ridge`, fit in closed form on the same embeddings: an embedding floor
  that no training budget can leave weak), and one adaptive ResRec per (protection,
  knowledge) trained on protected features.

Every attacker trains on the same images with the same flip setting, epochs and time budget
(:func:`check_same_training` refuses anything else; a closed-form fit has no epochs or budget,
so only its data is compared): an adaptive attacker protects the mirrored images too, as an
attacker augmenting its own public faces can.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from advface.data.splits import IdentitySplit
from advface.pipelines.context import EVAL_CODE as SHARED_EVAL_CODE
from advface.pipelines.context import (  # noqa: F401 (re-exported for the bench's run)
    FACENET_CODE,
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
#: Code of the ridge decoder's fit (its training embeddings are FaceNet's).
RIDGE_CODE = ("attacks/ridge.py", "checks.py", "pipelines/robustness/models.py", *FACENET_CODE)
#: Training-record fields that must agree between every attacker of a run: the data, and for
#: trained networks the schedule (a closed-form fit, ``closed_form: True``, has none).
SAME_DATA = ("train_set", "n_train", "data_sha256", "flip")
SAME_FOR_ATTACKERS = (*SAME_DATA, "epochs_setting", "max_minutes")


def is_attacker(role: str) -> bool:
    """Attacker networks (the server's own are ``server-*``)."""
    return role.startswith(("attacker-", "adaptive-"))


def check_same_training(training: dict[str, dict], role: str, record: dict) -> None:
    """Raise ``ValueError`` if attacker ``role`` would train on other images or with another
    flip setting, epoch count or time budget than the attackers recorded in ``training`` (a
    closed-form fit on either side: the images and flip setting only)."""
    if not is_attacker(role):
        return
    for other, rec in training.items():
        if not is_attacker(other) or other == role:
            continue
        closed = rec.get("closed_form") or record.get("closed_form")
        fields = SAME_DATA if closed else SAME_FOR_ATTACKERS
        diff = [k for k in fields if rec.get(k) != record.get(k)]
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


def _training_data(ctx: BenchContext, split: IdentitySplit) -> dict:
    """The :data:`SAME_DATA` fields of a training record: which images, and whether flipped."""
    return {
        "train_set": split.name,
        "n_train": len(split),
        "data_sha256": hashlib.sha256("\n".join(split.keys).encode()).hexdigest()[:16],
        "flip": ctx.profile.flip,
    }


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
    same = {**_training_data(ctx, split), "epochs_setting": p.epochs, "max_minutes": p.max_minutes}
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


def batches(n: int, size: int, desc: str, ctx: BenchContext):
    """``range(0, n, size)`` with a progress bar when the run shows them."""
    return tqdm(range(0, n, size), desc=desc, disable=not ctx.progress, unit="batch")


@torch.no_grad()
def embed_clean(ctx: BenchContext, images: np.ndarray, desc: str) -> np.ndarray:
    """FaceNet's embeddings (N,512) of uint8 faces (N,160,160,3), in batches of the profile's."""
    from advface.models.facenet import preprocess

    out = []
    bs = ctx.profile.protect_batch
    for s in batches(len(images), bs, desc, ctx):
        out.append(ctx.facenet(preprocess(images[s : s + bs]).to(ctx.device)).float().cpu())
    return torch.cat(out).numpy()


def fit_ridge(ctx: BenchContext, role: str, split: IdentitySplit) -> tuple[nn.Module, str]:
    """Fit the ridge embedding decoder on ``split`` (and, as every network of the run, the
    mirror images when the profile flips; an image and its mirror are one cross-validation
    group) and record it; returns ``(decoder, its key)``. The training embeddings are a cached
    stage; the fit itself takes seconds and is redone."""
    from advface.attacks.ridge import DEFAULT_FOLDS, DEFAULT_LAMBDAS, fit_ridge_decoder
    from advface.data.prepare import source_fingerprint

    p = ctx.profile
    same = {**_training_data(ctx, split), "closed_form": True}
    check_same_training(ctx.training, role, same)
    images = ctx.images(split)
    groups = np.arange(len(images))
    if p.flip:
        images = np.concatenate([images, images[:, :, ::-1]])
        groups = np.concatenate([groups, groups])
    settings = {
        "role": role,
        # Names and source pixels: a source image replaced under its name refits.
        "data": same["data_sha256"],
        "faces": source_fingerprint(split.dataset, split.keys, data_root=ctx.root),
        "flip": p.flip,
        "weights": ctx.weights_sha,
        "code": code_fingerprint(RIDGE_CODE),
        "lambdas": list(DEFAULT_LAMBDAS),
        "folds": DEFAULT_FOLDS,
        "seed": p.seed,
    }
    emb = ctx.stages.arrays(
        f"{role}-embeddings",
        {k: settings[k] for k in ("role", "data", "faces", "flip", "weights", "code")},
        lambda: {"emb": embed_clean(ctx, images, f"{role} embeddings")},
    )["emb"]
    t0 = time.perf_counter()
    target = torch.from_numpy(np.ascontiguousarray(images)).to(ctx.device)
    fit = fit_ridge_decoder(
        torch.from_numpy(emb).to(ctx.device),
        target.permute(0, 3, 1, 2).float().div(255),
        groups=groups,
        lambdas=DEFAULT_LAMBDAS,
        folds=settings["folds"],
        seed=p.seed,
    )
    seconds = round(time.perf_counter() - t0, 1)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    ctx.training[role] = {
        **same,
        "arch": "ridge",
        "features": "embedding",
        "epochs": "closed form",
        "lambda": fit.lam,
        "folds": settings["folds"],
        "cv_mse": {f"{k:g}": round(v, 6) for k, v in fit.cv_mse.items()},
        "loss_curve": [],
        "seconds": seconds,
        "budget_seconds": seconds,
        "identity_overlap_with_test": (split.notes.get("identity_check") or {}).get("overlap"),
        "identity_check": split.notes.get("identity_check"),
        "key": f"{role}-{key}",
    }
    return fit.decoder.eval(), f"{role}-{key}"
