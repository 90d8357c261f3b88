"""Bulk protection: many feature maps (or aligned faces through E) into resumable shards.

The engine-independent part of ``advface protect-bulk``: reading the sources, the shard plan,
the manifest, resume and the atomic shard writes. ``run_bulk(engine="ray")`` distributes the
shards over Ray Data actors (``map_batches``), each holding one protection; ``engine="serial"``
runs the same shard function in this process. Ray is imported only when it is used.

Sources (SRC: one file, or a folder of them, in name order):

- ``.safetensors`` holding ``z`` (N,C,H,W) float feature maps, as ``advface protect`` reads them,
  or ``images`` (N,160,160,3) uint8 aligned faces, which E turns into feature maps; other tensors
  whose first dimension is N (keys, labels) are carried into the shards row by row;
- ``.npy`` arrays of either kind (e.g. ``images.npy`` of an ``advface prepare`` cache);
- the DST folder of an earlier ``protect-bulk`` run (its ``shards/``): re-protecting a gallery,
  into another DST (a source inside DST is refused).

DST holds ``manifest.json`` (format, plan id, the plan - sources, shard size, batch size, seed,
protection record with network fingerprints, E's fingerprint, every shard's rows - and the last
run's summary) and ``shards/shard-NNNNN.safetensors`` (``z`` protected, ``index`` = row number
in the sources' order, the carried tensors; metadata: plan id, protection record). A shard is
written to a temporary file and renamed, so a shard file is complete or absent; a rerun with the
same plan skips the shards present and computes the rest. A different plan is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from advface.models.recon.checkpoint import atomic_write_bytes
from advface.pipelines.protect import atomic_save
from advface.protection.base import FEATURE_SHAPE, Protection, check_int

FORMAT = "advface-bulk/1"
MANIFEST = "manifest.json"
SHARDS = "shards"
FEATURE_KEY, IMAGE_KEY, INDEX_KEY = "z", "images", "index"
IMAGE_SHAPE = (160, 160, 3)
NETWORK_METHODS = ("advface", "embedding-shadow")
ENGINES = ("ray", "serial")
# Rows read at once by the NaN/shape pre-check (bounded memory on big sources).
CHECK_CHUNK = 256

log = logging.getLogger("advface.bulk")


# -- sources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFile:
    """One input file: its kind (``z`` feature maps or ``images``), rows and row tensors."""

    path: str
    kind: str
    rows: int
    shape: tuple[int, ...]
    size_bytes: int
    mtime_ns: int
    carried: tuple[str, ...] = ()
    protection: str = ""  # the record of a protection already applied (its metadata)


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            shapes, dtypes = {}, {}
            for k in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
                sl = fh.get_slice(k)
                shapes[k], dtypes[k] = tuple(sl.get_shape()), str(sl.get_dtype())
        return meta, shapes, dtypes
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def _describe(path: Path, feature_shape: tuple[int, ...] | None) -> SourceFile:
    """Read one source's header (no data) and check its shapes (``feature_shape`` None: any
    (C, H, W) for feature maps)."""
    st = path.stat()
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable .npy array: {exc}") from exc
        kind = IMAGE_KEY if arr.dtype == np.uint8 else FEATURE_KEY
        shape, dtype, carried, meta = tuple(arr.shape), str(arr.dtype), (), {}
    else:
        meta, shapes, dtypes = _header(path)
        if FEATURE_KEY in shapes:
            kind = FEATURE_KEY
        elif IMAGE_KEY in shapes:
            kind = IMAGE_KEY
        else:
            found = ", ".join(shapes) or "nothing"
            raise ValueError(f"{path} holds no tensor 'z' or 'images' (found: {found})")
        shape, dtype = shapes[kind], dtypes[kind]
        carried = tuple(
            k for k, s in shapes.items() if k not in (kind, INDEX_KEY) and s[:1] == shape[:1]
        )
    want = IMAGE_SHAPE if kind == IMAGE_KEY else feature_shape or shape[1:]
    if len(shape) != 4 or shape[0] < 1 or tuple(shape[1:]) != tuple(want):
        dims = ", ".join(map(str, want)) if len(want) == 3 else "C, H, W"
        raise ValueError(f"{path}: {kind!r} must be (N, {dims}), got {shape}")
    if kind == FEATURE_KEY and not dtype.lower().startswith(("f", "bf")):
        raise ValueError(f"{path}: feature maps must be floating point, got {dtype}")
    if kind == IMAGE_KEY and dtype.lower() not in ("u8", "uint8"):
        raise ValueError(f"{path}: aligned faces must be uint8, got {dtype}")
    return SourceFile(
        str(path.resolve()),
        kind,
        shape[0],
        shape,
        st.st_size,
        st.st_mtime_ns,
        carried,
        meta.get("protection", ""),
    )


def scan_sources(
    src: str | Path, *, feature_shape: tuple[int, ...] | None = FEATURE_SHAPE
) -> list[SourceFile]:
    """The source files of SRC (a file, a folder of files, or an earlier bulk DST), checked."""
    src = Path(src)
    if not src.exists():
        raise ValueError(f"input {src} does not exist")
    if src.is_file():
        files = [src]
    else:
        folder = src / SHARDS if (src / MANIFEST).is_file() else src
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".npy")
        )
        if not files:
            raise ValueError(f"{folder} holds no .safetensors or .npy files")
    sources = [_describe(p, feature_shape) for p in files]
    kinds = {s.kind for s in sources}
    if len(kinds) > 1:
        raise ValueError(f"{src} mixes feature maps and aligned faces; give one kind")
    return sources


def read_rows(source: SourceFile, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``[start, stop)`` of a source: its main tensor under its kind and the carried ones."""
    path = Path(source.path)
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        return {source.kind: torch.from_numpy(np.array(arr[start:stop]))}
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_slice(k)[start:stop] for k in (source.kind, *source.carried)}


