"""Offline mode (paper Sec. 4.4): a server head Psi' retrained for protected features.

Label-free distillation: the student Psi' (initialised from the teacher Psi) learns
``Psi'(protect(z)) ~ Psi(z)`` and, with ``clean_weight > 0``, ``Psi'(z) ~ Psi(z)`` (the service
embeds fresh probes with the same Psi'), where ``z = E(x)`` for server-side images. The paper
retrains Psi with labels; no labels are needed here.

- :func:`distill_head`: the training loop on given images or feature maps. Features are
  computed once (E, the protection, the frozen prefix of Psi) in chunks, then only the tail of
  the student trains; both stages are resumable from ``work_dir``.
- :func:`run_distill`: ``advface distill``: CelebA's server half (identity-disjoint from
  LFW/CFP by name), the protection of a spec, a saved student.
- :func:`offline_accuracy`: verification with the student beside the teacher (Table 2's
  offline row).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from advface.models.distill import (
    head_parts,
    load_student,
    make_student,
    save_student,
    state_fingerprint,
)

LOSSES = ("cosine", "mse")


@dataclass(frozen=True)
class DistillSettings:
    """Training settings. ``time_budget_s`` counts the decoders' budget clock
    (:func:`advface.attacks.train.budget_clock`: CPU time per thread on the CPU, wall time on an
    accelerator), feature pass included and across resumes (the time of every checkpointed
    epoch), and stops training at the first step past it (at least one step is taken)."""

    epochs: int = 20
    lr: float = 1e-4
    batch_size: int = 32
    train_from: str = "repeat_3"
    loss: str = "cosine"
    clean_weight: float = 1.0
    time_budget_s: float | None = None
    seed: int = 0
    feature_batch: int = 16

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "feature_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not (math.isfinite(self.clean_weight) and self.clean_weight >= 0):
            raise ValueError(f"clean_weight must be >= 0, got {self.clean_weight!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 (or None), got {self.time_budget_s!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def distill_loss(student: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: mean 1 - cos; ``mse``: mean squared error of the L2-normalised embeddings."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, target, dim=1)).mean()
    if kind == "mse":
        return F.mse_loss(F.normalize(student, dim=1), F.normalize(target, dim=1))
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")


def _protection_record(protection: Any) -> dict[str, Any]:
    params = getattr(protection, "params", None)
    rec = params() if callable(params) else {"name": getattr(protection, "name", "custom")}
    return json.loads(json.dumps(rec, default=str))


def _run_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# -------------------------------------------------------------------------- features


def _feature_chunks(
    source: np.ndarray | torch.Tensor,
    extractor: nn.Module | None,
    prefix: nn.Module,
    teacher_tail: nn.Module,
    protect: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch: int,
    work_dir: Path | None,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """For each chunk of ``batch`` inputs: prefix(z), prefix(protect(z)) and the teacher's
    target Psi(z); each chunk is saved under ``work_dir/features`` and reused on a rerun."""
    from safetensors.torch import load_file

    from advface.models.facenet import preprocess
    from advface.models.recon.checkpoint import atomic_save_tensors

    out: dict[str, list[torch.Tensor]] = {"clean": [], "prot": [], "target": []}
    folder = work_dir / "features" if work_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    # E and the protection run on E's device; the student's tail trains on the CPU copies.
    device = next(extractor.parameters()).device if extractor is not None else None
    starts = range(0, len(source), batch)
    for i, s in enumerate(tqdm(starts, desc="features", disable=not progress, unit="chunk")):
        path = folder / f"chunk-{i:05d}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            got = load_file(str(path))
        else:
            with torch.no_grad():
                if isinstance(source, np.ndarray):
                    assert extractor is not None
                    z = extractor(preprocess(source[s : s + batch]).to(device))
                else:
                    z = source[s : s + batch].float()
            zp = protect(z).cpu()  # a protection may need gradients inside
            z = z.cpu()
            with torch.no_grad():
                h = prefix(z)
                got = {"clean": h, "prot": prefix(zp), "target": teacher_tail(h)}
            if path is not None:
                atomic_save_tensors(got, path)
        for k in out:
            out[k].append(got[k])
    return {k: torch.cat(v) for k, v in out.items()}


# -------------------------------------------------------------------------- training


def _check_inputs(images, features, extractor) -> int:
    if (images is None) == (features is None):
        raise ValueError("give either images (with an extractor) or feature maps, not both")
    if images is not None:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("images must be uint8 (N,160,160,3)")
        if extractor is None:
            raise ValueError("images need the extractor E that computes their feature maps")
        n = len(images)
    else:
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            raise ValueError("features must be a 4-D tensor (N,C,H,W) of E's feature maps")
        n = len(features)
    if n < 1:
        raise ValueError("need at least one training image")
    return n


def _epoch(parts, data, opt, settings, gen, over, bar) -> tuple[dict[str, float], bool]:
    n = len(data["target"])
    order = torch.randperm(n, generator=gen)
    sums, count, stopped = {"protected": 0.0, "clean": 0.0}, 0, False
    for s in range(0, n, settings.batch_size):
        idx = order[s : s + settings.batch_size]
        target = data["target"][idx]
        loss_p = distill_loss(parts.tail(data["prot"][idx]), target, settings.loss)
        loss = loss_p
        loss_c = torch.zeros(())
        if settings.clean_weight > 0:
            loss_c = distill_loss(parts.tail(data["clean"][idx]), target, settings.loss)
            loss = loss + settings.clean_weight * loss_c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums["protected"] += float(loss_p.detach()) * len(idx)
        sums["clean"] += float(loss_c.detach()) * len(idx)
        count += len(idx)
        bar.update(1)
        if over():
            stopped = True
            break
    return {k: v / count for k, v in sums.items()} | {"images": count}, stopped


def _train(parts, data, opt, settings, history, over, save, progress) -> str:
    """Epochs until ``settings.epochs`` or ``over()`` (``history`` grows in place, ``save``
    after each); returns why training stopped."""
    n = len(data["target"])
    gen = torch.Generator().manual_seed(settings.seed)
    for _ in range(len(history)):  # the same shuffles as an uninterrupted run
        torch.randperm(n, generator=gen)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    with tqdm(
        total=settings.epochs * steps_per_epoch,
        initial=len(history) * steps_per_epoch,
        desc="distill",
        disable=not progress,
        unit="step",
    ) as bar:
        while len(history) < settings.epochs:
            if history and over():  # resumed with the budget already spent
                return "time budget"
            rec, timed_out = _epoch(parts, data, opt, settings, gen, over, bar)
            # + 0.0: no "-0.0" in the record
            history.append(
                {k: v if isinstance(v, int) else round(v, 6) + 0.0 for k, v in rec.items()}
            )
            bar.set_postfix(loss=f"{rec['protected']:.4f}")
            save()
            if timed_out:
                return "time budget"
    return "epochs"


@torch.no_grad()
def _eval_loss(parts, data, settings) -> dict[str, float]:
    out = {}
    for k in ("protected", "clean"):
        src = data["prot" if k == "protected" else "clean"]
        total = 0.0
        for s in range(0, len(src), 64):
            emb = parts.tail(src[s : s + 64])
            total += float(distill_loss(emb, data["target"][s : s + 64], settings.loss)) * len(emb)
        out[k] = total / len(src)
    return out


def _losses_and_costs(
    parts, data, settings: DistillSettings, start_loss: dict[str, float], history: list[dict]
) -> dict[str, Any]:
    """The record's losses before and after training, its history and optimiser steps."""
    return {
        "loss_before": {k: round(v, 6) + 0.0 for k, v in start_loss.items()},
        "loss_after": {k: round(v, 6) + 0.0 for k, v in _eval_loss(parts, data, settings).items()},
        "history": history,
        "steps": sum(math.ceil(h["images"] / settings.batch_size) for h in history),
    }


