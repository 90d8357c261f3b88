"""Reconstruction networks (N, 64, 77, 77) -> (N, 3, 160, 160) in [0, 1] and their checkpoints."""

from .checkpoint import load_checkpoint, read_config, save_checkpoint
from .registry import (
    ARCHITECTURES,
    PROFILES,
    build_recon,
    estimate_flops,
    full_config,
    profile_config,
    recon_params,
    time_train_step,
)
from .resrec import ResRec
from .transrec import TransRec
from .urec import URec

__all__ = [
    "ARCHITECTURES",
    "PROFILES",
    "ResRec",
    "TransRec",
    "URec",
    "build_recon",
    "estimate_flops",
    "full_config",
    "load_checkpoint",
    "profile_config",
    "read_config",
    "recon_params",
    "save_checkpoint",
    "time_train_step",
]
