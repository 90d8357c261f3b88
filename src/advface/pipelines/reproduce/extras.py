"""A reproduction's rows beyond the online tables: the offline mode's heads (a Psi' distilled
for each protection the profile lists, or distilled heads given as folders) for Table 2, and
the robustness bench's rows, run into a subfolder of the reproduction."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from advface.pipelines.context import FACENET_CODE, PROTECTION_CODE, code_fingerprint
from advface.pipelines.reproduce.evaluate import ExtraHead, build, main_config
from advface.pipelines.reproduce.networks import Context, Networks
from advface.pipelines.reproduce.profiles import OFFLINE_METHODS

if TYPE_CHECKING:
    from advface.pipelines.offline import DistillSettings

#: The code a distilled head depends on: distillation, the student, the data it reads, E/Psi
#: and the protections that make its training features.
OFFLINE_CODE: tuple[str, ...] = (
    "pipelines/offline.py",
    "models/distill.py",
    "pipelines/data.py",
    *FACENET_CODE,
    *PROTECTION_CODE,
)


def distill_settings(profile) -> DistillSettings:
    """The profile's :class:`~advface.pipelines.offline.DistillSettings` (other settings: the
    defaults of ``advface distill``)."""
    from advface.pipelines.offline import DistillSettings

    budget = None if profile.distill_minutes is None else 60.0 * profile.distill_minutes
    return DistillSettings(epochs=profile.distill_epochs, time_budget_s=budget, seed=profile.seed)


def offline_key(ctx: Context, prot, settings) -> dict:
    """A distilled head's stage key: the protection's complete parameters (shadow and E weights
    included), FaceNet's weights, the settings, the training images (names and source files)
    and the code."""
    from advface.data.prepare import source_fingerprint
    from advface.data.splits import celeba_split

    limit = ctx.profile.distill_limit
    split = celeba_split(ctx.root, "server").sample(limit, settings.seed)
    return dict(
        protection=prot.key_params(),
        settings=asdict(settings),
        limit=limit,
        data=hashlib.sha256("\n".join(split.keys).encode()).hexdigest()[:16],
        faces=source_fingerprint(split.dataset, split.keys, data_root=ctx.root),
        weights=ctx.weights_sha,
        code=code_fingerprint(OFFLINE_CODE),
    )


def _record(cfg: dict, source: str) -> dict:
    rec, data = cfg.get("record", {}), cfg.get("data", {})
    return {
        "source": source,
        "model_version": cfg["model_version"],
        "train_from": cfg["train_from"],
        "protection": _public(cfg.get("protection") or {}),
        "images": data.get("images"),
        "no_face": data.get("no_face"),
        "identity_check": data.get("identity_check"),
        "loss_before": rec.get("loss_before"),
        "loss_after": rec.get("loss_after"),
        "epochs": len(rec.get("history", [])),
        "stopped_by": rec.get("stopped_by"),
        "seconds": rec.get("seconds"),
        "budget_seconds": rec.get("budget_seconds"),
    }


def _public(params: dict) -> dict:
    return {k: v for k, v in params.items() if not k.endswith("_path")}


def offline_heads(ctx: Context, nets: Networks) -> dict[str, ExtraHead]:
    """Per method of ``profile.offline``, a Psi' distilled (or reused from the stage cache)
    for the very protection of its online row; label ``<method>-distilled``."""
    from advface.models.distill import load_student
    from advface.pipelines.offline import run_distill

    p, settings, heads = ctx.profile, distill_settings(ctx.profile), {}
    for method in p.offline:
        prot = build(ctx, main_config(ctx, method), nets)
        folder = ctx.stages.path(f"offline-{method}", offline_key(ctx, prot, settings), "")
        if not (folder / "config.json").is_file():  # written last: the head is complete
            ctx.log(f"distilling Psi' for {method} on {p.distill_limit or 'all'} images")
            t0 = time.perf_counter()
            run_distill(
                prot, folder, data_root=ctx.root, limit=p.distill_limit, settings=settings,
                work_dir=folder.with_name(folder.name + ".work"), overwrite=True,
                progress=ctx.progress, facenet=ctx.facenet, cache=ctx.data_cache,
            )  # fmt: skip
            ctx.timings[f"distill {method}"] = round(time.perf_counter() - t0, 1)
        student, cfg = load_student(folder, ctx.head)
        label = f"{method}-distilled"
        heads[label] = ExtraHead(student.to(ctx.device), method, version=cfg["model_version"])
        ctx.heads[label] = {**_record(cfg, "distilled"), "method": method, "key": folder.name}
    return heads


def given_heads(ctx: Context, dirs: Mapping[str, str | Path]) -> dict[str, ExtraHead]:
    """Distilled heads given as folders (label -> folder of ``advface distill``), each for the
    method named in its config and loaded onto this run's Psi (checked by fingerprint):
    before any training, so that a wrong folder fails at once."""
    from advface.models.distill import load_student

    heads = {}
    for label, folder in dirs.items():
        student, cfg = load_student(folder, ctx.head)
        method = (cfg.get("protection") or {}).get("name")
        if method not in OFFLINE_METHODS:
            raise ValueError(
                f"{folder} was distilled for {method!r}; offline rows exist for {OFFLINE_METHODS}"
            )
        heads[label] = ExtraHead(student.to(ctx.device), method, version=cfg["model_version"])
        ctx.heads[label] = {**_record(cfg, str(folder)), "method": method}
    return heads


def check_given(ctx: Context, nets: Networks, labels: list[str]) -> None:
    """Record whether each given head was distilled for this run's very protection (e.g. the
    same AdvFace shadow and settings) or for another instance of its method."""
    for label in labels:
        rec = ctx.heads[label]
        run = build(ctx, main_config(ctx, rec["method"]), nets).key_params()
        rec["protection_matches_run"] = rec["protection"] == run


def robustness_rows(
    ctx: Context, out: Path, weights: str | Path | None
) -> tuple[list[dict], dict | None]:
    """The robustness bench with the profile's bench profile, run (or resumed: its stages
    are cached there) into ``out/robustness``; its rows (``table: "robustness"``, every
    reproduction column present) and what the report says of it."""
    from advface.pipelines.reproduce.report import ROW_KEYS
    from advface.pipelines.robustness import get_profile, run_bench

    name = ctx.profile.robustness
    if name is None:
        return [], None
    ctx.log(f"robustness bench, profile {name}, into {out / 'robustness'}")
    t0 = time.perf_counter()
    res = run_bench(
        get_profile(name), out / "robustness", data_root=ctx.root, cache=ctx.data_cache,
        device=str(ctx.device), progress=ctx.progress, weights=weights,
    )  # fmt: skip
    ctx.timings["robustness bench"] = round(time.perf_counter() - t0, 1)
    rows = [{**dict.fromkeys(ROW_KEYS), **r} for r in res["rows"]]
    info = {
        "profile": name,
        "folder": "robustness",
        "report": "robustness/report.md",
        "rows": len(rows),
        "complete": res.get("complete"),
        "wall_s": res.get("wall_s"),
    }
    return rows, info
