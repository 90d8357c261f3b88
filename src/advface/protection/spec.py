"""Protection specs on one string, for command lines and the adaptive attacker.

Grammar: ``NAME[:SHADOW][,key=value...]``, e.g. ``none``, ``dp``, ``random,steps=20``,
``advface:runs/shadow-resrec``, ``advface:runs/shadow,reading=projected,epsilon=0.1``,
``embedding-shadow,generator=runs/gen,shadow=runs/shadow``.
Values are parsed as JSON where possible (numbers, null, true/false), else kept as strings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advface.protection.base import Protection

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split a spec into ``(name, params)``; ``advface:PATH`` gives ``params["shadow"]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("protection spec must be a non-empty string such as 'advface:CKPT'")
    head, *pairs = spec.strip().split(",")
    name, sep, shadow = head.partition(":")
    name = name.strip().lower()
    params: dict[str, Any] = {}
    if sep:
        if not shadow:
            raise ValueError(f"protection spec {spec!r}: empty path after ':'")
        if name != "advface":
            raise ValueError(f"protection spec {spec!r}: only advface takes a shadow path")
        params["shadow"] = shadow
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"protection spec {spec!r}: expected key=value, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.strip()
        params[key] = value
    if name == "advface" and "shadow" not in params:
        raise ValueError(f"protection spec {spec!r}: advface needs a shadow, e.g. 'advface:CKPT'")
    if name == "embedding-shadow" and not {"generator", "shadow"} <= set(params):
        raise ValueError(
            f"protection spec {spec!r}: embedding-shadow needs generator=CKPT and shadow=CKPT"
        )
    return name, params


def protection_from_spec(
    spec: str,
    *,
    extractor: nn.Module | None = None,
    head: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> Protection:
    """Build the protection a spec names; ``extractor``/``head``/``device`` are passed to the
    protections that run networks (AdvFace takes no head)."""
    from advface.protection import build_protection

    name, params = parse_spec(spec)
    if name in ("advface", "embedding-shadow"):
        if extractor is not None:
            params.setdefault("extractor", extractor)
        if head is not None and name == "embedding-shadow":
            params.setdefault("head", head)
        if device is not None:
            params.setdefault("device", device)
        for what in ("shadow", "generator"):
            if what in params and not Path(str(params[what])).exists():
                raise ValueError(f"{what} checkpoint {params[what]} does not exist")
    return build_protection(name, **params)


def feature_fn_from_spec(
    spec: str | None,
    *,
    extractor: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> FeatureFn | None:
    """A ``feature_fn`` for :func:`advface.attacks.train.train_recon` (the adaptive attacker).

    ``None``/``"none"``/``"clean"`` -> ``None`` (train on clean features). Otherwise the
    attacker protects each training batch of E's features with the method the spec names, using
    its *own* shadow model (Kerckhoffs: it knows the method, not the server's shadow), and
    trains its decoder on (x, protected feature) pairs. Pass the same ``extractor`` that the
    training uses. With ``bn="batch"`` (default) the statistics come from the training batch,
    as they would from the server's batch.
    """
    if spec is None or spec.strip().lower() in ("none", "clean"):
        return None
    return protection_from_spec(spec, extractor=extractor, device=device).protect
