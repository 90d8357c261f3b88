"""Protect a file of client features: safetensors with ``z`` (N,64,77,77) in, protected out.

The output holds the protected ``z`` (same dtype), every other tensor of the input unchanged
(keys, labels...), the input's metadata, and the protection record under ``protection``
(JSON of ``Protection.params()``) plus ``protection_batch_size`` (results of AdvFace with
``bn="batch"`` depend on how faces were batched). The file is written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from advface.protection import build_protection
from advface.protection.base import Protection, check_int

FEATURE_KEY = "z"


def build_from_options(
    method: str,
    *,
    shadow: str | Path | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    epsilon: float | None = None,
    reading: str | None = None,
    bn: str | None = None,
    clamp_min: float | None = None,
    keep_best: bool | None = None,
    epsilon_dp: float | None = None,
    generator: str | Path | None = None,
    extractor: torch.nn.Module | None = None,
    head: torch.nn.Module | None = None,
    device: str | None = None,
    seed: int | None = None,
) -> Protection:
    """Map the command-line options onto one protection.

    ``epsilon`` is the per-step noise bound shared by all methods (AdvFace's epsilon, the
    random baseline's ``bound``, the Laplace baseline's ``sensitivity``), ``steps`` the
    iteration count (AdvFace and random). Options a method does not take raise ``ValueError``.
    """
    given = {
        "shadow": shadow,
        "steps": steps,
        "alpha": alpha,
        "epsilon": epsilon,
        "reading": reading,
        "bn": bn,
        "clamp_min": clamp_min,
        "keep_best": keep_best,
        "epsilon_dp": epsilon_dp,
        "generator": generator,
    }
    rename = {
        "none": {},
        "random": {"steps": "steps", "epsilon": "bound"},
        "dp": {"epsilon": "sensitivity", "epsilon_dp": "epsilon_dp"},
        "advface": {k: k for k in given if k not in ("epsilon_dp", "generator")},
        "embedding-shadow": {
            k: k for k in ("shadow", "generator", "steps", "alpha", "epsilon", "bn")
        },
    }
    if method not in rename:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(rename)}")
    extra = sorted(k for k, v in given.items() if v is not None and k not in rename[method])
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ValueError(f"{flags} do(es) not apply to --method {method}")
    params: dict[str, Any] = {
        rename[method][k]: v for k, v in given.items() if v is not None and k in rename[method]
    }
    if method in ("advface", "embedding-shadow"):
        if shadow is None:
            raise ValueError(f"--method {method} needs --shadow CKPT (a reconstruction checkpoint)")
        params["shadow"] = str(shadow)
        if method == "embedding-shadow":
            if generator is None:
                raise ValueError("--method embedding-shadow needs --generator CKPT (an EmbDec)")
            params["generator"] = str(generator)
            if head is not None:
                params["head"] = head
        if extractor is not None:
            params["extractor"] = extractor
        if device is not None:
            params["device"] = device
    return build_protection(method, seed=seed, **params)


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {}), list(fh.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def protect_file(
    src: str | Path,
    dst: str | Path,
    protection: Protection,
    *,
    batch_size: int = 64,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Protect ``src``'s tensor ``z`` batch by batch and write ``dst``; return a summary.

    ``seed`` seeds one CPU generator that runs through all batches (random and dp); without it
    the protection's own ``seed`` (or torch's global RNG) applies. The whole output is held in
    memory (safetensors writes whole tensors): 1.5 MB per face in float32.
    """
    src, dst = Path(src), Path(dst)
    batch_size = check_int("batch_size", batch_size, low=1)
    if not src.is_file():
        raise ValueError(f"input {src} does not exist")
    if dst.is_dir():  # --overwrite replaces a file; the rename onto a folder would fail last
        raise ValueError(f"output {dst} is a folder: give the path of a .safetensors file")
    if dst.exists() and not overwrite:
        raise ValueError(f"output {dst} exists (pass overwrite=True / --overwrite)")
    if not dst.parent.is_dir():
        raise ValueError(f"output folder {dst.parent} does not exist")
    metadata, keys = _read_header(src)
    if FEATURE_KEY not in keys:
        raise ValueError(f"{src} holds no tensor {FEATURE_KEY!r} (found: {', '.join(keys)})")

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    t0 = time.perf_counter()
    with safe_open(str(src), framework="pt") as fh:
        sl = fh.get_slice(FEATURE_KEY)
        shape = tuple(sl.get_shape())
        if len(shape) != 4 or shape[0] < 1:
            raise ValueError(f"{src}: {FEATURE_KEY!r} must be (N, C, H, W), got {shape}")
        out: torch.Tensor | None = None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=shape[0], desc=f"protect {protection.name}", unit="face")
        for start in range(0, shape[0], batch_size):
            z = sl[start : start + batch_size]
            try:
                zp = protection.protect(z, generator=generator)
            except ValueError as exc:
                raise ValueError(f"{src} faces {start}..{start + len(z) - 1}: {exc}") from exc
            if out is None:
                out = torch.empty(shape, dtype=zp.dtype)
            out[start : start + len(z)] = zp
            if bar is not None:
                bar.update(len(z))
        if bar is not None:
            bar.close()
        others = {k: fh.get_tensor(k) for k in keys if k != FEATURE_KEY}
    wall = time.perf_counter() - t0
    assert out is not None  # shape[0] >= 1

    record = protection.params()
    meta = dict(metadata)
    if "protection" in meta:  # protecting a protected file: keep the earlier record
        meta["protection_previous"] = meta["protection"]
    meta["protection"] = json.dumps(record, sort_keys=True)
    meta["protection_batch_size"] = str(batch_size)
    if seed is not None:
        meta["protection_file_seed"] = str(seed)
    atomic_save({FEATURE_KEY: out, **others}, dst, meta)
    return {
        "input": str(src),
        "output": str(dst),
        "n_faces": shape[0],
        "batch_size": batch_size,
        "wall_s": round(wall, 3),
        "faces_per_s": round(shape[0] / wall, 3) if wall > 0 else None,
        "protection": record,
    }


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
