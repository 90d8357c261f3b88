"""Training sets for reconstruction networks and the check that no test image is in one.

Names: ``lfw-attacker`` (the default: LFW images of every person outside test folds 1-5 and
outside CFP, identity-disjoint from those test sets by name, :mod:`advface.data.splits`;
reconstruction is then tested on folds 1-5), ``lfw-nonpairs`` (LFW images in no View 2 pair:
disjoint by image but NOT by identity: 72% of them show people of the test pairs), ``celeba``
(the CelebA crops: the server's shadow default), or a folder PATH (its aligned cache from
``advface prepare PATH`` if built, else its images read as-is and resized to 160x160, i.e.
assumed to be aligned crops already).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_SETS = ("lfw-attacker", "lfw-nonpairs", "celeba")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Aligned dataset and pair protocols whose images are test images.
TEST_PROTOCOLS = {"lfw": ("lfw",), "cfp": ("cfp-fp", "cfp-ff")}


@dataclass
class TrainSet:
    """uint8 RGB faces (N,160,160,3), their keys, and what the disjointness check found."""

    name: str
    images: np.ndarray
    keys: list[str]
    checks: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def image_digest(image: np.ndarray) -> str:
    """Content hash of one uint8 image (exact pixel equality)."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _read_folder(folder: Path, limit: int | None) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    out = np.empty((len(paths), 160, 160, 3), np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (160, 160):
                    im = im.resize((160, 160), Image.BILINEAR)
                out[i] = np.asarray(im)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            # PIL refuses images past its pixel limit (a decompression bomb) with an error that
            # is not an OSError; either way the folder is not a set of face crops.
            raise ValueError(f"cannot read image {p}: {err}") from err
    return out, [str(p.relative_to(folder)) for p in paths]


def test_keys(root: Path) -> dict[str, set[str]]:
    """Keys of every image in a test pair, per aligned dataset (``lfw``, ``cfp``)."""
    from advface.data.protocols import load_protocol

    out: dict[str, set[str]] = {}
    for dataset, protocols in TEST_PROTOCOLS.items():
        keys: set[str] = set()
        for name in protocols:
            try:
                keys |= set(load_protocol(name, root, check_files=False).unique_keys())
            except FileNotFoundError as err:
                warnings.warn(f"test protocol {name} unavailable ({err})", stacklevel=2)
        out[dataset] = keys
    return out


def check_disjoint(train: TrainSet, root: Path, *, dataset: str | None = None) -> dict[str, Any]:
    """Raise ``ValueError`` when a test image (any LFW or CFP pair image) is in ``train``.

    Two checks: keys (when the training set is drawn from the test dataset ``dataset``) and
    exact pixel content against every aligned test image whose cache exists (this catches the
    same face under another name or in a folder copy). Returns what was checked.
    """
    from advface.data.prepare import load_aligned

    tests = test_keys(root)
    report: dict[str, Any] = {"test_images": {d: len(k) for d, k in tests.items()}}
    if dataset in tests:
        clash = sorted(set(train.keys) & tests[dataset])
        if clash:
            raise ValueError(
                f"training set {train.name} contains {len(clash)} test image(s) of {dataset}, "
                f"e.g. {clash[0]!r}"
            )
        report["key_check"] = dataset
    train_digests = {image_digest(im): k for im, k in zip(train.images, train.keys, strict=True)}
    checked = []
    for d, keys in tests.items():
        try:
            aligned = load_aligned(d)
        except FileNotFoundError:
            warnings.warn(
                f"no aligned cache for {d}: content check against it skipped", stacklevel=2
            )
            continue
        cached = set(aligned.keys)
        present = [k for k in sorted(keys) if k in cached]
        for start in range(0, len(present), 512):
            chunk = present[start : start + 512]
            for k, im in zip(chunk, aligned.take(chunk), strict=True):
                hit = train_digests.get(image_digest(im))
                if hit is not None:
                    raise ValueError(
                        f"training set {train.name}: image {hit!r} equals test image {d}:{k}"
                    )
        checked.append(f"{d} ({len(present)} images)")
    report["content_check"] = checked
    return report


def load_train_set(
    name: str, *, data_root: str | Path | None = None, limit: int | None = None
) -> TrainSet:
    """Load ``lfw-attacker``, ``lfw-nonpairs``, ``celeba`` or a folder PATH (first ``limit``
    images) and verify that it holds no test image (:func:`check_disjoint`); ``lfw-attacker``
    is also checked to share no identity with LFW folds 1-5 or CFP (its ``checks`` say so)."""
    from advface import config
    from advface.data.prepare import load_aligned
    from advface.data.protocols import lfw_nonpair_keys

    if limit is not None and limit < 2:
        raise ValueError(f"limit must be >= 2, got {limit}")
    root = config.data_root(data_root)
    dataset: str | None = None
    identity_check: dict | None = None
    if name == "lfw-attacker":
        from advface.data.splits import lfw_attacker_split

        split = lfw_attacker_split(root)
        aligned = load_aligned("lfw")
        cached = set(aligned.keys)
        keys = [k for k in split.keys if k in cached]
        keys = keys[:limit] if limit is not None else keys
        images, dataset = aligned.take(keys), "lfw"
        identity_check = split.notes["identity_check"]
    elif name == "lfw-nonpairs":
        aligned = load_aligned("lfw")
        cached = set(aligned.keys)
        keys = [k for k in lfw_nonpair_keys(root) if k in cached]
        keys = keys[:limit] if limit is not None else keys
        images, dataset = aligned.take(keys), "lfw"
    elif name == "celeba":
        aligned = load_aligned("celeba")
        keys = aligned.keys[:limit] if limit is not None else list(aligned.keys)
        images = aligned.take(keys)
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"unknown training set {name!r}: use {' | '.join(TRAIN_SETS)} or a folder"
            )
        folder = folder.resolve()
        for test_dir in ("lfw", "cfp"):
            if folder.is_relative_to(root / test_dir) or (root / test_dir).is_relative_to(folder):
                raise ValueError(f"{folder} overlaps the test dataset folder {root / test_dir}")
        try:
            aligned = load_aligned(folder)
            keys = aligned.keys[:limit] if limit is not None else list(aligned.keys)
            images = aligned.take(keys)
        except FileNotFoundError:
            images, keys = _read_folder(folder, limit)
    if len(keys) < 2:
        raise ValueError(f"training set {name} has {len(keys)} image(s); need at least 2")
    train = TrainSet(name, images, keys)
    train.checks = check_disjoint(train, root, dataset=dataset)
    if identity_check is not None:
        train.checks["identity_check"] = identity_check
    return train
