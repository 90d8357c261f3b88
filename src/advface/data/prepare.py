"""Aligned image caches: uint8 (N, 160, 160, 3) RGB arrays plus a JSON index.

Layout, under ``<cache_dir>/aligned/<name>/``:

- ``images.npy``: uint8 (N, size, size, 3) RGB, loaded memory-mapped by :func:`load_aligned`;
- ``index.json``: keys, found flags, MTCNN boxes, crop corners, confidences, labels (CelebA and
  folders), aligner settings, source folder, timing;
- ``partial/`` while a build runs: ``plan.json`` and ``chunk_NNNNN.npz`` files, each written
  atomically. A rerun with the same plan continues after the last complete chunk; the final
  ``images.npy`` and ``index.json`` are written to temporary names and renamed into place, so a
  reader never sees them half-written. ``partial/`` is removed once the build completes.

``<name>`` is the dataset name (``lfw``, ``cfp``, ``celeba``), ``folder-<basename>-<hash>`` for a
folder of identities, with ``-limit<N>`` or ``-subset-<hash>`` appended for partial builds so
that those never replace the full cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advface import config
from advface.data.align import Aligner, crop_resize, read_rgb
from advface.data.protocols import (
    celeba_image_dir,
    celeba_keys,
    cfp_image_dir,
    cfp_keys,
    folder_identities,
    lfw_image_dir,
    lfw_keys,
)

__all__ = [
    "DATASETS",
    "STAGED_MARKER",
    "AlignedSet",
    "DatasetSpec",
    "cache_name",
    "cache_path",
    "dataset_spec",
    "load_aligned",
    "prepare",
]

DATASETS = ("lfw", "cfp", "celeba")
FORMAT_VERSION = 1
# A data root holding this file was written by ``advface stage`` (device runs): its images are
# already-aligned 160x160 crops at the original paths, so they are read as crops, never re-aligned.
STAGED_MARKER = "advface-staged.json"
IMAGES_FILE = "images.npy"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class DatasetSpec:
    """What to build: a named set of images under ``image_dir``.

    ``mode`` is ``"align"`` (run MTCNN) or ``"crops"`` (images are already aligned crops).
    """

    dataset: str
    name: str
    image_dir: Path
    keys: list[str]
    labels: list[Any] | None
    mode: str
    prefer_center: bool = False
    fallback: str = "center-square"


def _is_folder_dataset(dataset: str | Path) -> bool:
    return str(dataset) not in DATASETS


def _folder_name(folder: Path) -> str:
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
    return f"folder-{folder.resolve().name}-{digest}"


def _keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()


def cache_name(
    dataset: str | Path, *, keys: Sequence[str] | None = None, limit: int | None = None
) -> str:
    """The cache folder name for ``dataset`` (optionally restricted to ``keys`` / ``limit``)."""
    base = _folder_name(Path(dataset)) if _is_folder_dataset(dataset) else str(dataset)
    if keys is not None:
        base += f"-subset-{_keys_digest(sorted(keys))[:10]}"
    if limit is not None:
        base += f"-limit{limit}"
    return base


def cache_path(
    dataset: str | Path,
    *,
    cache: str | Path | None = None,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
) -> Path:
    """``<cache_dir>/aligned/<cache_name>``."""
    return config.cache_dir(cache) / "aligned" / cache_name(dataset, keys=keys, limit=limit)


def dataset_spec(
    dataset: str | Path,
    *,
    data_root: str | Path | None = None,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
) -> DatasetSpec:
    """Resolve ``dataset`` (``lfw``, ``cfp``, ``celeba`` or a folder path) to what gets built."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    labels: list[Any] | None = None
    prefer_center = False
    fallback = "center-square"
    mode = "align"
    if _is_folder_dataset(dataset):
        folder = Path(dataset).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"unknown dataset {str(dataset)!r}: use one of {', '.join(DATASETS)} "
                "or an existing folder laid out as <identity>/<image>"
            )
        image_dir = folder.resolve()
        all_keys, labels = folder_identities(image_dir)
    else:
        root = config.data_root(data_root)
        staged = (root / STAGED_MARKER).is_file()
        if dataset == "lfw":
            image_dir, all_keys = lfw_image_dir(root), lfw_keys(root)
            prefer_center = True  # LFW images are centred on the labelled person
        elif dataset == "cfp":
            image_dir, all_keys = cfp_image_dir(root), cfp_keys(root)
            fallback = "image"  # loose crops: a detected face's grown box is ~the whole image
        else:
            image_dir = celeba_image_dir(root)
            all_keys, ids = celeba_keys(root)
            labels = [int(i) for i in ids]
            mode = "crops"
        if staged:
            mode = "crops"
    if not all_keys:
        raise ValueError(f"dataset {dataset}: no images found under {image_dir}")
    if keys is not None:
        position = {k: i for i, k in enumerate(all_keys)}
        wanted = sorted(set(keys))
        unknown = [k for k in wanted if k not in position]
        if unknown:
            raise ValueError(
                f"{len(unknown)} requested key(s) are not in dataset {dataset}, e.g. {unknown[0]!r}"
            )
        chosen = [position[k] for k in wanted]
        all_keys = wanted
        labels = [labels[i] for i in chosen] if labels is not None else None
    if limit is not None:
        all_keys = all_keys[:limit]
        labels = labels[:limit] if labels is not None else None
    return DatasetSpec(
        dataset=str(dataset),
        name=cache_name(dataset, keys=keys, limit=limit),
        image_dir=image_dir,
        keys=list(all_keys),
        labels=labels,
        mode=mode,
        prefer_center=prefer_center,
        fallback=fallback,
    )


