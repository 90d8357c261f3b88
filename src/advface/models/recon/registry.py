"""Registry of reconstruction networks, parameter validation and a FLOPs estimate."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import torch
from torch import nn

from ._blocks import FEATURE_CHANNELS, FEATURE_SIZE
from .embdec import EmbDec
from .resrec import ResRec
from .transrec import TransRec
from .urec import URec

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "transrec": TransRec,
    "resrec": ResRec,
    "urec": URec,
    "embdec": EmbDec,
}

#: Named configurations: the constructors' defaults are the CPU profile (narrow: a full-width
#: 160x160 decoder costs several GFLOPs per image, too slow to train on two CPU cores).
PROFILES: dict[str, dict[str, dict[str, int]]] = {
    "cpu": {
        "transrec": {"width": 32, "depth": 0},
        "resrec": {"width": 16, "blocks": 2},
        "urec": {"width": 16, "levels": 2},
        "embdec": {"width": 16},
    },
    "gpu": {
        "transrec": {"width": 64, "depth": 2},
        "resrec": {"width": 64, "blocks": 8},
        "urec": {"width": 64, "levels": 3},
        "embdec": {"width": 64},
    },
}


def profile_config(arch: str, profile: str) -> dict[str, int]:
    """The ``cfg`` of ``arch`` under a named profile (``cpu`` or ``gpu``)."""
    _lookup(arch)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    return dict(PROFILES[profile][arch])


def recon_params(arch: str) -> dict[str, object]:
    """The configurable parameters of ``arch`` with their defaults."""
    cls = _lookup(arch)
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items() if n != "self"}


def _lookup(arch: str) -> Callable[..., nn.Module]:
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown reconstruction architecture {arch!r}; choose from {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[arch]


def build_recon(arch: str, **cfg: object) -> nn.Module:
    """Build a reconstruction network; unknown names or parameters raise ``ValueError``."""
    allowed = recon_params(arch)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"{arch} does not take {unknown}; its parameters are {sorted(allowed)}")
    return _lookup(arch)(**cfg)


def full_config(arch: str, **cfg: object) -> dict[str, object]:
    """Defaults of ``arch`` overridden by ``cfg`` (what a checkpoint records)."""
    out = recon_params(arch)
    out.update(cfg)
    return out


def estimate_flops(model: nn.Module, size: int = FEATURE_SIZE) -> int:
    """Forward FLOPs (2 x multiply-accumulates of convolutions) for one (64, size, size) input
    (or the model's own ``input_shape``, e.g. an embedding for EmbDec).

    Counts only convolutions and transposed convolutions, which dominate; BN/ReLU are ignored.
    Training costs about 3x this (forward + backward).
    """
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = mod.kernel_size
        if isinstance(mod, nn.ConvTranspose2d):
            # Each input pixel scatters a k x k x (cout/groups) patch.
            n = inp[0][0].numel()
            total += n * (mod.out_channels // mod.groups) * kh * kw
        else:
            n = out[0].numel()
            total += n * (mod.in_channels // mod.groups) * kh * kw

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            shape = getattr(model, "input_shape", (FEATURE_CHANNELS, size, size))
            model(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * total


def time_train_step(model: nn.Module, batch_size: int = 8, repeats: int = 3) -> float:
    """Measured seconds per image for one forward+backward+Adam step on random data."""
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2 (BatchNorm in training mode)")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    z = torch.randn(batch_size, FEATURE_CHANNELS, FEATURE_SIZE, FEATURE_SIZE)
    x = torch.rand(batch_size, 3, 160, 160)
    model.train()
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = (model(z) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators
            best = min(best, time.perf_counter() - t0)
    return best / batch_size
