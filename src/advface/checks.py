"""Parameter checks shared by every layer: each raises a ``ValueError`` naming the parameter
(ART-style: a component validates its settings when built, not deep inside a run)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

#: Largest float32: the networks and features compute in float32, so a parameter beyond it
#: (finite as a Python float) would overflow inside torch.
FLOAT32_MAX = 3.4028234663852886e38


def check_finite_number(
    name: str, value: Any, *, low: float | None = None, high: float | None = None
) -> float:
    """Return ``value`` as float after checking it is a finite real within float32's range
    (``low <= value <= high`` where given; bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be within float32's range (|x| <= 3.4e38), got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name: str, value: Any, *, low: int) -> int:
    """Return ``value`` after checking it is an int ``>= low`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` after checking it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def check_batch(what: str, t: Any, *, dims: int) -> torch.Tensor:
    """Return ``t`` after checking it is a finite floating tensor with ``dims`` dimensions and
    at least one sample (N, ...)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{what} must be a floating tensor, got {t!r:.60}")
    if t.dim() != dims or t.shape[0] < 1:
        raise ValueError(
            f"{what} must be {dims}-D with N >= 1 (at least one sample), got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} must be finite (NaN/Inf found)")
    return t