def source_fingerprint(
    dataset: str | Path, keys: Sequence[str], *, data_root: str | Path | None = None
) -> str:
    """sha256 (16 hex) of what the aligned faces of ``keys`` are made from: the cache format,
    the default aligner's settings for ``dataset``, and each key with the sha256 of its source
    file. Unlike the aligned pixels it is the same on every machine (MTCNN's floats may round
    differently on another CPU and move a crop by a pixel), so stages keyed by it can be
    carried between machines; a source image replaced under its name, or other crop
    settings, change it. Memoised per process."""
    root = None if _is_folder_dataset(dataset) else str(config.data_root(data_root))
    return _source_fingerprint(str(dataset), tuple(keys), root)


@functools.lru_cache(maxsize=64)
def _source_fingerprint(dataset: str, keys: tuple[str, ...], root: str | None) -> str:
    spec = dataset_spec(dataset, data_root=root)
    aligner = Aligner(prefer_center=spec.prefer_center, fallback=spec.fallback)
    head = {"format": FORMAT_VERSION, "settings": _settings_for(spec, aligner)}
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for key in keys:
        try:
            data = (spec.image_dir / key).read_bytes()
        except OSError as exc:
            msg = f"cannot read the source image of {key!r} in {dataset}: {exc}"
            raise ValueError(msg) from exc
        h.update(key.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- building


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def _settings_for(spec: DatasetSpec, aligner: Aligner | None) -> dict[str, Any]:
    if spec.mode == "crops":
        size = aligner.size if aligner is not None else 160
        return {"mode": "crops", "size": size, "note": "already aligned crops; resized if needed"}
    assert aligner is not None
    return {"mode": "align", **aligner.settings()}


def _write_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_chunk(path: Path, expected: int, size: int) -> dict[str, np.ndarray] | None:
    """A complete chunk's arrays, or ``None`` when the file is unusable (then it is redone)."""
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in ("images", "found", "boxes", "crops", "confidence")}
    except Exception:  # noqa: BLE001 - any unreadable chunk is simply rebuilt
        return None
    if out["images"].shape != (expected, size, size, 3) or out["found"].shape != (expected,):
        return None
    return out


