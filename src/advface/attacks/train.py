"""Training reconstruction networks R on (x, E(x)) pairs with the L1 loss (paper eqs. 1 and 3).

E is frozen; its features are computed on the fly (E is three convolutions, far cheaper than
the decoder, and caching 64x77x77 floats would take 1.5 MB per image). ``feature_fn`` maps
E's features before the decoder sees them, so an adaptive attacker can train on protected
features. Training is resumable: after every epoch the model, Adam's state and the progress
are written atomically to the output directory.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from advface.models.facenet import unit_to_facenet  # noqa: F401 (re-exported: older imports)
from advface.models.recon import build_recon, load_checkpoint, read_config, save_checkpoint
from advface.models.recon.checkpoint import atomic_save_tensors

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
OPTIMIZER_FILE = "optimizer.safetensors"


class MemoFeatures:
    """Wrap a ``feature_fn`` so each distinct feature map is protected once, however many epochs
    see it: an adaptive attacker's training set is a fixed set of protected features, as it
    would be on disk (and re-running AdvFace every epoch would multiply its cost). Maps are
    held in memory as float16 (0.76 MB each for 64x77x77)."""

    def __init__(self, fn: FeatureFn) -> None:
        self.fn = fn
        self.memo: dict[bytes, torch.Tensor] = {}

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        # Keyed on fp16-rounded values: E's output for the same image can differ in the last
        # float32 bits between batch compositions (different conv blocking). A strided 1/16 of
        # each map is hashed, moved in one transfer: hashing whole maps made the memo the
        # bottleneck of GPU training (4 ms per sample); two faces never share the sample.
        sample = z.detach()[..., ::4, ::4].half().cpu().numpy()
        keys = [hashlib.sha1(zi.tobytes()).digest() for zi in sample]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            out = self.fn(z[todo])
            for i, zi in zip(todo, out, strict=True):
                self.memo[keys[i]] = zi.to(torch.float16).cpu()
        return torch.stack([self.memo[k] for k in keys]).to(z.device, z.dtype)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N,H,W,3) -> float32 (N,3,H,W) in [0,1] (the reconstruction target)."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N,H,W,3), got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div(255.0)


@dataclass
class TrainSettings:
    """Hyper-parameters of one training run (defaults: the paper's Adam, lr 1e-4)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    flip: bool = True  # horizontal flips of x (E is convolutional, so E(flip x) is recomputed)
    max_minutes: float | None = None  # stop (and checkpoint) after this wall time
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class TrainResult:
    model: nn.Module
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    wall_s: float = 0.0


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.reshape(-1) if t.ndim == 0 else t
    atomic_save_tensors(tensors, path)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    flat = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    # Drop a last batch of one: BatchNorm cannot normalise a single sample in training mode.
    return [b for b in order.split(batch_size) if len(b) > 1]


def train_recon(
    images: np.ndarray,
    extractor: nn.Module,
    *,
    arch: str,
    cfg: dict[str, Any] | None = None,
    settings: TrainSettings | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    feature_fn: FeatureFn | None = None,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``build_recon(arch, **cfg)`` to invert ``extractor`` on uint8 faces (N,160,160,3).

    Loss: mean absolute error between x in [0,1] and R(feature_fn(E(x))) (eq. 1 up to a constant).
    With ``out_dir`` a checkpoint (weights + config with ``meta``, ``epochs``, ``seed``,
    ``history``) and Adam's state are saved after every epoch; ``resume=True`` continues from
    the epoch count recorded there. ``meta`` should name ``train_set`` and ``features``.
    """
    s = settings or TrainSettings()
    cfg = dict(cfg or {})
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 training images, got {len(images)}")
    device = torch.device(s.device)
    out = Path(out_dir) if out_dir is not None else None
    prev: dict[str, Any] | None = None
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir")
        prev = read_config(out)
        if prev["arch"] != arch:
            raise ValueError(f"{out} holds a {prev['arch']} checkpoint, not {arch}")
        cfg = dict(prev["cfg"])  # the checkpoint's shape wins over the caller's cfg
    torch.manual_seed(s.seed)  # weight initialisation
    model = build_recon(arch, **cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    extractor = extractor.to(device).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)

    start_epoch, history = 0, []
    if prev is not None and out is not None:
        loaded, _ = load_checkpoint(out, device)
        model.load_state_dict(loaded.state_dict())
        if (out / OPTIMIZER_FILE).is_file():
            _load_optimizer(opt, out / OPTIMIZER_FILE)
        start_epoch, history = int(prev.get("epochs", 0)), list(prev.get("history", []))
        # A partial epoch (time limit) is redone from its start: drop its history entry.
        history = [h for h in history if h["epoch"] <= start_epoch]

    def checkpoint(epochs_done: int, partial: bool) -> None:
        if out is None:
            return
        save_checkpoint(
            out,
            model,
            arch,
            cfg,
            **(meta or {}),
            epochs=epochs_done,
            epochs_target=s.epochs,
            partial_epoch=partial,
            seed=s.seed,
            lr=s.lr,
            batch_size=s.batch_size,
            flip=s.flip,
            n_train=len(images),
            history=history,
        )
        _save_optimizer(opt, out / OPTIMIZER_FILE)

    t_start = time.perf_counter()
    deadline = t_start + 60 * s.max_minutes if s.max_minutes else None
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch, s.epochs):
        # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        batches = _batches(len(images), s.batch_size, gen)
        model.train()
        total, count, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not s.progress)
        for idx in bar:
            x = to_unit(images[np.sort(idx.numpy())]).to(device)
            if s.flip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
            with torch.no_grad():
                z = extractor(unit_to_facenet(x))
                if feature_fn is not None:
                    z = feature_fn(z).detach()
            loss = (model(z) - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
            count += len(x)
            bar.set_postfix(l1=f"{total / count:.4f}")
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
        history.append(
            {
                "epoch": epoch + 1,
                "l1": total / max(count, 1),
                "images": count,
                "seconds": time.perf_counter() - t0,
            }
        )
        if stopped:
            # Weights include a partial epoch; a resume restarts this epoch from its beginning.
            checkpoint(epoch, partial=True)
            break
        checkpoint(epoch + 1, partial=False)
    done = epoch if stopped else s.epochs
    return TrainResult(model.eval(), done, history, stopped, time.perf_counter() - t_start)
