"""Cached stages of a long pipeline (reproduce, bench, eval-fr): each result lives in a file
named by its settings' hash, so a rerun with the same settings reuses it and a changed setting
recomputes only what depends on it. Files are written atomically: an interrupted run leaves no
half-written stage."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def settings_key(settings: dict) -> str:
    """Short stable hash of JSON-serialisable settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class StageCache:
    """A folder of cached stage outputs (JSON or tensors) keyed by name + settings.

    ``compute_seconds[name]``: the wall seconds that computing the tensor stages met so far
    took, summed over their chunks and across the runs that wrote them (stored in each file's
    metadata); None when a file predates the record."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compute_seconds: dict[str, float | None] = {}

    def tally(self, name: str, seconds: float | None) -> None:
        """Count ``seconds`` (None: unknown) of computing stage ``name`` in compute_seconds."""
        if name not in self.compute_seconds:
            self.compute_seconds[name] = 0.0
        before = self.compute_seconds[name]
        self.compute_seconds[name] = None if before is None or seconds is None else before + seconds

    def path(self, name: str, settings: dict, suffix: str) -> Path:
        return self.root / f"{name}-{settings_key(settings)}{suffix}"

    def json(self, name: str, settings: dict, compute: Callable[[], dict]) -> dict:
        path = self.path(name, settings, ".json")
        if path.exists():
            return json.loads(path.read_text())["value"]
        value = compute()
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": settings, "value": value}, default=str))
        os.replace(tmp, path)
        return value

    def arrays(
        self,
        name: str,
        settings: dict,
        compute: Callable[[], dict[str, np.ndarray]],
        *,
        tally: str | None = None,
    ) -> dict[str, np.ndarray]:
        """The arrays of stage ``name`` under ``settings``, computed once; the seconds it took
        are counted in ``compute_seconds[tally or name]``."""
        path = self.path(name, settings, ".safetensors")
        if path.exists():
            with safe_open(str(path), "np") as fh:  # one read: arrays and the record
                meta = fh.metadata() or {}
                value = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
            self.tally(tally or name, float(meta["seconds"]) if "seconds" in meta else None)
            return value
        t0 = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp")
        save_file(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in value.items()},
            str(tmp),
            metadata={"settings": json.dumps(settings, default=str), "seconds": f"{seconds:.3f}"},
        )
        os.replace(tmp, path)
        self.tally(tally or name, seconds)
        return value

    def chunked(
        self,
        name: str,
        settings: dict,
        keys: list[str],
        chunk: int,
        compute: Callable[[slice], dict[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """:meth:`arrays` over ``keys`` in chunks of ``chunk`` (each keyed by ``settings`` and
        its own keys), concatenated: an interrupted stage resumes at its first missing chunk.
        ``compute(slice)`` returns the arrays of that slice of ``keys``; an array present in
        only some chunks (e.g. the first faces' grids) is concatenated over those."""
        parts = [
            self.arrays(stage, key, lambda sl=sl: compute(sl), tally=name)
            for stage, key, sl in self._chunks(name, settings, keys, chunk)
        ]
        names = dict.fromkeys(k for part in parts for k in part)
        return {k: np.concatenate([part[k] for part in parts if k in part]) for k in names}

    def drop_chunked(self, name: str, settings: dict, keys: list[str], chunk: int) -> None:
        """Remove the files of a :meth:`chunked` stage (once what it fed needs them no more)."""
        for stage, key, _ in self._chunks(name, settings, keys, chunk):
            self.path(stage, key, ".safetensors").unlink(missing_ok=True)

    @staticmethod
    def _chunks(name: str, settings: dict, keys: list[str], chunk: int):
        """(stage name, settings, slice of ``keys``) of each chunk of a chunked stage."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        for i, start in enumerate(range(0, len(keys), chunk)):
            sl = slice(start, start + chunk)
            digest = hashlib.sha256("\n".join(keys[sl]).encode()).hexdigest()[:16]
            yield f"{name}-{i:04d}", {**settings, "chunk": [start, digest]}, sl