def check_values(sources: list[SourceFile], chunk: int = CHECK_CHUNK) -> None:
    """Raise ``ValueError`` naming the first row of a feature map with NaN or Inf."""
    for s in sources:
        if s.kind != FEATURE_KEY:
            continue  # uint8 faces are finite by type
        for start in range(0, s.rows, chunk):
            z = read_rows(s, start, min(s.rows, start + chunk))[FEATURE_KEY]
            bad = (~torch.isfinite(z.float())).flatten(1).any(1)
            if bool(bad.any()):
                row = start + int(bad.nonzero()[0, 0])
                raise ValueError(f"{s.path} face {row}: feature map contains NaN or Inf")


# -- protection, built where it runs --------------------------------------------------------
@dataclass(frozen=True)
class ProtectionFactory:
    """What each worker needs to build its protection (and E for aligned faces) once.

    ``spec``: a protection spec (``advface:CKPT,steps=40``, ``random,seed=3``, ``none``; see
    ``advface.protection.spec``). ``weights``: FaceNet weights for E (default: the converted
    model). ``extractor``: a module used as E instead of FaceNet (tests, other backbones).
    """

    spec: str
    weights: str | None = None
    device: str = "cpu"
    extractor: torch.nn.Module | None = field(default=None, compare=False)

    @property
    def method(self) -> str:
        from advface.protection import parse_spec

        return parse_spec(self.spec)[0]

    def build(self, need_extractor: bool) -> tuple[Protection, torch.nn.Module | None]:
        """(protection, E or None); E is loaded when the method or the input needs it."""
        from advface.protection import protection_from_spec

        extractor, head = self.extractor, None
        if extractor is None and (need_extractor or self.method in NETWORK_METHODS):
            from advface.models.facenet import load_facenet
            from advface.models.split import split_facenet

            extractor, head = split_facenet(load_facenet(self.weights))
        if extractor is not None:
            extractor = extractor.eval().to(self.device)
        prot = protection_from_spec(self.spec, extractor=extractor, head=head, device=self.device)
        return prot, extractor


def extractor_fingerprint(extractor: torch.nn.Module | None) -> str:
    """sha256 of E's weights (the model version of maps computed from faces), or ''."""
    if extractor is None:
        return ""
    from advface.protection.advface import fingerprint

    return fingerprint(extractor)


# -- plan and manifest ----------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    name: str
    source: int
    start: int
    stop: int
    first_row: int  # row number of ``start`` in the order of all sources


def make_shards(sources: list[SourceFile], shard_size: int) -> list[Shard]:
    """Contiguous row ranges of at most ``shard_size`` rows, never across two files."""
    shard_size = check_int("shard_size", shard_size, low=1)
    out, row = [], 0
    for i, s in enumerate(sources):
        for start in range(0, s.rows, shard_size):
            stop = min(s.rows, start + shard_size)
            out.append(Shard(f"shard-{len(out):05d}", i, start, stop, row + start))
        row += s.rows
    return out


