"""Reconstruction-network checkpoints: ``model.safetensors`` + ``config.json`` in a directory.

Writes are atomic (temporary file + ``os.replace``) so an interrupted save never leaves a
half-written checkpoint; loading uses safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .registry import build_recon, full_config

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    arch: str,
    cfg: dict[str, Any],
    **meta: Any,
) -> Path:
    """Save ``model`` (built as ``build_recon(arch, **cfg)``) and its metadata.

    ``meta`` should carry ``train_set``, ``epochs``, ``seed``, ``features`` (e.g. ``"clean"``)
    and anything else worth recording; it must be JSON-serialisable. The weights are written
    before the config, so a config always describes weights that exist.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT_VERSION,
        "arch": arch,
        "cfg": full_config(arch, **cfg),
        **meta,
    }
    text = json.dumps(config, indent=2, sort_keys=True)  # fail before touching the directory
    atomic_save_tensors(model.state_dict(), directory / MODEL_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, (text + "\n").encode())
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no reconstruction checkpoint at {directory} (missing {CONFIG_FILE})"
        )
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("arch"), str)
        or not isinstance(config.get("cfg"), dict)
    ):
        raise ValueError(f"{path} is not a reconstruction checkpoint config (needs arch and cfg)")
    return config


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(model in eval mode, config)``; shapes must match the recorded architecture."""
    config = read_config(directory)
    try:
        model = build_recon(config["arch"], **config["cfg"])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{Path(directory) / CONFIG_FILE}: cannot build the network: {err}"
        ) from err
    weights = Path(directory) / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"missing {weights}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the network its config describes: {err}") from err
    return model.to(device).eval(), config
