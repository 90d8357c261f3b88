"""Reconstruction attack on a dataset's test faces: image quality and replay success (SRRA).

For each face x of the dataset's pairs: z = E(x); the server stores protect(z) (identity for
``--protection none``); the attacker steals it and reconstructs R(protect(z)). We report
SSIM / PSNR / MSE between x and the reconstruction, and SRRA: how often FaceNet accepts the
reconstruction as x at the unprotected system's thresholds on that dataset.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advface.attacks.train import to_unit
from advface.pipelines.recon_eval import clean_embeddings, measure_batch, summarize_recon

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
#: Attack dataset -> aligned dataset holding its images.
DATASETS: dict[str, str] = {"lfw": "lfw", "cfp-fp": "cfp"}


def resolve_protection(
    name: str, *, extractor: torch.nn.Module | None = None, **params: Any
) -> FeatureFn | None:
    """``none`` -> None; a name with ``params`` -> ``build_protection(name, **params)``;
    otherwise a spec string such as ``advface:SHADOW_CKPT,epsilon=0.1`` (see
    :mod:`advface.protection.spec`), built with the attack's own E."""
    if name in ("none", "clean") and not params:
        return None
    from advface.protection import build_protection, protection_from_spec

    if params:
        return build_protection(name, **params).protect
    return protection_from_spec(name, extractor=extractor).protect


def select_keys(keys: list[str], limit: int | None, seed: int = 0) -> list[str]:
    """All ``keys`` or a seeded random subset of ``limit`` of them (kept in sorted order).

    A random subset rather than the first ``limit``: LFW keys sort by name, so a prefix would
    cover only a few identities.
    """
    if limit is None or limit >= len(keys):
        return list(keys)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    pick = np.random.default_rng(seed).choice(len(keys), size=limit, replace=False)
    return [keys[i] for i in np.sort(pick)]


