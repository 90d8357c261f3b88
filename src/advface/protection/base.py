"""The protection interface: client features z (N,64,77,77) in, features to store out.

Every protection (none, random, dp, advface) subclasses :class:`Protection` and implements
``_protect``. The base class owns what all of them share: input validation, dtype handling,
seeding, and the JSON-serialisable parameter record that the template service stores beside
each protected template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

# Re-exported: the protections' parameter checks (they live at the bottom layer, shared).
from advface.checks import check_choice, check_finite_number, check_int

__all__ = [
    "FEATURE_SHAPE",
    "NoProtection",
    "Protection",
    "check_choice",
    "check_finite_number",
    "check_generator",
    "check_int",
    "check_output_finite",
    "noise_like",
]

#: E's output for a 160x160 input at ``conv2d_2b``: 64 channels, 77x77.
FEATURE_SHAPE: tuple[int, int, int] = (64, 77, 77)


def noise_like(z: Tensor, generator: torch.Generator | None, kind: str = "uniform") -> Tensor:
    """Noise shaped like ``z`` on ``z``'s device: ``uniform`` U[-1, 1) or ``laplace``
    Laplace(0, 1). Drawn on the CPU when seeded so that results do not depend on the
    device; unseeded draws happen on the device directly."""
    device = "cpu" if generator is not None else z.device
    if kind == "uniform":
        u = torch.rand(z.shape, generator=generator, device=device, dtype=z.dtype)
        noise = u.mul_(2).sub_(1)
    elif kind == "laplace":
        # Difference of two Exp(1) variables is Laplace(0, 1); 1 - U lies in (0, 1], so
        # the logarithms stay finite.
        u1 = torch.rand(z.shape, generator=generator, device=device, dtype=z.dtype)
        u2 = torch.rand(z.shape, generator=generator, device=device, dtype=z.dtype)
        noise = torch.log1p(-u2).sub_(torch.log1p(-u1))
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown noise kind {kind!r}")
    return noise.to(z.device)


def check_generator(generator: Any) -> torch.Generator | None:
    """Return ``generator`` after checking it is None or a CPU ``torch.Generator`` (noise is
    drawn on the CPU so that seeded results do not depend on the device)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r:.60}")
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (noise is drawn on the CPU)")
    return generator


def check_output_finite(name: str, out: Tensor) -> None:
    """Raise ``ValueError`` when a protection's output holds NaN/Inf: finite input and finite
    parameters can still overflow float32 (e.g. a Laplace scale near its limit, or huge bounds
    summed over many steps), and such a template must never be stored."""
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{name}: {bad} of {out.numel()} output values are not finite; its parameters "
            "overflow float32 arithmetic (use a smaller noise scale, bound or step count)"
        )


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    return check_int("seed", seed, low=0)


class Protection(ABC):
    """Base class of feature protections (torchattacks-style: configure once, call on batches).

    Args:
        expected_shape: per-sample (C, H, W) that ``protect`` accepts; default (64, 77, 77).
        seed: makes random protections reproducible. With a seed, every ``protect`` call
            starts a fresh generator from it, so the same input gives the same output on any
            device (noise is drawn on the CPU and moved). Without one, noise comes from torch's
            global RNG. A service should leave it ``None``: a fixed seed reuses the same noise
            for every template, which an attacker holding several templates could estimate.

    ``protect(z)`` takes a floating tensor (N, C, H, W), N >= 1, on any device, and returns a
    tensor of the same shape, dtype and device. Half-precision inputs are computed in float32.
    """

    #: Registry name (``build_protection(name)``).
    name: ClassVar[str] = "base"

    def __init__(
        self,
        *,
        expected_shape: Sequence[int] = FEATURE_SHAPE,
        seed: int | None = None,
    ) -> None:
        shape = tuple(expected_shape)
        if len(shape) != 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
        ):
            raise ValueError(f"expected_shape must be three positive ints (C, H, W), got {shape}")
        self.expected_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.seed: int | None = _check_seed(seed)

    # -- public API ---------------------------------------------------------------------------

    def protect(self, z: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Return the protected features for ``z`` (N, C, H, W).

        ``generator`` (a CPU ``torch.Generator``) overrides ``seed`` for this call, e.g. to draw
        one stream across the batches of a file.
        """
        self.validate(z)
        generator = check_generator(generator)
        if generator is None and self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
        work_dtype = z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32
        # Inference tensors cannot enter autograd, and the caller may hold us in no_grad or
        # inference_mode; leave both here and let each protection decide where it needs grad.
        with torch.inference_mode(False), torch.no_grad():
            zin = z.detach().to(dtype=work_dtype).clone()
            out = self._protect(zin, generator)
        if out.shape != z.shape:  # a subclass bug, not a user error
            raise RuntimeError(f"{self.name}: output shape {tuple(out.shape)} != {tuple(z.shape)}")
        out = out.detach().to(device=z.device, dtype=z.dtype)
        # Checked after the cast: float64 work can stay finite and still overflow float32/16.
        check_output_finite(self.name, out)
        return out

    __call__ = protect

    def validate(self, z: Any) -> None:
        """Raise ``ValueError`` unless ``z`` is a finite floating tensor (N, *expected_shape)."""
        if not isinstance(z, Tensor):
            raise ValueError(f"features must be a torch.Tensor, got {type(z).__name__}")
        want = "(N, " + ", ".join(map(str, self.expected_shape)) + ")"
        if z.dim() != 4:
            raise ValueError(f"features must be 4-D {want}, got {z.dim()}-D shape {tuple(z.shape)}")
        if z.shape[0] < 1:
            raise ValueError(f"features must hold at least one sample, got shape {tuple(z.shape)}")
        if tuple(z.shape[1:]) != self.expected_shape:
            raise ValueError(f"features must have shape {want}, got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"features must be a floating tensor, got dtype {z.dtype}")
        finite = torch.isfinite(z)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(z).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise ValueError(f"features must be finite: {n_nan} NaN and {n_inf} Inf values")

    def params(self) -> dict[str, Any]:
        """JSON-serialisable description of this protection (stored beside each template)."""
        return {"name": self.name, "seed": self.seed, **self._params()}

    def key_params(self) -> dict[str, Any]:
        """:meth:`params` without machine paths: what a cache key of this protection's output
        holds (the networks a path points at are in the ``*_sha256`` entries)."""
        return {k: v for k, v in self.params().items() if not k.endswith("_path")}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "name")
        return f"{type(self).__name__}({inner})"

    # -- for subclasses -----------------------------------------------------------------------

    @abstractmethod
    def _protect(self, z: Tensor, generator: torch.Generator | None) -> Tensor:
        """Protect a validated, detached float32/float64 copy of the input (runs in no_grad)."""

    def _params(self) -> dict[str, Any]:
        """Method-specific entries of :meth:`params`."""
        return {}

    #: Noise shaped like a tensor (see :func:`noise_like`).
    _noise_like = staticmethod(noise_like)


class NoProtection(Protection):
    """Identity: stores the client features as they are (the unprotected baseline)."""

    name: ClassVar[str] = "none"

    def _protect(self, z: Tensor, generator: torch.Generator | None) -> Tensor:
        return z
