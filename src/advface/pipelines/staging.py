"""Stage data and weights for a remote GPU machine that sees neither the data root nor the
wheels.

Each command sent to it carries at most 64 MiB (working tree included), so a stage is a folder
of parts, each carried by one command and each under ``part_mib`` (choose it so that a part
and the repository's working tree fit one transfer):

- ``part-00/``: ``manifest.json`` (format, datasets, every part's sha256, fidelity figures),
  ``meta.tar`` (the protocol text files) and the first shard of the converted FaceNet weights
  in float16 (47 MB instead of 94, split into ``facenet-fp16-NN.safetensors`` shards, one per
  part, as ``part_mib`` requires);
- the next parts: the other weight shards, then ``images.tar`` (from the room the last shard
  leaves on): every aligned face of the staged datasets, JPEG-encoded (quality 95 by default;
  8 KB a face instead of 77 KB as uint8) at its original path.

:func:`unstage` checks every part against the manifest and writes a *staged data root*: the
original layout and protocol files, each image replaced by its aligned 160x160 crop, and the
marker :data:`advface.data.prepare.STAGED_MARKER`, which makes ``prepare`` read them as crops
instead of running MTCNN again. Every pipeline then runs unchanged on the device. The price is
one JPEG re-encoding of the aligned faces; :func:`stage` measures it (PSNR, mean absolute error)
and the fp16 weights' embedding error, and records both in the manifest.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advface.fileio import atomic_folder, sha256_file

STAGE_FORMAT = 2
MANIFEST = "manifest.json"
#: The fp16 weights in a staged data root (the shards merged).
WEIGHTS_FILE = "facenet-fp16.safetensors"
WEIGHTS_SHARD = "facenet-fp16-{:02d}.safetensors"
#: Room a weights shard leaves in its part: part-00 also holds meta.tar and the manifest.
_META_ROOM = 4 * 2**20
#: A safetensors header entry per tensor (name, dtype, shape, offsets), generously.
_TENSOR_HEADER = 256
STAGE_DATASETS = ("lfw", "cfp", "celeba")
_TAR_BLOCK = 512
_MARGIN = 64 * 1024  # tar end-of-archive records and rounding
# What a manifest may name: plain names only, never a path out of the stage folder.
_PART_NAME = re.compile(r"part-\d{2,}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _protocol_files(dataset: str, root: Path, keys: Sequence[str]) -> dict[str, bytes]:
    """The text files the protocols read, relative to the data root."""
    if dataset == "lfw":
        # CFP's names and image lists too: the LFW attackers leave out CFP's people, which
        # needs only these files (no CFP image) on a machine that stages LFW alone.
        names = (
            "lfw/pairs.txt",
            "cfp/Data/list_name.txt",
            "cfp/Protocol/Pair_list_F.txt",
            "cfp/Protocol/Pair_list_P.txt",
        )
        return {n: (root / n).read_bytes() for n in names if (root / n).is_file()}
    if dataset == "cfp":
        proto = root / "cfp/Protocol"
        files = sorted(p for p in proto.rglob("*.txt") if p.is_file())
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}
    # CelebA: only the staged crops' identities (the official file lists 202,599 images).
    wanted = set(keys)
    lines = (root / "celeba/identity_CelebA.txt").read_text().splitlines()
    kept = [ln for ln in lines if ln.split()[:1] and ln.split()[0] in wanted]
    return {"celeba/identity_CelebA.txt": ("\n".join(kept) + "\n").encode()}


def _encode(image: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    import cv2

    ok, buf = cv2.imencode(".jpg", image[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return buf.tobytes(), decoded


def _facenet_fp16(cache: str | Path | None) -> tuple[Any, dict[str, Any]]:
    """FaceNet (float32) and its state dict in float16."""
    from advface.models.facenet import load_facenet

    model = load_facenet(cache=cache)
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    return model, state


def _shards(state: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """``state`` split, in order, into dicts of at most ``limit`` bytes as safetensors files."""
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in state.items():
        need = tensor.numel() * tensor.element_size() + _TENSOR_HEADER
        if need > limit:
            raise ValueError(f"weight {name} ({need} bytes) does not fit a part of {limit} bytes")
        if size + need > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += need
    return shards


def _fp16_error(model: Any, state: dict[str, Any], probe: np.ndarray) -> dict[str, float]:
    """What float16 weights cost: FaceNet's embeddings of ``probe`` faces, fp32 vs fp16."""
    import torch

    from advface.models.facenet import InceptionResnetV1, preprocess

    half = InceptionResnetV1()
    half.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    with torch.no_grad():
        x = preprocess(probe)
        a, b = model(x), half.eval()(x)
    cos = torch.nn.functional.cosine_similarity(a, b)
    return {
        "probe_faces": len(probe),
        "max_abs_embedding_diff": float((a - b).abs().max()),
        "min_cosine": float(cos.min()),
    }