def save_grid(
    originals: torch.Tensor, recons: torch.Tensor, path: str | Path, per_row: int = 4
) -> Path:
    """PNG of (original | reconstruction) pairs, ``per_row`` pairs per row; [0,1] inputs."""
    import matplotlib.image as mpimg

    if len(originals) == 0:
        raise ValueError("no images for the grid")
    gap = 4
    tiles = []
    for o, r in zip(originals, recons, strict=True):
        o_np = o.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        r_np = r.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        h = o_np.shape[0]
        tiles.append(np.concatenate([o_np, r_np, np.ones((h, gap, 3))], axis=1))
    blank = np.ones_like(tiles[0])
    while len(tiles) % per_row:
        tiles.append(blank)
    rows = [np.concatenate(tiles[i : i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    rows = [np.concatenate([r, np.ones((gap, r.shape[1], 3))], axis=0) for r in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:  # written beside and renamed: a grid is whole or absent
        mpimg.imsave(tmp, np.concatenate(rows, axis=0), format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the grid is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_grid_target(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a grid path that cannot be written, before an attack spends its time: a folder,
    an existing file (without ``overwrite``), or a parent that is not a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"grid {path} is a folder: give the path of a .png file")
    if path.exists() and not overwrite:
        raise ValueError(f"grid {path} exists (pass --overwrite to replace it)")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # save_grid creates the missing folders below this one
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"grid {path}: {folder} is not a writable folder")
    return path


def check_thresholds(thresholds: dict[str, float]) -> None:
    """Refuse a NaN or infinite threshold: every comparison with NaN is false, so SRRA would
    silently be 0. (A finite value outside [-1, 1] accepts every or no replay; the command
    line refuses those too.)"""
    for name, value in thresholds.items():
        if not (isinstance(value, int | float) and math.isfinite(value)):
            raise ValueError(f"the {name} threshold must be a finite number, got {value!r}")


def system_thresholds(
    dataset: str,
    *,
    data_root: Path,
    cache: str | Path | None,
    model: torch.nn.Module,
    device: str,
    progress: bool,
    pairs_per_fold: int | None = None,
) -> dict[str, float]:
    """Operating (10-fold-selected) and FAR=1e-3 thresholds of the unprotected system.

    ``pairs_per_fold`` estimates them on a balanced subset of each fold's pairs (a CPU
    shortcut; with fewer than 1000 impostor pairs the FAR=1e-3 threshold is the highest
    impostor score, i.e. stricter than on the full protocol).
    """
    from advface.pipelines.eval_fr import eval_fr

    res = eval_fr(
        dataset,
        data_root=data_root,
        cache=cache,
        model=model,
        device=device,
        progress=progress,
        pairs_per_fold=pairs_per_fold,
    )
    return {"operating": float(res["threshold"]), "far_1e-3": float(res["threshold_far_1e-3"])}


def _test_keys(dataset: str, root: Path, ckpt: dict[str, Any]) -> tuple[list[str], dict]:
    """Test images and what is known of their identity overlap with the attacker's training.

    LFW: the images of folds 1-5 (the identity-disjoint protocol: ``lfw-attacker`` trains on
    everyone else); CFP: every pair image. The overlap (people of the test images also in the
    attacker's training set) is counted by name for the LFW training presets and reported."""
    from advface.data import splits
    from advface.data.protocols import load_protocol

    train_set = str(ckpt.get("train_set", ""))
    if dataset == "lfw":
        test = splits.lfw_test_split(root)
    else:
        names = splits.cfp_identities(root)
        test = splits.IdentitySplit("cfp", "cfp", list(names), list(names.values()))
        wanted = set(load_protocol(dataset, root).unique_keys())
        test = splits.IdentitySplit(
            "cfp",
            "cfp",
            [k for k in test.keys if k in wanted],
            [i for k, i in zip(test.keys, test.identities, strict=True) if k in wanted],
        )
    info: dict[str, Any] = {"test_people": len(test.people), "train_set": train_set or None}
    train = None
    if train_set == "lfw-attacker":
        train = splits.lfw_attacker_split(root)
    elif train_set == "lfw-nonpairs":
        from advface.data.protocols import lfw_nonpair_keys

        keys = lfw_nonpair_keys(root)
        train = splits.IdentitySplit(train_set, "lfw", keys, [splits.lfw_identity(k) for k in keys])
    if train is not None:
        info["identity_overlap"] = len(train.people & test.people)
    return test.keys, info


def _reconstruct(
    images: np.ndarray,
    extractor: torch.nn.Module,
    protect: FeatureFn | None,
    recon: torch.nn.Module,
    model: torch.nn.Module,
    batch_size: int,
    device: str,
    grid_faces: int,
    progress: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-image metrics and replayed embeddings of R(protect(E(x))), the clean embeddings,
    and the first ``grid_faces`` (original, reconstruction) pairs."""
    from tqdm.auto import tqdm

    from advface.models.facenet import preprocess

    per: dict[str, list[np.ndarray]] = {}
    clean: list[np.ndarray] = []
    shown: tuple[torch.Tensor, torch.Tensor] | None = None
    for s in tqdm(range(0, len(images), batch_size), desc="attack", disable=not progress):
        batch = images[s : s + batch_size]
        x = to_unit(batch)
        with torch.no_grad():
            z = extractor(preprocess(batch).to(device))
        if protect is not None:
            z = protect(z)  # a protection (e.g. AdvFace's PGD) may need autograd inside
        with torch.no_grad():
            r = recon(z.detach()).float().clamp(0, 1)
        # The same measurement as `advface reproduce` and the bench (pipelines.recon_eval).
        for k, v in measure_batch(r, x, model).items():
            per.setdefault(k, []).append(v)
        r = r.cpu()
        clean.append(clean_embeddings(model, batch, device))
        if shown is None:
            shown = (x[:grid_faces], r[:grid_faces])
        elif len(shown[0]) < grid_faces:
            need = grid_faces - len(shown[0])
            shown = (torch.cat([shown[0], x[:need]]), torch.cat([shown[1], r[:need]]))
    values = {k: np.concatenate(v) for k, v in per.items()}
    return values, np.concatenate(clean), shown


def _thresholds(
    given: dict[str, float] | None,
    dataset: str,
    root: Path,
    cache: str | Path | None,
    model,
    device: str,
    progress: bool,
    pairs_per_fold: int | None,
) -> tuple[dict[str, float], str]:
    """The thresholds to judge replays by and where they came from."""
    if given is not None:
        return given, "given"
    found = system_thresholds(
        dataset,
        data_root=root,
        cache=cache,
        model=model,
        device=device,
        progress=progress,
        pairs_per_fold=pairs_per_fold,
    )
    source = "eval-fr" if pairs_per_fold is None else f"eval-fr, {pairs_per_fold} pairs per fold"
    return found, source


def _attacker_record(attacker: str | Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint says about the attacker: architecture, training set and effort."""
    return {
        "attacker": str(attacker),
        "arch": ckpt["arch"],
        "attacker_cfg": ckpt["cfg"],
        "attacker_train_set": ckpt.get("train_set"),
        "attacker_epochs": ckpt.get("epochs"),
        "attacker_partial_epoch": ckpt.get("partial_epoch"),
        "attacker_images_seen": sum(h.get("images", 0) for h in ckpt.get("history", [])),
        "attacker_n_train": ckpt.get("n_train"),
        "attacker_features": ckpt.get("features"),
    }


def run_attack(
    attacker: str | Path,
    dataset: str,
    *,
    protection: str = "none",
    protection_params: dict[str, Any] | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    grid: str | Path | None = None,
    grid_faces: int = 8,
    overwrite: bool = False,
    thresholds: dict[str, float] | None = None,
    threshold_pairs_per_fold: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack the faces of ``dataset``'s pairs with the reconstruction checkpoint ``attacker``.

    Returns a JSON-ready dict with per-metric means and 95% CIs (``<k>_ci95``), ``srra``
    (operating threshold), ``srra_far_1e-3``, ``replay_cosine`` and ``no_face`` (MTCNN
    fallback crops among the test faces), measured by :mod:`advface.pipelines.recon_eval`
    as in ``advface reproduce``. ``thresholds`` overrides the system's thresholds (keys
    ``operating`` and ``far_1e-3``, finite); by default they come from the unprotected
    benchmark on the full protocol (or ``threshold_pairs_per_fold`` pairs of each fold).
    ``grid``: a PNG of the first ``grid_faces`` (original | reconstruction) pairs is written
    there (an existing file only with ``overwrite``); none without it.
    """

    from advface.config import data_root as resolve_root
    from advface.models.facenet import load_facenet
    from advface.models.recon import load_checkpoint
    from advface.models.split import split_facenet
    from advface.pipelines.data import aligned_images

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if thresholds is not None:
        check_thresholds(thresholds)
    grid_path = check_grid_target(grid, overwrite=overwrite) if grid else None
    t0 = time.perf_counter()
    recon, ckpt = load_checkpoint(attacker, device)
    root = resolve_root(data_root)
    keys, identity = _test_keys(dataset, root, ckpt)
    keys = select_keys(keys, limit, seed)
    model = load_facenet(cache=cache).to(device).eval()
    extractor, _ = split_facenet(model)
    protect = resolve_protection(protection, extractor=extractor, **(protection_params or {}))
    thresholds, threshold_source = _thresholds(
        thresholds, dataset, root, cache, model, device, progress, threshold_pairs_per_fold
    )
    images, found = aligned_images(
        DATASETS[dataset], keys, data_root=root, cache=cache, progress=progress
    )

    values, clean, shown = _reconstruct(
        images, extractor, protect, recon, model, batch_size, device, grid_faces, progress
    )
    out: dict[str, Any] = {"dataset": dataset, "n_images": len(keys), **identity}
    out.update(summarize_recon(values, clean, thresholds))
    out["no_face"] = int((~np.asarray(found, dtype=bool)).sum())
    out.update(
        {
            "threshold": thresholds.get("operating"),
            "threshold_far_1e-3": thresholds.get("far_1e-3"),
            "threshold_source": threshold_source,
            "protection": protection,
            **_attacker_record(attacker, ckpt),
            "limit": limit,
            "seed": seed,
            "device": str(torch.device(device)),
        }
    )
    if grid_path is not None and shown is not None:
        out["grid"] = str(save_grid(*shown, grid_path))
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def check_train_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or one holding a checkpoint (its ``config.json``)
    that neither ``resume`` continues nor ``overwrite`` replaces: the first epoch would
    silently replace a trained attacker."""
    from advface.models.recon.checkpoint import CONFIG_FILE

    if resume and overwrite:
        raise ValueError(
            "--resume continues the checkpoint in OUT and --overwrite replaces it: give one"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if (out / CONFIG_FILE).exists() and not (resume or overwrite):
        raise ValueError(
            f"output {out} already holds a checkpoint: pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )


def train_attacker(
    arch: str,
    train_set: str,
    out: str | Path,
    *,
    cfg: dict[str, Any] | None = None,
    settings: Any = None,
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    feature_fn: FeatureFn | None = None,
    features: str = "clean",
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train a reconstruction network on ``train_set`` (checked disjoint from every test image)
    against FaceNet's E and checkpoint it to ``out``; returns a JSON-ready summary.

    A checkpoint already in ``out`` is continued with ``resume``, replaced with ``overwrite``
    and otherwise refused. ``feature_fn``/``features`` let an adaptive attacker train on
    protected features; the ``features`` label is recorded in the checkpoint.
    """
    from advface.attacks.train import TrainSettings, train_recon
    from advface.attacks.trainsets import load_train_set
    from advface.models.facenet import load_facenet
    from advface.models.recon import read_config
    from advface.models.split import split_facenet

    check_train_out(Path(out), resume=resume, overwrite=overwrite)
    if resume:
        read_config(out)  # fails now, not after loading the training set
    settings = settings or TrainSettings()
    t0 = time.perf_counter()
    data = load_train_set(train_set, data_root=data_root, limit=limit)
    extractor, _ = split_facenet(load_facenet(cache=cache))
    if feature_fn is None and features != "clean":
        from advface.attacks.train import MemoFeatures
        from advface.protection import feature_fn_from_spec

        # The adaptive attacker: train on features protected as the server would store them.
        feature_fn = MemoFeatures(
            feature_fn_from_spec(features, extractor=extractor, device=settings.device)
        )
    result = train_recon(
        data.images,
        extractor,
        arch=arch,
        cfg=cfg,
        settings=settings,
        out_dir=out,
        resume=resume,
        feature_fn=feature_fn,
        meta={
            "train_set": train_set,
            "train_limit": limit,
            "features": features,
            "disjoint_check": data.checks,
        },
    )
    return {
        "out": str(out),
        "arch": arch,
        "train_set": train_set,
        "n_train": len(data),
        "epochs": result.epochs_done,
        "stopped_early": result.stopped_early,
        "history": result.history,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
