"""Training reconstruction networks R on (x, E(x)) pairs with the L1 loss (paper eqs. 1 and 3).

E is frozen; clean features are computed on the fly (E is three convolutions, far cheaper
than the decoder, and caching 64x77x77 floats would take 1.5 MB per image). ``feature_fn``
maps E's features before the decoder sees them, so an adaptive attacker can train on protected
features; a :class:`MemoFeatures` computes each training image's once. Training is resumable:
after every epoch the model, Adam's state and the progress are written atomically to the
output directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from advface.checks import check_finite_number, check_int
from advface.models.facenet import unit_to_facenet  # noqa: F401 (re-exported: older imports)
from advface.models.recon import build_recon, load_checkpoint, read_config, save_checkpoint
from advface.models.recon.checkpoint import atomic_save_tensors

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
OPTIMIZER_FILE = "optimizer.safetensors"


class MemoFeatures:
    """``fn``'s output for each training image, computed once and reused by every epoch: an
    adaptive attacker's training set is a fixed set of protected features, as a stolen database
    holds (re-running AdvFace every epoch would multiply its cost).

    Entries are keyed by the image's position in the training array and whether it was flipped,
    never by feature values: E's output for one image differs in its last bits between batch
    sizes and kernels (on a GPU almost always), so a value key misses and protects again. One
    memo therefore serves one training array. Entries are held as float16 on ``fn``'s output
    device (0.76 MB per 64x77x77 map)."""

    def __init__(self, fn: FeatureFn) -> None:
        self.fn = fn
        self.memo: dict[tuple[int, bool], torch.Tensor] = {}
        self.fn_calls = 0  # batches that reached fn (misses)

    def __len__(self) -> int:
        return len(self.memo)

    def lookup(
        self,
        keys: Sequence[tuple[int, bool]],
        features: Callable[[list[int]], torch.Tensor],
    ) -> torch.Tensor:
        """Mapped features for ``keys`` ((index, flipped) per row); ``features(rows)`` gives
        E's features of the batch rows that are not held yet (only those are computed)."""
        keys = [(int(i), bool(f)) for i, f in keys]
        todo = [r for r, k in enumerate(keys) if k not in self.memo]
        if todo:
            self.fn_calls += 1
            out = self.fn(features(todo))
            if out.shape[0] != len(todo):
                raise ValueError(f"feature_fn returned {out.shape[0]} rows for {len(todo)}")
            for r, o in zip(todo, out, strict=True):
                self.memo[keys[r]] = o.detach().to(torch.float16)
        return torch.stack([self.memo[k] for k in keys]).float()

    def put(self, keys: Sequence[tuple[int, bool]], values: torch.Tensor) -> None:
        """Hold ``values`` (one row per key) as the entries of ``keys``: a fill computed
        earlier (a chunk restored from a cache) rather than by ``fn`` now."""
        if values.shape[0] != len(keys):
            raise ValueError(f"{values.shape[0]} feature rows for {len(keys)} keys")
        for k, v in zip(keys, values, strict=True):
            self.memo[(int(k[0]), bool(k[1]))] = v.detach().to(torch.float16)

    @torch.no_grad()
    def fill(
        self,
        images: np.ndarray,
        extractor: nn.Module,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        flips: bool = False,
        progress: bool = True,
        desc: str = "features",
    ) -> float:
        """Compute every entry ``train_recon`` will ask for (each image, and its mirror image
        when training flips) before training, so that a time budget buys training, not
        protection; returns the seconds it took."""
        t0 = time.perf_counter()
        extractor = extractor.to(device).eval()
        for flipped in (False, True) if flips else (False,):
            for s in tqdm(
                range(0, len(images), batch_size),
                desc=f"{desc}{' (flipped)' if flipped else ''}",
                disable=not progress,
            ):
                x = to_unit(images[s : s + batch_size]).to(device)
                x = x.flip(-1) if flipped else x
                rows = range(s, s + len(x))
                self.lookup(
                    [(i, flipped) for i in rows],
                    lambda sel, x=x: extractor(unit_to_facenet(x[sel])),
                )
        return time.perf_counter() - t0


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
    max_minutes: float | None = None  # stop (and checkpoint) after this much budget_clock time
    progress: bool = True

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=1)
        check_int("batch_size", self.batch_size, low=2)  # BatchNorm needs two samples
        check_int("seed", self.seed, low=0)
        if check_finite_number("lr", self.lr, low=0.0) == 0.0:
            raise ValueError("lr must be > 0, got 0.0")
        minutes = self.max_minutes
        if minutes is not None and check_finite_number("max_minutes", minutes, low=0.0) == 0:
            raise ValueError("max_minutes must be > 0, got 0.0")
        for name in ("flip", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


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


def budget_clock(device: torch.device) -> Callable[[], float]:
    """The clock a training time budget counts: wall time on an accelerator; on the CPU the
    process's CPU time divided by its threads, so that other jobs on the same cores slow a
    training down without shortening what its budget buys (on an idle machine it runs a little
    slower than wall time: the single-threaded parts of a step count once)."""
    if device.type == "cpu":
        threads = max(1, torch.get_num_threads())
        return lambda: time.process_time() / threads
    return time.perf_counter


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    # Drop a last batch of one: BatchNorm cannot normalise a single sample in training mode.
    return [b for b in order.split(batch_size) if len(b) > 1]


@dataclass
class _Run:
    """One training run's moving parts (what the epoch loop and the checkpoints share)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    extractor: nn.Module
    arch: str
    cfg: dict[str, Any]
    settings: TrainSettings
    out: Path | None
    meta: dict[str, Any]
    n_train: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def checkpoint(self, epochs_done: int, partial: bool) -> None:
        if self.out is None:
            return
        s = self.settings
        save_checkpoint(
            self.out,
            self.model,
            self.arch,
            self.cfg,
            **self.meta,
            epochs=epochs_done,
            epochs_target=s.epochs,
            partial_epoch=partial,
            seed=s.seed,
            lr=s.lr,
            batch_size=s.batch_size,
            flip=s.flip,
            n_train=self.n_train,
            history=self.history,
        )
        _save_optimizer(self.opt, self.out / OPTIMIZER_FILE)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"expected a numpy array of uint8 images, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 training images, got {len(images)}")


def _previous(out: Path | None, arch: str) -> dict[str, Any]:
    """The config of the checkpoint a resumed run continues."""
    if out is None:
        raise ValueError("resume needs out_dir")
    prev = read_config(out)
    if prev["arch"] != arch:
        raise ValueError(f"{out} holds a {prev['arch']} checkpoint, not {arch}")
    return prev


def _restore(run: _Run, prev: dict[str, Any], device: torch.device) -> int:
    """Load the checkpoint's weights, Adam state and history into ``run``; the epoch to start."""
    assert run.out is not None
    loaded, _ = load_checkpoint(run.out, device)
    run.model.load_state_dict(loaded.state_dict())
    if (run.out / OPTIMIZER_FILE).is_file():
        _load_optimizer(run.opt, run.out / OPTIMIZER_FILE)
    start_epoch = int(prev.get("epochs", 0))
    # A partial epoch (time limit) is redone from its start: drop its history entry.
    run.history = [h for h in prev.get("history", []) if h["epoch"] <= start_epoch]
    return start_epoch


def _batch_features(
    run: _Run,
    x: Tensor,
    rows: np.ndarray,
    flip: Tensor,
    feature_fn: FeatureFn | MemoFeatures | None,
) -> Tensor:
    """z = feature_fn(E(x)) for one batch (from the memo when it holds them)."""
    with torch.no_grad():
        if isinstance(feature_fn, MemoFeatures):
            return feature_fn.lookup(
                list(zip(rows.tolist(), flip.tolist(), strict=True)),
                lambda sel: run.extractor(unit_to_facenet(x[sel])),
            ).to(x.device)
        z = run.extractor(unit_to_facenet(x))
        return z if feature_fn is None else feature_fn(z).detach()


def _train_epoch(
    run: _Run,
    images: np.ndarray,
    epoch: int,
    feature_fn: FeatureFn | MemoFeatures | None,
    clock: Callable[[], float],
    deadline: float | None,
) -> bool:
    """One epoch (or its part up to ``deadline``); appends its history entry, True if cut."""
    s = run.settings
    device = next(run.model.parameters()).device
    # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
    batches = _batches(len(images), s.batch_size, gen)
    run.model.train()
    total, count, t0, c0 = 0.0, 0, time.perf_counter(), clock()
    stopped = False
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{s.epochs}", disable=not s.progress)
    for idx in bar:
        rows = np.sort(idx.numpy())
        x = to_unit(images[rows]).to(device)
        flip = torch.zeros(len(x), dtype=torch.bool)
        if s.flip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
        z = _batch_features(run, x, rows, flip, feature_fn)
        loss = (run.model(z) - x).abs().mean()
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        total += loss.item() * len(x)
        count += len(x)
        bar.set_postfix(l1=f"{total / count:.4f}")
        if deadline is not None and clock() > deadline:
            stopped = True
            break
    run.history.append(
        {
            "epoch": epoch + 1,
            "l1": total / max(count, 1),
            "images": count,
            "seconds": time.perf_counter() - t0,
            "budget_seconds": clock() - c0,
        }
    )
    return stopped


def train_recon(
    images: np.ndarray,
    extractor: nn.Module,
    *,
    arch: str,
    cfg: dict[str, Any] | None = None,
    settings: TrainSettings | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    feature_fn: FeatureFn | MemoFeatures | None = None,
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
    _check_images(images)
    device = torch.device(s.device)
    out = Path(out_dir) if out_dir is not None else None
    prev = _previous(out, arch) if resume else None
    if prev is not None:
        cfg = dict(prev["cfg"])  # the checkpoint's shape wins over the caller's cfg
    torch.manual_seed(s.seed)  # weight initialisation
    model = build_recon(arch, **cfg).to(device)
    extractor = extractor.to(device).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    run = _Run(
        model=model,
        opt=torch.optim.Adam(model.parameters(), lr=s.lr),
        extractor=extractor,
        arch=arch,
        cfg=cfg,
        settings=s,
        out=out,
        meta=dict(meta or {}),
        n_train=len(images),
    )
    start_epoch = _restore(run, prev, device) if prev is not None else 0

    t_start = time.perf_counter()
    clock = budget_clock(device)
    deadline = clock() + 60 * s.max_minutes if s.max_minutes else None
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch, s.epochs):
        stopped = _train_epoch(run, images, epoch, feature_fn, clock, deadline)
        if stopped:
            # Weights include a partial epoch; a resume restarts this epoch from its beginning.
            run.checkpoint(epoch, partial=True)
            break
        run.checkpoint(epoch + 1, partial=False)
    done = epoch if stopped else s.epochs
    return TrainResult(model.eval(), done, run.history, stopped, time.perf_counter() - t_start)