@dataclass
class BulkPlan:
    """Everything a shard's content depends on; ``plan_id`` is its hash."""

    sources: list[SourceFile]
    shards: list[Shard]
    shard_size: int
    batch_size: int
    seed: int | None
    spec: str
    protection: dict[str, Any]
    extractor_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": [asdict(s) for s in self.sources],
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "spec": self.spec,
            "protection": self.protection,
            "extractor_sha256": self.extractor_sha256,
            "shards": [asdict(s) for s in self.shards],
        }

    @property
    def plan_id(self) -> str:
        blob = json.dumps(self.to_json(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def shard_path(dst: Path, shard: Shard) -> Path:
    return dst / SHARDS / f"{shard.name}.safetensors"


def shard_done(dst: Path, shard: Shard, plan_id: str) -> bool:
    """A complete shard of this plan is there (a shard of another plan does not count)."""
    path = shard_path(dst, shard)
    if not path.is_file():
        return False
    try:
        meta, shapes, _ = _header(path)
    except ValueError:
        return False
    rows = shapes.get(FEATURE_KEY, (0,))[0]
    return meta.get("bulk_plan_id") == plan_id and rows == shard.stop - shard.start


def write_manifest(dst: Path, plan: BulkPlan, run: dict[str, Any] | None = None) -> None:
    body = {"format": FORMAT, "plan_id": plan.plan_id, "plan": plan.to_json(), "run": run or {}}
    atomic_write_bytes(
        dst / MANIFEST, json.dumps(body, indent=1, sort_keys=True, default=str).encode()
    )


def read_manifest(dst: str | Path) -> dict[str, Any]:
    path = Path(dst) / MANIFEST
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable bulk manifest: {exc}") from exc
    if body.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    return body


def _plan_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "plan"


def check_apart(src: Path, dst: Path) -> None:
    """Refuse a source that is DST or lies inside it: a rerun with other settings deletes DST's
    shards before computing, and these would be the rows it is about to read."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s.is_relative_to(d):
        raise ValueError(
            f"input {src} lies inside the output {dst}: write the protected copy to another folder"
        )


def open_destination(dst: Path, plan: BulkPlan, *, overwrite: bool) -> list[Shard]:
    """Create DST (or reopen a run of the same plan); return the shards still to compute."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"output {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not (dst / MANIFEST).is_file():
            raise ValueError(f"output {dst} is not empty and holds no {MANIFEST}")
        old = read_manifest(dst)
        if old["plan_id"] != plan.plan_id:
            if not overwrite:
                raise ValueError(
                    f"output {dst} holds a bulk run with other settings "
                    f"({_plan_diff(old['plan'], plan.to_json())} differ): use another folder "
                    "or --overwrite"
                )
            for p in (dst / SHARDS).glob("*.safetensors"):
                p.unlink()
    elif not dst.parent.is_dir():
        raise ValueError(f"output folder {dst.parent} does not exist")
    (dst / SHARDS).mkdir(parents=True, exist_ok=True)
    for tmp in (dst / SHARDS).glob(".*.tmp"):  # shards a killed run was writing
        tmp.unlink(missing_ok=True)
    write_manifest(dst, plan)
    return [s for s in plan.shards if not shard_done(dst, s, plan.plan_id)]


# -- one shard ------------------------------------------------------------------------------
def shard_generator(seed: int | None, shard: Shard) -> torch.Generator | None:
    """A CPU generator per shard from (seed, first row): the same noise whichever worker runs
    it and however often it is rerun."""
    if seed is None:
        return None
    state = np.random.SeedSequence([seed, shard.first_row]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def protect_shard(
    plan: BulkPlan,
    shard: Shard,
    dst: Path,
    protection: Protection,
    extractor: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Protect one shard batch by batch and write it atomically; returns rows and seconds.

    Bad data (NaN, values a protection refuses) raises ``ValueError`` naming the rows.
    """
    from advface.models.facenet import preprocess

    t0, c0 = time.perf_counter(), time.process_time()
    source = plan.sources[shard.source]
    rows = read_rows(source, shard.start, shard.stop)
    gen = shard_generator(plan.seed, shard)
    out = []
    for b in range(0, shard.stop - shard.start, plan.batch_size):
        x = rows[source.kind][b : b + plan.batch_size]
        first = shard.start + b
        try:
            if source.kind == IMAGE_KEY:
                assert extractor is not None
                dev = next(extractor.parameters()).device
                with torch.inference_mode():
                    x = extractor(preprocess(x.numpy()).to(dev)).float().cpu()
            out.append(protection.protect(x, generator=gen).cpu())
        except ValueError as exc:
            last = first + len(x) - 1
            raise ValueError(f"{source.path} faces {first}..{last}: {exc}") from exc
    tensors = {k: v for k, v in rows.items() if k != source.kind}
    tensors[FEATURE_KEY] = torch.cat(out)
    tensors[INDEX_KEY] = torch.arange(shard.first_row, shard.first_row + len(tensors["z"]))
    meta = {
        "bulk_plan_id": plan.plan_id,
        "shard": shard.name,
        "source": source.path,
        "rows": f"{shard.start}:{shard.stop}",
        "protection": json.dumps(plan.protection, sort_keys=True),
        "protection_batch_size": str(plan.batch_size),
    }
    if source.protection:
        meta["protection_previous"] = source.protection
    atomic_save(tensors, shard_path(dst, shard), meta)
    return {
        "shard": shard.name,
        "rows": shard.stop - shard.start,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,  # the whole worker process: one shard at a time
    }


def read_bulk(dst: str | Path) -> dict[str, torch.Tensor]:
    """All shards of a finished run, concatenated in row order (small runs, tests)."""
    dst = Path(dst)
    body = read_manifest(dst)
    parts: dict[str, list[torch.Tensor]] = {}
    for s in body["plan"]["shards"]:
        path = dst / SHARDS / f"{s['name']}.safetensors"
        if not path.is_file():
            raise ValueError(f"{path} is missing: the run is not finished (rerun to resume)")
        with safe_open(str(path), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118
                parts.setdefault(k, []).append(fh.get_tensor(k))
    return {k: torch.cat(v) for k, v in parts.items()}


# -- engines --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayOptions:
    """Ray resources: actors (each holds one protection), CPUs/GPUs per actor, cluster."""

    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = None
    num_cpus: int | None = None  # local Ray only; default: actors x cpus_per_actor

    def __post_init__(self) -> None:
        check_int("actors", self.actors, low=1)
        if not self.cpus_per_actor > 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")
        if self.num_cpus is not None:
            check_int("num_cpus", self.num_cpus, low=1)


class ShardWorker:
    """Ray Data actor: builds the protection once, then protects whole shards per call.

    Errors in the data come back as rows (``error``) instead of exceptions, so the driver can
    report them as they are; any other failure propagates through Ray.
    """

    def __init__(self, factory: ProtectionFactory, plan: BulkPlan, dst: str, threads: int) -> None:
        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        self.plan, self.dst = plan, Path(dst)
        need_e = plan.sources[0].kind == IMAGE_KEY
        self.protection, self.extractor = factory.build(need_e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data may call from another thread than __init__'s: set the threads here too.
        torch.set_num_threads(self.threads)
        names, rows, secs, cpus, errors = [], [], [], [], []
        for i in batch["shard"]:
            shard = self.plan.shards[int(i)]
            try:
                r = protect_shard(self.plan, shard, self.dst, self.protection, self.extractor)
                rows.append(r["rows"])
                secs.append(r["seconds"])
                cpus.append(r["cpu_seconds"])
                errors.append("")
            except ValueError as exc:
                rows.append(0)
                secs.append(0.0)
                cpus.append(0.0)
                errors.append(str(exc))
            names.append(shard.name)
        return {
            "shard": np.array(names),
            "rows": np.array(rows),
            "seconds": np.array(secs),
            "cpu_seconds": np.array(cpus),
            "error": np.array(errors),
        }


def _ray_results(
    factory: ProtectionFactory, plan: BulkPlan, dst: Path, todo: list[Shard], opts: RayOptions
) -> Iterator[dict[str, Any]]:
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        # Ray starts its workers at niceness 15; the actors do the work here, so they run at
        # the priority of the command itself (as `advface protect` would).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            address=opts.address,
            num_cpus=None
            if opts.address
            else (opts.num_cpus or max(1, round(opts.actors * opts.cpus_per_actor))),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        index = {s.name: i for i, s in enumerate(plan.shards)}
        ds = ray.data.from_items(
            [{"shard": index[s.name]} for s in todo], override_num_blocks=len(todo)
        )
        ds = ds.map_batches(
            ShardWorker,
            batch_size=1,  # one shard per call; the protection batches inside it
            compute=ray.data.ActorPoolStrategy(size=min(opts.actors, len(todo))),
            num_cpus=opts.cpus_per_actor,
            num_gpus=opts.gpus_per_actor or None,
            fn_constructor_kwargs={
                "factory": factory,
                "plan": plan,
                "dst": str(dst),
                "threads": max(1, int(opts.cpus_per_actor)),
            },
        )
        yield from ds.iter_rows()
    finally:
        if started:
            ray.shutdown()


def _serial_results(
    factory: ProtectionFactory, plan: BulkPlan, dst: Path, todo: list[Shard]
) -> Iterator[dict[str, Any]]:
    prot, extractor = factory.build(plan.sources[0].kind == IMAGE_KEY)
    for s in todo:
        try:
            yield {**protect_shard(plan, s, dst, prot, extractor), "error": ""}
        except ValueError as exc:
            yield {
                "shard": s.name,
                "rows": 0,
                "seconds": 0.0,
                "cpu_seconds": 0.0,
                "error": str(exc),
            }


def _make_plan(
    src: str | Path,
    factory: ProtectionFactory,
    shard_size: int,
    batch_size: int,
    seed: int | None,
    precheck: bool,
) -> BulkPlan:
    """Scan and check the sources and record the protection. The driver builds the
    protection once too: a bad spec fails here, and its record (with the networks'
    fingerprints) goes into the plan."""
    sources = scan_sources(src, feature_shape=None)
    prot, extractor = factory.build(sources[0].kind == IMAGE_KEY)
    sources = scan_sources(src, feature_shape=prot.expected_shape)
    if precheck:
        check_values(sources)
    return BulkPlan(
        sources=sources,
        shards=make_shards(sources, shard_size),
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        spec=factory.spec,
        protection=prot.params(),
        extractor_sha256=extractor_fingerprint(extractor),
    )


def _summarize(
    results: Iterator[dict[str, Any]],
    plan: BulkPlan,
    dst: Path,
    todo: list[Shard],
    t0: float,
    engine: str,
    opts: RayOptions,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, Any], list[str]]:
    """Drain the shard results (reporting each to ``on_shard``): the run summary and the
    failed shards' errors."""
    done_rows, errors, compute, cpu = 0, [], 0.0, 0.0
    for r in results:
        if r["error"]:
            errors.append(f"{r['shard']}: {r['error']}")
        done_rows += int(r["rows"])
        compute += float(r["seconds"])
        cpu += float(r["cpu_seconds"])
        if on_shard is not None:
            on_shard(r)
    wall = time.perf_counter() - t0
    summary = {
        "output": str(dst),
        "plan_id": plan.plan_id,
        "faces": sum(s.rows for s in plan.sources),
        "shards": len(plan.shards),
        "shards_computed": len(todo) - len(errors),
        "shards_skipped": len(plan.shards) - len(todo),
        "shards_failed": len(errors),
        "faces_computed": done_rows,
        "wall_s": round(wall, 3),
        "faces_per_s": round(done_rows / wall, 3) if wall > 0 and done_rows else None,
        # Summed over the workers: seconds inside shards, and their processes' CPU time.
        "shard_seconds": round(compute, 3),
        "worker_cpu_seconds": round(cpu, 3),
        "engine": engine,
        "ray": asdict(opts) if engine == "ray" else None,
    }
    return summary, errors


def run_bulk(
    src: str | Path,
    dst: str | Path,
    factory: ProtectionFactory,
    *,
    shard_size: int = 1024,
    batch_size: int = 64,
    seed: int | None = None,
    engine: str = "ray",
    ray_options: RayOptions | None = None,
    precheck: bool = True,
    overwrite: bool = False,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Protect every row of SRC into DST's shards (resuming a run of the same plan).

    Validation happens before DST is touched: unreadable or missing sources, wrong shapes,
    NaN/Inf (``precheck``; without it a bad shard fails alone and the good ones stay), a bad
    spec. Returns the run summary, also written to the manifest.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    batch_size = check_int("batch_size", batch_size, low=1)
    if seed is not None:
        check_int("seed", seed, low=0)
    dst = Path(dst)
    t0 = time.perf_counter()
    check_apart(Path(src), dst)
    plan = _make_plan(src, factory, shard_size, batch_size, seed, precheck)
    for source in plan.sources:  # a file linked into DST resolves there
        check_apart(Path(source.path), dst)
    todo = open_destination(dst, plan, overwrite=overwrite)
    opts = ray_options or RayOptions()
    results: Iterator[dict[str, Any]] = iter(())
    if todo and engine == "ray":
        results = _ray_results(factory, plan, dst, todo, opts)
    elif todo:
        results = _serial_results(factory, plan, dst, todo)
    summary, errors = _summarize(results, plan, dst, todo, t0, engine, opts, on_shard)
    write_manifest(dst, plan, {**summary, "errors": errors})
    if errors:
        raise ValueError(
            f"{len(errors)} shard(s) failed (the others are kept; fix the input and rerun): "
            + "; ".join(errors[:3])
        )
    return summary