def distill_head(
    teacher: nn.Module,
    protection: Any,
    *,
    images: np.ndarray | None = None,
    features: torch.Tensor | None = None,
    extractor: nn.Module | None = None,
    settings: DistillSettings | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Distil a student Psi' from ``teacher`` for ``protection`` (a :class:`Protection` or a
    map on feature maps) on ``images`` (uint8, with ``extractor``) or E's ``features``.

    Returns ``(student, record)``; the record holds the settings, the loss before training and
    per epoch (protected and clean), steps, seconds and why training stopped. With
    ``work_dir`` the feature chunks and a checkpoint after each epoch are kept there and a
    rerun with the same inputs resumes; other inputs are refused.
    """
    settings = settings or DistillSettings()
    n = _check_inputs(images, features, extractor)
    protect = getattr(protection, "protect", protection)
    if not callable(protect):
        raise ValueError("protection must be a Protection or a callable on feature maps")
    from advface.attacks.train import budget_clock

    t0 = time.monotonic()
    clock = budget_clock(next(teacher.parameters()).device)
    c0 = clock()
    teacher = teacher.eval()
    teacher_fp = state_fingerprint(teacher)
    student, parts = make_student(teacher, settings.train_from)
    tparts = head_parts(teacher, settings.train_from)
    src = images if images is not None else features
    assert src is not None
    key = _distill_key(src, teacher_fp, protection, settings)
    wd = Path(work_dir) if work_dir is not None else None
    state = _open_work_dir(wd, key)
    data = _feature_chunks(
        src, extractor, tparts.prefix, tparts.tail, protect,
        batch=settings.feature_batch, work_dir=wd, progress=progress,
    )  # fmt: skip
    feature_s = time.monotonic() - t0
    torch.manual_seed(settings.seed)
    opt = torch.optim.Adam([p for p in parts.tail.parameters() if p.requires_grad], lr=settings.lr)
    history: list[dict[str, float]] = []
    if state is not None:
        _resume(wd, student, opt, state)
        history = state["history"]
    start_loss = state["start_loss"] if state else _eval_loss(parts, data, settings)
    # The budget counts this run from its start (feature pass included) and what earlier runs
    # checkpointed; training stops at the first step past it.
    spent = float(state.get("budget_seconds", 0.0)) if state else 0.0

    def used() -> float:
        return spent + clock() - c0

    def over() -> bool:
        return settings.time_budget_s is not None and used() > settings.time_budget_s

    def save() -> None:
        if wd is not None:
            _checkpoint(wd, student, opt, key, history, start_loss, settings, teacher_fp, used())

    stop = _train(parts, data, opt, settings, history, over, save, progress)
    record = {
        "settings": asdict(settings),
        "images": n,
        "teacher_fingerprint": teacher_fp,
        "protection": _protection_record(protection),
        **_losses_and_costs(parts, data, settings, start_loss, history),
        "stopped_by": stop,
        "feature_seconds": round(feature_s, 1),
        "seconds": round(time.monotonic() - t0, 1),
        # The budget clock over every run of this distillation (resumes included).
        "budget_seconds": round(used(), 1),
    }
    for p in student.parameters():
        p.requires_grad_(False)
    return student, record


def _distill_key(
    src: np.ndarray | torch.Tensor, teacher_fp: str, protection: Any, settings: DistillSettings
) -> str:
    """The run's key: teacher, protection, training data and the settings that shape training
    (epochs and the time budget only say when to stop: a rerun with more of either resumes)."""
    arr = src if isinstance(src, np.ndarray) else src.detach().cpu().numpy()
    data_hash = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    trained = {k: v for k, v in asdict(settings).items() if k not in ("epochs", "time_budget_s")}
    return _run_key(teacher_fp, _protection_record(protection), data_hash, trained)


def _open_work_dir(wd: Path | None, key: str) -> dict[str, Any] | None:
    if wd is None:
        return None
    wd.mkdir(parents=True, exist_ok=True)
    key_file = wd / "run-key.txt"
    if key_file.is_file() and key_file.read_text().strip() != key:
        raise ValueError(
            f"{wd} holds a distillation with other inputs or settings; use another --work-dir"
        )
    key_file.write_text(key + "\n")
    state_file = wd / "state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else None


def _checkpoint(
    wd, student, opt, key, history, start_loss, settings, teacher_fp, budget_seconds
) -> None:
    from advface.models.recon.checkpoint import atomic_write_bytes

    save_student(
        wd / "student", student, teacher_fingerprint=teacher_fp, train_from=settings.train_from
    )
    buf = wd / "optimizer.pt.tmp"
    torch.save(opt.state_dict(), buf)
    buf.replace(wd / "optimizer.pt")
    state = {
        "key": key,
        "history": history,
        "start_loss": start_loss,
        "budget_seconds": budget_seconds,
    }
    atomic_write_bytes(wd / "state.json", json.dumps(state).encode())


def _resume(wd: Path, student: nn.Module, opt, state: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    from advface.models.distill import MODEL_FILE

    student.load_state_dict(load_file(str(wd / "student" / MODEL_FILE)), strict=False)
    opt.load_state_dict(torch.load(wd / "optimizer.pt", weights_only=True))


# -------------------------------------------------------------------------- advface distill


def default_spec(spec: str) -> str:
    """``advface`` without a shadow means the server's shadow of ``advface train-protection``
    (``$ADVFACE_CACHE_DIR/weights/embedding-shadow/shadow``)."""
    from advface.protection.embedding_shadow import default_weights_dir

    name = spec.strip().split(",")[0]
    if name.lower() == "advface":
        shadow = default_weights_dir() / "shadow"
        if not shadow.is_dir():
            raise ValueError(
                f"advface needs a shadow and none is at {shadow}: build it with "
                "`advface train-protection` or name one (advface:CKPT)"
            )
        return f"advface:{shadow}" + spec.strip()[len(name) :]
    return spec


def server_identity_check(root: Path, train) -> dict[str, Any]:
    """Check by name that the server's training people are in no LFW View 2 pair (all ten
    folds) and are not CFP people; the record says that CelebA's ids are anonymous."""
    from advface.data.protocols import load_protocol
    from advface.data.splits import (
        IdentitySplit,
        cfp_identities,
        check_identity_disjoint,
        lfw_identity,
    )

    proto = load_protocol("lfw", root, check_files=False)
    keys = sorted(set(proto.keys_a) | set(proto.keys_b))
    lfw = IdentitySplit("lfw-view2", "lfw", keys, [lfw_identity(k) for k in keys])
    cfp = cfp_identities(root)
    record = check_identity_disjoint(
        train, [lfw, IdentitySplit("cfp", "cfp", list(cfp), list(cfp.values()))]
    )
    if train.dataset == "celeba":
        record["note"] = (
            "CelebA identities are anonymous ids: the name check cannot see a person shared "
            "with LFW/CFP; the sets come from different sources"
        )
    return record


