"""Cached decoder training shared by ``reproduce`` and ``bench``.

One checkpoint folder per key (the caller's key: architecture, data, features, settings,
weights, code). An interrupted training resumes from its last epoch; a time budget counts the
minutes a checkpoint already spent, so a resumed run trains only for what is left; protected
features are computed before the clock starts (:class:`~advface.attacks.train.MemoFeatures`),
in cached chunks, so an interrupted computation resumes too.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advface.attacks.train import FeatureFn, MemoFeatures, TrainSettings
from advface.data.prepare import source_fingerprint
from advface.data.splits import IdentitySplit
from advface.pipelines.context import RunContext, code_fingerprint


def recon_cfg(profile: Any, arch: str) -> dict:
    """Decoder shape: the profile's recon profile for ``arch``, its ``width`` override applied."""
    from advface.models.recon import profile_config

    cfg = profile_config(arch, profile.recon)
    if profile.width is not None:
        cfg["width"] = profile.width
    return cfg


def spent_minutes(config: dict) -> float:
    """Budget minutes (:func:`~advface.attacks.train.budget_clock`; wall time in checkpoints
    that predate it) of the complete epochs a checkpoint holds (a resume redoes a partial
    epoch, so its time is not counted)."""
    done = int(config.get("epochs", 0))
    history = [h for h in config.get("history", []) if h["epoch"] <= done]
    return sum(h.get("budget_seconds", h["seconds"]) for h in history) / 60


def _decoder_key(
    ctx: RunContext,
    name: str,
    arch: str,
    split: IdentitySplit,
    *,
    features: str,
    depends: dict,
    code: tuple[str, ...],
    epochs: int,
    flip: bool,
) -> dict[str, Any]:
    """Everything a decoder's checkpoint depends on (see :func:`train_cached`)."""
    p = ctx.profile
    return dict(
        name=name,
        arch=arch,
        cfg=recon_cfg(p, arch),
        data=hashlib.sha256("\n".join(split.keys).encode()).hexdigest()[:16],
        # What the faces are made from: a source image replaced under its name retrains.
        faces=source_fingerprint(split.dataset, split.keys, data_root=ctx.root),
        n=len(split),
        features=features,
        depends=depends,
        epochs=epochs,
        max_minutes=p.max_minutes,
        batch=p.train_batch,
        lr=p.lr,
        seed=p.seed,
        flip=flip,
        weights=ctx.weights_sha,
        code=code_fingerprint(code),
    )


def _train(
    ctx: RunContext,
    name: str,
    key: dict[str, Any],
    ckpt: Path,
    images: Callable[[], np.ndarray],
    *,
    feature_fn: FeatureFn | MemoFeatures | None,
    resume: bool,
    max_minutes: float | None,
    meta: dict[str, Any],
) -> None:
    """Load the faces, fill ``feature_fn``'s memo, then train (or resume) ``ckpt``."""
    from advface.attacks.train import train_recon

    p = ctx.profile
    t0 = time.perf_counter()
    faces = images()
    drop_features = None
    if isinstance(feature_fn, MemoFeatures):
        # Features first, so that a time budget buys training, not protection.
        f0 = time.perf_counter()
        drop_features = _fill_memo(ctx, name, key, feature_fn, faces)
        ctx.timings[f"features {name}"] = round(time.perf_counter() - f0, 1)
    settings = TrainSettings(
        epochs=key["epochs"],
        batch_size=p.train_batch,
        lr=p.lr,
        seed=p.seed,
        device=str(ctx.device),
        progress=ctx.progress,
        flip=key["flip"],
        max_minutes=max_minutes,
    )
    res = train_recon(
        faces,
        ctx.encoder,
        arch=key["arch"],
        cfg=key["cfg"],
        settings=settings,
        out_dir=ckpt,
        resume=resume,
        feature_fn=feature_fn,
        meta=meta,
    )
    ctx.timings[f"train {name}"] = round(time.perf_counter() - t0, 1)
    if drop_features is not None:  # trained: the features are not needed again
        drop_features()
    if res.stopped_early:  # the time budget ran out: the model is what that budget buys
        ctx.log(f"{name}: time budget reached after {res.epochs_done} epoch(s)")


