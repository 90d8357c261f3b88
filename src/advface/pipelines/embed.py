"""Batched embedding of aligned uint8 faces, optionally through a protected feature map."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def _to_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    from advface.models.facenet import preprocess

    return preprocess(batch).to(device)


@torch.no_grad()
def embed_images(
    images: np.ndarray,
    model: nn.Module,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool = False,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed uint8 RGB faces (N,160,160,3) with the full network -> (N,512) float32.

    With ``flip`` the embeddings of the image and its mirror are summed and re-normalised.
    """
    return embed_split(
        images,
        model,
        None,
        None,
        batch_size=batch_size,
        device=device,
        flip=flip,
        progress=progress,
        desc=desc,
    )


def embed_split(
    images: np.ndarray,
    encoder: nn.Module,
    head: nn.Module | None,
    feature_fn: FeatureFn | None,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool = False,
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed faces as ``head(feature_fn(encoder(x)))``; ``head=None`` means ``encoder`` is the
    full network. ``feature_fn`` (e.g. a protection) sees whole batches of E's feature maps."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    out = np.empty((len(images), 512), dtype=np.float32)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = encoder(x)
        if head is None:
            return z
        if feature_fn is not None:
            z = feature_fn(z)  # a protection may need gradients inside
        with torch.no_grad():
            return head(z)

    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        x = _to_input(images[s : s + batch_size], device)
        e = run(x)
        if flip:
            e = torch.nn.functional.normalize(e + run(torch.flip(x, dims=[3])), dim=1)
        out[s : s + len(x)] = e.float().cpu().numpy()
    return out


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of a model's parameters and buffers (names, shapes and values)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def embed_cached(
    images: np.ndarray,
    keys: list[str],
    model: nn.Module,
    store: str | None,
    **kwargs,
) -> np.ndarray:
    """:func:`embed_images` with a per-image on-disk cache (``store``: a .safetensors path,
    or None for no cache). Only images whose key is not cached yet are embedded."""
    import json
    import os
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    if len(keys) != len(images):
        raise ValueError(f"{len(keys)} keys for {len(images)} images")
    if store is None:
        return embed_images(images, model, **kwargs)
    path = Path(store)
    cached: dict[str, np.ndarray] = {}
    if path.exists():
        data = load_file(str(path))
        names = json.loads(bytes(data["keys"]).decode())
        cached = dict(zip(names, data["emb"], strict=True))
    todo = [i for i, k in enumerate(keys) if k not in cached]
    if todo:
        new = embed_images(images[todo], model, **kwargs)
        cached.update({keys[i]: e for i, e in zip(todo, new, strict=True)})
        names = sorted(cached)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(
            {
                "emb": np.stack([cached[k] for k in names]),
                "keys": np.frombuffer(json.dumps(names).encode(), dtype=np.uint8).copy(),
            },
            str(tmp),
        )
        os.replace(tmp, path)
    return np.stack([cached[k] for k in keys])