def run_distill(
    spec: str | Any,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    limit: int | None = 400,
    settings: DistillSettings | None = None,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    facenet: nn.Module | None = None,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """``advface distill``: distil FaceNet's Psi for the protection ``spec`` on ``limit``
    images (seeded sample) of CelebA's server half; save the student to ``out`` and return its
    config (record included). ``work_dir`` (default ``out`` + ``.work``) makes it resumable.

    ``spec`` may be a built protection instead of a spec string (``advface reproduce``: the
    very protection of its online rows), whose extractor is ``facenet``'s E; ``facenet``
    (default: the converted wheel) is the teacher's network; ``cache``: the aligned faces'."""
    from advface import config
    from advface.data.splits import celeba_split
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet
    from advface.pipelines.data import aligned_images
    from advface.protection import protection_from_spec

    settings = settings or DistillSettings()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    root = config.data_root(data_root)
    split = celeba_split(root, "server").sample(limit, settings.seed)
    identity = server_identity_check(root, split)
    enc, head = split_facenet((facenet if facenet is not None else load_facenet()).eval())
    for p in enc.parameters():
        p.requires_grad_(False)
    if isinstance(spec, str):
        protection = protection_from_spec(default_spec(spec), extractor=enc, head=head)
    else:
        protection, spec = spec, None
    head = copy.deepcopy(head).cpu()  # the student trains on the CPU; E may be on a GPU
    images, found = aligned_images(
        "celeba", split.keys, data_root=root, cache=cache, progress=progress
    )
    wd = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    student, record = distill_head(
        head,
        protection,
        images=images,
        extractor=enc,
        settings=settings,
        work_dir=wd,
        progress=progress,
    )
    data = {
        "train_set": split.name,
        "dataset": "celeba",
        "images": len(split),
        "people": len(split.people),
        "no_face": int((~found).sum()),
        "seed": settings.seed,
        "identity_check": identity,
        "keys": split.keys,  # the images used, in training order
    }
    return save_student(
        out,
        student,
        teacher_fingerprint=record["teacher_fingerprint"],
        train_from=settings.train_from,
        teacher="facenet Psi (split at conv2d_2b)",
        protection=record["protection"],
        protection_spec=spec,
        data=data,
        record=record,
    )


# -------------------------------------------------------------------------- evaluation


def _accuracy(scores: np.ndarray, issame: np.ndarray, fold: np.ndarray) -> dict[str, Any]:
    from advface.metrics.image import proportion_ci
    from advface.metrics.verification import evaluate_pairs

    r = evaluate_pairs(scores, issame, fold)
    # Wilson interval over the pairs (each is decided once, at its fold's threshold): it stays
    # in [0, 1] near 100%, where the bench's fold interval (1.96 std / sqrt(folds)) does not.
    correct = round(r.accuracy * r.n_pairs)
    half = 1.96 * r.accuracy_std / math.sqrt(len(np.unique(fold)))
    return {
        "accuracy": r.accuracy,
        "accuracy_std": r.accuracy_std,
        "accuracy_ci95": list(proportion_ci(correct, r.n_pairs)),
        "accuracy_ci95_folds": [r.accuracy - half, r.accuracy + half],
        "tar_at_far_1e-3": r.tar_at_far,
        "n_pairs": r.n_pairs,
    }


def _embed_all(images, ids, enc, prefix, tails, protect, batch, progress, desc):
    """Embeddings of ``images[ids]`` by every tail, after ``protect`` when given."""
    from advface.models.facenet import preprocess

    out = {k: np.empty((len(ids), 512), np.float32) for k in tails}
    for s in tqdm(range(0, len(ids), batch), desc=desc, disable=not progress, unit="batch"):
        with torch.no_grad():
            z = enc(preprocess(images[ids[s : s + batch]]))
        if protect is not None:
            z = protect(z)
        with torch.no_grad():
            h = prefix(z)
            for k, tail in tails.items():
                out[k][s : s + len(z)] = tail(h).float().numpy()
    return out


def _score_rows(sub, stored: np.ndarray, clean: dict, prot: dict) -> dict[str, dict]:
    """Accuracy of each pairing: stored side (first image) protected except for ``clean``."""
    from advface.pipelines.eval_fr import pair_scores

    pos = np.searchsorted(stored, sub.idx_a)
    a_t, a_s = prot["teacher"][pos], prot["student"][pos]
    b_t, b_s = clean["teacher"][sub.idx_b], clean["student"][sub.idx_b]
    pairs = {
        "clean": (clean["teacher"][sub.idx_a], b_t),
        "online": (a_t, b_t),
        "offline": (a_s, b_s),
        # Psi' for the stored side, the original Psi for probes (what the loss targets).
        "offline_teacher_probe": (a_s, b_t),
    }
    return {k: _accuracy(pair_scores(a, b), sub.issame, sub.fold) for k, (a, b) in pairs.items()}


def offline_accuracy(
    protection: Any,
    student: str | Path | nn.Module,
    dataset: str = "lfw",
    pairs_per_fold: int | None = None,
    *,
    train_from: str | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Table 2's offline row: verification on ``dataset`` with the stored side protected and
    Psi' (``student``: a distilled-head folder or module) embedding both sides, beside the
    teacher Psi on clean and on protected (online) features.

    ``pairs_per_fold=None`` runs the full protocol; otherwise a seeded sample stratified over
    folds and genuine/impostor (:func:`~advface.pipelines.eval_fr.sample_pairs`), which the
    row states. A module ``student`` needs ``train_from`` (else ``"all"``: no shared prefix).
    """
    from advface import config
    from advface.data.protocols import load_protocol
    from advface.pipelines.data import aligned_images
    from advface.pipelines.eval_fr import DATASETS, sample_pairs

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    t0 = time.monotonic()
    root = config.data_root(data_root)
    enc, prefix, tails, train_from, version = _heads(student, train_from)
    sub = sample_pairs(load_protocol(dataset, root), pairs_per_fold=pairs_per_fold, seed=seed)
    images, found = aligned_images(DATASETS[dataset], sub.keys, data_root=root, progress=progress)
    protect = getattr(protection, "protect", protection)
    clean = _embed_all(
        images,
        np.arange(len(images)),
        enc,
        prefix,
        tails,
        None,
        batch_size,
        progress,
        "embed clean",
    )
    stored = np.unique(sub.idx_a)
    prot = _embed_all(
        images, stored, enc, prefix, tails, protect, batch_size, progress, "embed protected"
    )
    acc = _score_rows(sub, stored, clean, prot)
    used = np.unique(np.r_[sub.idx_a, sub.idx_b])
    return {
        "table": "2",
        "mode": "offline",
        "dataset": dataset,
        "protection": _protection_record(protection).get("name"),
        "protection_params": _protection_record(protection),
        "student": version,
        "train_from": train_from,
        **acc["offline"],
        "pairs": _pairs_note(pairs_per_fold, seed),
        "pairs_per_fold": pairs_per_fold,
        "pairs_seed": seed,
        # AdvFace with bn="batch" depends on the batch: the stored side is protected in these.
        "protect_batch": batch_size,
        "reference": {k: v for k, v in acc.items() if k != "offline"},
        "n_images": int(len(used)),
        "no_face": int((~found[used]).sum()),
        "wall_s": round(time.monotonic() - t0, 1),
    }


def _heads(
    student: str | Path | nn.Module, train_from: str | None
) -> tuple[nn.Module, nn.Module, dict[str, nn.Module], str, str | None]:
    """(E, the layers the teacher and student share, {teacher, student}: their own tails,
    train_from, the student's model version): the shared layers are computed once."""
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet

    enc, teacher = split_facenet(load_facenet().eval())
    version = None
    if isinstance(student, str | Path):
        student, cfg = load_student(student, teacher)
        train_from, version = cfg["train_from"], cfg["model_version"]
    train_from = train_from or "all"
    tails = {
        "teacher": head_parts(teacher, train_from).tail,
        "student": head_parts(student, train_from).tail,
    }
    return enc, head_parts(teacher, train_from).prefix, tails, train_from, version


def _pairs_note(pairs_per_fold: int | None, seed: int) -> str:
    if pairs_per_fold is None:
        return "full protocol"
    return (
        f"seeded sample (seed {seed}) of {pairs_per_fold} pairs per fold, stratified over "
        "folds and genuine/impostor"
    )