def _fill_memo(
    ctx: RunContext, name: str, key: dict[str, Any], memo: MemoFeatures, faces: np.ndarray
) -> Callable[[], None]:
    """Fill ``memo`` with every image's features (and, with flips, its mirror image's) as a
    chunked stage under the decoder's key: protecting an adaptive attacker's training set
    takes minutes to hours, and an interrupted fill resumes at its first unfinished chunk. A
    chunk is a whole number of protection batches, so every batch holds the same images as one
    fill of all the faces would. Returns what removes the chunks' files (0.76 MB per image and
    flip in float16) once the decoder has trained."""
    p = ctx.profile
    size = p.protect_batch * max(1, getattr(p, "chunk", 256) // p.protect_batch)
    ids = [str(i) for i in range(len(faces))]  # the faces themselves are in the decoder's key

    def compute(sl: slice) -> dict[str, np.ndarray]:
        part = MemoFeatures(memo.fn)
        part.fill(
            faces[sl],
            ctx.encoder,
            device=ctx.device,
            batch_size=p.protect_batch,
            flips=key["flip"],
            progress=ctx.progress,
            desc=f"features {name} [{sl.start}:]",
        )
        keys = sorted(part.memo)
        rows = np.array([[i + sl.start, int(f)] for i, f in keys], dtype=np.int64)
        return {"rows": rows, "features": torch.stack([part.memo[k] for k in keys]).cpu().numpy()}

    stage = f"features-{name}"
    arr = ctx.stages.chunked(stage, key, ids, size, compute)
    memo.put(
        [(int(i), bool(f)) for i, f in arr["rows"]],
        torch.from_numpy(arr["features"]).to(ctx.device),
    )
    return lambda: ctx.stages.drop_chunked(stage, key, ids, size)


def train_cached(
    ctx: RunContext,
    name: str,
    arch: str,
    split: IdentitySplit,
    images: Callable[[], np.ndarray],
    *,
    features: str,
    feature_fn: FeatureFn | MemoFeatures | None,
    depends: dict,
    code: tuple[str, ...],
    epochs: int,
    flip: bool,
    meta: dict[str, Any],
) -> tuple[nn.Module, dict, str]:
    """Train, resume or load one decoder of ``ctx.profile``'s shape and settings.

    Its key covers the architecture, the data (``split``'s keys and their source images:
    :func:`~advface.data.prepare.source_fingerprint`), the features (and ``depends``: the keys
    of the networks a protection's features depend on), every training setting, FaceNet's
    weights and the ``code`` run. ``images()`` loads the training faces (only when training is
    needed); the profile's ``max_minutes`` is the whole time budget (what a checkpoint spent
    is taken off). Returns ``(model in eval mode, checkpoint config, checkpoint folder
    name)``."""
    from advface.models.recon import load_checkpoint, read_config

    p = ctx.profile
    key = _decoder_key(
        ctx,
        name,
        arch,
        split,
        features=features,
        depends=depends,
        code=code,
        epochs=epochs,
        flip=flip,
    )
    ckpt = ctx.stages.path(f"model-{name}", key, "")
    started = (ckpt / "config.json").exists()
    config = read_config(ckpt) if started else {}
    left = None if p.max_minutes is None else p.max_minutes - spent_minutes(config)
    if not config.get("done") and (left is None or left > 0):
        ctx.log(f"training {name} ({arch}, {features}) on {len(split)} images of {split.name}")
        _train(
            ctx,
            name,
            key,
            ckpt,
            images,
            feature_fn=feature_fn,
            resume=started,
            max_minutes=left,
            meta=meta,
        )
    if not config.get("done"):
        mark_done(ckpt)  # finished, or its time budget is spent
    model, config = load_checkpoint(ckpt, device=ctx.device)
    return model.eval(), config, ckpt.name


def mark_done(ckpt: Path) -> None:
    """Record that training finished (or used its whole time budget): a run killed mid-way
    leaves a checkpoint without the mark, and the next run resumes it."""
    from advface.models.recon.checkpoint import atomic_write_bytes

    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    config["done"] = True
    atomic_write_bytes(path, json.dumps(config, indent=2).encode())
