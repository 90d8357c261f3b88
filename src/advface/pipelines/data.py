"""Aligned faces for the pipelines: reuse the full aligned cache when it holds every key,
otherwise align just the keys needed (a subset cache, built resumably)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def aligned_images(
    dataset: str,
    keys: Sequence[str],
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB faces (len(keys),160,160,3) in ``keys`` order and their MTCNN ``found`` flags."""
    from advface.data.prepare import load_aligned, prepare

    keys = list(keys)
    try:
        full = load_aligned(dataset, cache=cache)
        if all(k in full for k in keys):
            idx = full.indices(keys)
            return full.take(keys), full.found[idx]
    except FileNotFoundError:
        pass
    prepare(dataset, data_root=data_root, cache=cache, keys=keys, progress=progress)
    sub = load_aligned(dataset, cache=cache, keys=keys)
    return sub.take(keys), sub.found[sub.indices(keys)]