def _process_chunk(
    spec: DatasetSpec, keys: Sequence[str], aligner: Aligner, on_image: Any
) -> dict[str, np.ndarray]:
    n, size = len(keys), aligner.size
    images = np.empty((n, size, size, 3), np.uint8)
    found = np.zeros(n, bool)
    boxes = np.full((n, 4), -1, np.int64)
    crops = np.zeros((n, 4), np.int64)
    confidence = np.zeros(n, np.float32)
    for i, key in enumerate(keys):
        rgb = read_rgb(spec.image_dir / key)
        if spec.mode == "crops":
            h, w = rgb.shape[:2]
            crops[i] = (0, 0, w, h)
            images[i] = crop_resize(rgb, (0, 0, w, h), size, aligner.interpolation)
            found[i] = True
        else:
            res = aligner(rgb)
            images[i] = res.image
            found[i] = res.found
            if res.box is not None:
                boxes[i] = res.box
            crops[i] = res.crop
            confidence[i] = res.confidence
        on_image()
    return {
        "images": images,
        "found": found,
        "boxes": boxes,
        "crops": crops,
        "confidence": confidence,
    }


def prepare(
    dataset: str | Path,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    limit: int | None = None,
    keys: Sequence[str] | None = None,
    progress: bool = True,
    chunk_size: int = 256,
    aligner: Aligner | None = None,
    force: bool = False,
) -> Path:
    """Build (or finish building) the aligned cache of ``dataset``; return its folder.

    ``dataset`` is ``"lfw"``, ``"cfp"``, ``"celeba"`` or a folder of ``<identity>/<image>``.
    ``limit`` keeps the first N keys, ``keys`` an explicit subset; both go to separately named
    caches. An existing complete cache built with the same keys and settings is returned as is
    (unless ``force``). ``aligner`` defaults to ``Aligner(prefer_center=True)`` for LFW,
    ``Aligner(fallback="image")`` for CFP's loose crops and ``Aligner()`` otherwise.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    spec = dataset_spec(dataset, data_root=data_root, keys=keys, limit=limit)
    if aligner is None:
        aligner = Aligner(prefer_center=spec.prefer_center, fallback=spec.fallback)
    settings = _settings_for(spec, aligner)
    out = config.cache_dir(cache) / "aligned" / spec.name
    plan = {
        "format": FORMAT_VERSION,
        "dataset": spec.dataset,
        "name": spec.name,
        "source_root": str(spec.image_dir),
        "n": len(spec.keys),
        "keys_sha1": _keys_digest(spec.keys),
        "settings": settings,
        "chunk_size": chunk_size,
    }
    if not force and _is_complete(out, plan):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock(out, progress):
        # Another process may have finished the same build while we waited for the lock.
        if not force and _is_complete(out, plan):
            return out
        _build(spec, plan, out, aligner, chunk_size=chunk_size, progress=progress, force=force)
    return out


def _is_complete(out: Path, plan: dict[str, Any]) -> bool:
    """Whether ``out`` holds a finished cache built with the same keys and settings, its
    ``images.npy`` whole (header and file size; the pixels are not read)."""
    index_path = out / INDEX_FILE
    if not index_path.is_file() or not (out / IMAGES_FILE).is_file():
        return False
    try:
        old = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(old, dict):
        return False
    if not all(old.get(k) == plan[k] for k in ("format", "n", "keys_sha1", "settings")):
        return False
    shape = old.get("image_shape")
    return _images_whole(out / IMAGES_FILE, plan["n"], shape if isinstance(shape, list) else None)


def _images_whole(path: Path, n: int, image_shape: Sequence[int] | None) -> bool:
    """Whether ``path``'s .npy header says uint8 (n, H, W, 3) (``image_shape`` when given) and
    the file holds every byte of it. A truncated file (an interrupted copy, a full disk) keeps a
    valid header, so the size is what tells it apart; reading only the header keeps this cheap
    on caches of a gigabyte."""
    fmt = np.lib.format
    try:
        with path.open("rb") as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:
                return False
            offset = fh.tell()
        size = path.stat().st_size
    except (OSError, ValueError):
        return False
    if dtype != np.uint8 or len(shape) != 4 or shape[0] != n or shape[3] != 3:
        return False
    if image_shape is not None and list(shape[1:]) != list(image_shape):
        return False
    return size == offset + math.prod(shape) * dtype.itemsize


@contextmanager
def _build_lock(out: Path, verbose: bool) -> Iterator[None]:
    """Serialise builds of one cache across processes (released automatically if one dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(out / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if verbose:
                print(f"waiting for another process building {out} ...", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(
    spec: DatasetSpec,
    plan: dict[str, Any],
    out: Path,
    aligner: Aligner,
    *,
    chunk_size: int,
    progress: bool,
    force: bool,
) -> None:
    """Align the missing chunks, then assemble ``images.npy`` and ``index.json`` atomically."""
    partial = out / "partial"
    t0 = time.perf_counter()
    chunk_paths = _align_chunks(spec, plan, partial, aligner, chunk_size, progress, force)
    elapsed = time.perf_counter() - t0
    _assemble(spec, plan, out, chunk_paths, aligner.size, chunk_size, elapsed)
    shutil.rmtree(partial, ignore_errors=True)


def _align_chunks(
    spec: DatasetSpec,
    plan: dict[str, Any],
    partial: Path,
    aligner: Aligner,
    chunk_size: int,
    progress: bool,
    force: bool,
) -> list[Path]:
    """Align every chunk not already in ``partial`` (kept across interrupted builds of the same
    plan); returns the chunk files in order."""
    plan_path = partial / "plan.json"
    if partial.is_dir():
        try:
            same_plan = json.loads(plan_path.read_text()) == plan
        except (OSError, json.JSONDecodeError):
            same_plan = False
        if force or not same_plan:
            shutil.rmtree(partial)  # leftovers of a different build: start over
    partial.mkdir(parents=True, exist_ok=True)
    if not plan_path.is_file():
        _atomic_write_json(plan_path, plan)

    from tqdm import tqdm

    n = len(spec.keys)
    starts = list(range(0, n, chunk_size))
    chunk_paths = [partial / f"chunk_{c:05d}.npz" for c in range(len(starts))]
    done = [
        _read_chunk(p, min(chunk_size, n - s), aligner.size) is not None if p.is_file() else False
        for p, s in zip(chunk_paths, starts, strict=True)
    ]
    already = sum(min(chunk_size, n - s) for s, d in zip(starts, done, strict=True) if d)
    with tqdm(
        total=n, initial=already, desc=f"prepare {spec.name}", unit="img", disable=not progress
    ) as bar:
        for c, s in enumerate(starts):
            if done[c]:
                continue
            arrays = _process_chunk(spec, spec.keys[s : s + chunk_size], aligner, bar.update)
            _write_chunk(chunk_paths[c], arrays)
    return chunk_paths


def _assemble(
    spec: DatasetSpec,
    plan: dict[str, Any],
    out: Path,
    chunk_paths: list[Path],
    size: int,
    chunk_size: int,
    elapsed: float,
) -> None:
    """Stream the chunks into a memory-mapped temporary .npy, rename it into place, then write
    the index (the old index is dropped first, so no reader pairs new images with stale keys)."""
    index_path = out / INDEX_FILE
    n = len(spec.keys)
    starts = list(range(0, n, chunk_size))
    tmp_images = out / f"images.tmp{os.getpid()}.npy"
    try:
        images = np.lib.format.open_memmap(
            tmp_images, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)
        )
        found = np.zeros(n, bool)
        boxes = np.full((n, 4), -1, np.int64)
        crops = np.zeros((n, 4), np.int64)
        confidence = np.zeros(n, np.float32)
        for c, s in enumerate(starts):
            m = min(chunk_size, n - s)
            chunk = _read_chunk(chunk_paths[c], m, size)
            if chunk is None:
                raise RuntimeError(
                    f"chunk file {chunk_paths[c]} vanished or broke during the build"
                )
            images[s : s + m] = chunk["images"]
            found[s : s + m] = chunk["found"]
            boxes[s : s + m] = chunk["boxes"]
            crops[s : s + m] = chunk["crops"]
            confidence[s : s + m] = chunk["confidence"]
        images.flush()
        del images
        index_path.unlink(missing_ok=True)
        os.replace(tmp_images, out / IMAGES_FILE)
    except BaseException:
        tmp_images.unlink(missing_ok=True)  # never leave a half-written array behind
        raise
    index = {
        **plan,
        "keys": spec.keys,
        "found": found.tolist(),
        "boxes": [None if b[0] < 0 else [int(v) for v in b] for b in boxes],
        "crops": crops.tolist(),
        "confidence": [round(float(v), 5) for v in confidence],
        "labels": spec.labels,
        "n_fallback": int((~found).sum()),
        "image_shape": [size, size, 3],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s_last_run": round(elapsed, 2),
    }
    _atomic_write_json(index_path, index)


# ----------------------------------------------------------------------------- loading


@dataclass
class AlignedSet:
    """An aligned cache: ``images`` uint8 (N, H, W, 3) RGB (memory-mapped), ``keys``, ``found``."""

    images: np.ndarray
    keys: list[str]
    found: np.ndarray
    boxes: list[list[int] | None] = field(default_factory=list)
    labels: list[Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    _pos: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._pos = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    @property
    def n_fallback(self) -> int:
        """How many images used the no-face fallback crop."""
        return int((~self.found).sum())

    def index_of(self, key: str) -> int:
        """Row of ``key``; ``KeyError`` naming the key and cache when absent."""
        try:
            return self._pos[key]
        except KeyError:
            raise KeyError(f"key {key!r} is not in the aligned cache {self.path}") from None

    def indices(self, keys: Sequence[str]) -> np.ndarray:
        """Rows of ``keys`` as an int64 array."""
        return np.fromiter((self.index_of(k) for k in keys), dtype=np.int64, count=len(keys))

    def take(self, keys: Sequence[str]) -> np.ndarray:
        """Images of ``keys`` (in that order) as an in-memory uint8 (len(keys), H, W, 3) array."""
        idx = self.indices(keys)
        if len(idx) == 0:
            return np.empty((0, *self.images.shape[1:]), np.uint8)
        return np.asarray(self.images[idx])


def _rebuild_hint(dataset: str | Path, keys: Sequence[str] | None, limit: int | None) -> str:
    """How to rebuild a damaged cache: ``prepare --force``, or, for a subset of keys (no
    command builds those alone), rerunning what built it (``prepare`` rebuilds a damaged one)."""
    if keys is not None:
        return "rerun the command that built it (a damaged subset cache is rebuilt)"
    hint = f"advface prepare {dataset}"
    if limit is not None:
        hint += f" --limit {limit}"
    return f"rebuild it with `{hint} --force`"


def load_aligned(
    dataset: str | Path,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
    mmap: bool = True,
) -> AlignedSet:
    """Open the aligned cache of ``dataset`` built by :func:`prepare` (same ``keys``/``limit``).

    ``data_root`` is accepted for symmetry with :func:`prepare`; caches are located by name in
    the cache directory. Raises ``FileNotFoundError`` telling the user to run ``advface prepare``
    when the cache is missing or incomplete.
    """
    del data_root
    folder = cache_path(dataset, cache=cache, keys=keys, limit=limit)
    index_path, images_path = folder / INDEX_FILE, folder / IMAGES_FILE
    if not index_path.is_file() or not images_path.is_file():
        hint = f"advface prepare {dataset}"
        if limit is not None:
            hint += f" --limit {limit}"
        state = (
            " (a build was interrupted; rerun to resume)" if (folder / "partial").is_dir() else ""
        )
        raise FileNotFoundError(
            f"no aligned cache for {dataset!s} at {folder}{state}: run `{hint}` first"
        )
    rebuild = _rebuild_hint(dataset, keys, limit)
    try:
        meta = json.loads(index_path.read_text())
        keys_list = list(meta["keys"])
        found = np.asarray(meta["found"], dtype=bool)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"aligned cache index {index_path} is damaged ({exc}): {rebuild}") from exc
    try:
        images = np.load(images_path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as exc:
        # A truncated file fails here with numpy's bare "mmap length is greater than file size".
        raise ValueError(
            f"aligned cache images {images_path} are damaged ({exc}): {rebuild}"
        ) from exc
    if images.shape[0] != len(keys_list) or len(found) != len(keys_list):
        raise ValueError(
            f"aligned cache {folder} is inconsistent ({images.shape[0]} images, "
            f"{len(keys_list)} keys, {len(found)} found flags): {rebuild}"
        )
    small = {k: v for k, v in meta.items() if k not in ("keys", "found", "boxes", "crops")}
    return AlignedSet(
        images=images,
        keys=keys_list,
        found=found,
        boxes=meta.get("boxes", []),
        labels=meta.get("labels"),
        meta=small,
        path=folder,
    )