class _PartWriter:
    """Appends files to ``part-NN/images.tar``: first into the room ``used`` leaves in part
    ``last`` (the last weights part), then into new parts, each started before one would
    overflow."""

    def __init__(self, dest: Path, limit: int, last: Path, used: int) -> None:
        self.dest, self.limit = dest, limit
        self.folder, self.size, self.tar = last, used, None
        self.index = int(last.name.removeprefix("part-"))
        self.parts: list[Path] = []  # the parts it started

    def add(self, name: str, data: bytes) -> None:
        need = _TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
        full = self.size + need > self.limit - _MARGIN
        if full:
            self.close()
            self.index += 1
            self.folder = _mkdir(self.dest / f"part-{self.index:02d}")
            self.parts.append(self.folder)
            self.size = 0
        if self.tar is None:
            self.tar = tarfile.open(self.folder / "images.tar", "w")  # noqa: SIM115 - closed by close()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))
        self.size += need

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _check_stage_args(
    datasets: Sequence[str], quality: int, part_mib: float, celeba_part: str, dest: Path
) -> None:
    unknown = sorted(set(datasets) - set(STAGE_DATASETS))
    if unknown or not datasets:
        raise ValueError(f"datasets must be a non-empty subset of {STAGE_DATASETS}, got {datasets}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if not 8.0 <= part_mib <= 62.0:
        # Below 8 MiB part-00 has no room for a weights shard beside the protocol files; a
        # transfer carries 64 MiB with the working tree.
        raise ValueError(f"part_mib must be in [8, 62], got {part_mib}")
    if dest.exists():
        raise FileExistsError(f"{dest} exists; remove it or choose another folder")
    if celeba_part not in ("all", "server", "attacker"):
        raise ValueError(f"celeba_part must be all, server or attacker, got {celeba_part!r}")


def _stage_dataset(
    d: str,
    root: Path,
    cache: str | Path | None,
    celeba_part: str,
    quality: int,
    writer: _PartWriter,
    meta: dict[str, bytes],
    progress: bool,
) -> tuple[dict[str, Any], np.ndarray]:
    """Add one dataset's aligned faces (as JPEG) to ``writer`` and its protocol files to
    ``meta``; returns its manifest entry (count, fallbacks, JPEG fidelity) and its faces."""
    from tqdm.auto import tqdm

    from advface.data.prepare import dataset_spec
    from advface.pipelines.data import aligned_images

    spec = dataset_spec(d, data_root=root)  # every image, where the protocols look
    keys, image_dir = spec.keys, spec.image_dir.relative_to(root).as_posix()
    if d == "celeba" and celeba_part != "all":
        from advface.data.splits import celeba_split

        keep = set(celeba_split(root, celeba_part).keys)
        keys = [k for k in keys if k in keep]
    images, found = aligned_images(d, keys, data_root=root, cache=cache, progress=progress)
    meta.update(_protocol_files(d, root, keys))
    err_sum, sq_sum, nbytes = 0.0, 0.0, 0
    for key, image in tqdm(
        zip(keys, images, strict=True),
        total=len(keys),
        desc=f"stage {d}",
        disable=not progress,
        unit="img",
    ):
        data, decoded = _encode(np.asarray(image), quality)
        diff = decoded.astype(np.float64) - image
        err_sum += float(np.abs(diff).mean())
        sq_sum += float((diff**2).mean())
        nbytes += len(data)
        writer.add(f"{image_dir}/{key}", data)
    mse = sq_sum / len(keys)
    entry = {
        "images": len(keys),
        "mtcnn_fallbacks": int((~np.asarray(found)).sum()),
        "jpeg_bytes": nbytes,
        "jpeg_mean_abs_error": round(err_sum / len(keys), 4),
        "jpeg_psnr_db": round(10 * np.log10(255.0**2 / mse), 2) if mse else None,
    }
    return entry, images


def _write_meta(first: Path, meta: dict[str, bytes]) -> None:
    with tarfile.open(first / "meta.tar", "w") as tar:
        for name, data in sorted(meta.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def stage(
    dest: str | Path,
    *,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    datasets: Sequence[str] = STAGE_DATASETS,
    part_mib: float = 40.0,
    quality: int = 95,
    celeba_part: str = "all",
    progress: bool = True,
) -> dict[str, Any]:
    """Write a stage into ``dest`` (which must not exist yet); returns the manifest.

    ``celeba_part="server"`` stages only the server half of CelebA's identities
    (:func:`advface.data.splits.celeba_split`), all the robustness bench needs of it: one
    transfer fewer.

    Uses (or builds) the full aligned caches of ``datasets``. Written into a temporary folder
    and renamed, so an interrupted run leaves no stage behind.
    """
    from advface import config

    dest = Path(dest)
    _check_stage_args(datasets, quality, part_mib, celeba_part, dest)
    root = config.data_root(data_root)
    t0 = time.perf_counter()
    limit = int(part_mib * 2**20)
    model, state = _facenet_fp16(cache)
    shards = _shards(state, limit - _META_ROOM)
    with atomic_folder(dest) as tmp:
        first = tmp / "part-00"
        weight_parts = [_mkdir(tmp / f"part-{i:02d}") for i in range(len(shards))]
        weight_files = _write_shards(shards, weight_parts)
        used = sum(f.stat().st_size for f in weight_parts[-1].iterdir())
        writer = _PartWriter(
            tmp, limit, weight_parts[-1], used + (_META_ROOM if len(shards) == 1 else 0)
        )
        meta: dict[str, bytes] = {}
        report: dict[str, Any] = {}
        probe = None
        for d in datasets:
            report[d], images = _stage_dataset(
                d, root, cache, celeba_part, quality, writer, meta, progress
            )
            probe = images[:32] if probe is None else probe
        writer.close()
        _write_meta(first, meta)
        weights = _fp16_error(model, state, probe)
        parts = [*weight_parts, *writer.parts]
        manifest = {
            "format": STAGE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "datasets": report,
            "jpeg_quality": quality,
            "part_mib": part_mib,
            "celeba_part": celeba_part,
            "weights": {"files": weight_files, "dtype": "float16", **weights},
            "parts": {p.name: {f.name: sha256_file(f) for f in sorted(p.iterdir())} for p in parts},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        for p in parts:
            size = sum(f.stat().st_size for f in p.iterdir())
            if size > part_mib * 2**20:
                raise RuntimeError(f"{p.name} is {size / 2**20:.1f} MiB, over {part_mib}")
        (first / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write_shards(shards: list[dict[str, Any]], folders: list[Path]) -> list[str]:
    """One weights shard per folder; returns their ``part-NN/file`` names, in order."""
    from safetensors.torch import save_file

    names = []
    for i, (shard, folder) in enumerate(zip(shards, folders, strict=True)):
        name = WEIGHTS_SHARD.format(i)
        meta = {"source": "advface stage", "dtype": "float16", "shard": f"{i + 1}/{len(shards)}"}
        save_file(shard, str(folder / name), metadata=meta)
        names.append(f"{folder.name}/{name}")
    return names


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    """The stage's manifest, its structure checked: unstaging trusts its part and file names
    as paths, so a damaged one must fail here, by name, not half-way through."""
    path = Path(stage_dir) / "part-00" / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {stage_dir} is not a stage (no part-00)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable stage manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path}: a stage manifest is a JSON object, got {type(manifest).__name__}"
        )
    if manifest.get("format") != STAGE_FORMAT:
        raise ValueError(f"{path}: stage format {manifest.get('format')} != {STAGE_FORMAT}")
    _check_parts(path, manifest.get("parts"))
    _check_weights(path, manifest)
    return manifest


def _check_weights(path: Path, manifest: dict[str, Any]) -> None:
    """``weights.files`` must name files the manifest's parts list (so verify checks them)."""
    weights = manifest.get("weights")
    files = weights.get("files") if isinstance(weights, dict) else None
    if not isinstance(files, list) or not files:
        raise ValueError(f"{path}: 'weights.files' must list the weight shards (part-NN/file)")
    for entry in files:
        part, _, name = str(entry).partition("/")
        if name not in manifest["parts"].get(part, {}):
            raise ValueError(f"{path}: weight shard {entry!r} is not a file of the stage's parts")


def _check_parts(path: Path, parts: Any) -> None:
    """``parts`` must be {"part-NN": {file name: sha256}}."""
    if not isinstance(parts, dict) or not parts:
        raise ValueError(f"{path}: 'parts' must map part names to their files' sha256 sums")
    for name, files in parts.items():
        if not _PART_NAME.fullmatch(name):
            raise ValueError(f"{path}: {name!r} is not a part name (part-NN)")
        if not isinstance(files, dict):
            raise ValueError(f"{path}: part {name} must map file names to sha256 sums")
        for fname, digest in files.items():
            if not _FILE_NAME.fullmatch(fname) or not (
                isinstance(digest, str) and _SHA256.fullmatch(digest)
            ):
                raise ValueError(f"{path}: part {name} lists {fname!r} without a valid sha256")


def verify(stage_dir: str | Path, parts: Sequence[str] | None = None) -> dict[str, Any]:
    """Check ``parts`` (default: all) of a stage against its manifest's sha256 sums."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    names = list(manifest["parts"]) if parts is None else list(parts)
    for name in names:
        if name not in manifest["parts"]:
            raise ValueError(f"{name} is not a part of stage {stage_dir}")
    missing = [n for n in names if not (stage_dir / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"stage {stage_dir} lacks {', '.join(missing)} (of {len(manifest['parts'])} parts)"
        )
    for name in names:
        for fname, digest in manifest["parts"][name].items():
            path = stage_dir / name / fname
            if not path.is_file() or sha256_file(path) != digest:
                raise ValueError(f"{path} is missing or damaged (sha256 mismatch)")
    return manifest


def _staged_from(marker: Path) -> Any:
    """The manifest a staged data root records (None when it has no readable marker)."""
    try:
        return json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def unstage(stage_dir: str | Path, root: str | Path) -> Path:
    """Verify a stage and write its staged data root at ``root`` (atomically); returns ``root``.

    An existing ``root`` made from the same stage is reused; any other existing ``root`` is an
    error. The fp16 weight shards are merged into ``root/facenet-fp16.safetensors``.
    """
    from advface.data.prepare import STAGED_MARKER

    stage_dir, root = Path(stage_dir), Path(root)
    manifest = verify(stage_dir)
    if root.exists():
        if _staged_from(root / STAGED_MARKER) == manifest:
            return root
        raise FileExistsError(f"{root} exists and was not made from {stage_dir}")
    with atomic_folder(root) as tmp:
        for name, files in manifest["parts"].items():
            for tar_name in ("meta.tar", "images.tar"):
                if tar_name not in files:  # only what verify() checked is unpacked
                    continue
                path = stage_dir / name / tar_name
                try:
                    with tarfile.open(path) as tar:
                        tar.extractall(tmp, filter="data")
                except tarfile.TarError as exc:
                    raise ValueError(f"{path} cannot be unpacked: {exc}") from exc
        _merge_shards([stage_dir / f for f in manifest["weights"]["files"]], tmp / WEIGHTS_FILE)
        (tmp / STAGED_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
    return root


def _merge_shards(shards: list[Path], dest: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    state: dict[str, Any] = {}
    for path in shards:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable weights shard: {exc}") from exc
    save_file(state, str(dest), metadata={"source": "advface stage", "dtype": "float16"})
