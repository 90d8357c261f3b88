"""One projected-gradient engine for the optimisation-based protections.

:class:`PGD` is configured once (steps, step sizes, step rule, reading of the bound) and called
on a start point with an objective, torchattacks-style. AdvFace, the random baseline and
embedding-shadow are all this loop with different objectives:

    z_0     = c   (+ epsilon * u,  u ~ U[-1, 1) element-wise, when ``random_start``)
    d_t     = grad_z sum(loss(z_t))          or  direction(z_t) when one is given
    z_{t+1} = P( z_t + size_t * rule(d_t) ),  then clamped to >= clamp_min when set

with c the start point (the centre of the ball), the sum over the batch (only the per-element
direction matters), and P the reading of the bound, all element-wise (l_inf):

- ``"accumulated"``: no projection (steps add up freely; ``epsilon`` unused but by the start);
- ``"projected"``: standard PGD, P(z) = c + clamp(z - c, -epsilon, epsilon);
- ``"per-step"``: each step size_t * rule(d_t) is clipped to [-epsilon, epsilon] instead.

Step rules: ``"sign"`` (sign(d), sign(0) = 0), ``"scaled"`` (d / mean|d| per sample, the same
mean step with larger moves where d is larger), ``"raw"`` (d as given, e.g. noise). Schedules:
``"constant"`` (size_t = alpha) or ``"decay"`` (size_t = alpha * 2 (T - t) / T: the same total
path, large early steps and fine late ones).

Shapes: any floating tensor (N, ...) with N samples; ``loss`` returns a scalar or per-sample
losses (N,); ``direction`` returns a tensor shaped like z. Defaults are AdvFace's (paper Sec.
5.1.2): 40 sign steps of 0.2, projected onto the 0.2 ball, no random start, no clamp, no
keep-best. The engine always ascends the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from advface.protection.base import check_choice, check_finite_number, check_int, noise_like

READINGS: tuple[str, ...] = ("accumulated", "projected", "per-step")
STEP_RULES: tuple[str, ...] = ("sign", "scaled", "raw")
SCHEDULES: tuple[str, ...] = ("constant", "decay")

LossFn = Callable[[Tensor], Tensor]
DirectionFn = Callable[[Tensor], Tensor]


@dataclass
class PGDTrace:
    """What a :class:`PGD` call records when given one.

    ``losses[t]``: sum of the loss at z_t, t = 0..T (T + 1 values); ``step_linf[t]`` =
    max |z_{t+1} - z_t|; ``drift_linf`` = max |output - c| (c: the start point).
    """

    losses: list[float] = field(default_factory=list)
    step_linf: list[float] = field(default_factory=list)
    drift_linf: float = 0.0


def unit_scale(g: Tensor) -> Tensor:
    """g divided by its mean absolute value per sample (so that two gradients can be mixed,
    and the ``scaled`` rule keeps a mean step of one)."""
    scale = g.abs().flatten(1).mean(1).clamp_min(1e-20)
    return g / scale.view(-1, *([1] * (g.dim() - 1)))


class PGD:
    """Projected gradient ascent with l_inf readings (see the module docstring).

    Args:
        steps: T, iterations (>= 0; default 40).
        alpha: step size, or its scale under ``schedule="decay"`` (default 0.2).
        epsilon: l_inf radius of the projection, of the per-step clip and of the random start
            (default 0.2).
        reading: ``"projected"`` (default), ``"per-step"`` or ``"accumulated"``.
        step_rule: ``"sign"`` (default), ``"scaled"`` or ``"raw"``.
        schedule: ``"constant"`` (default) or ``"decay"``.
        random_start: start from c + epsilon * U[-1, 1) drawn from the call's generator (on
            the CPU when one is given, so seeded results do not depend on the device); nothing
            is drawn when epsilon = 0. Default False.
        clamp_min: if set, clamp the start and every iterate (after the projection) to >= it.
        keep_best: return, per sample when the loss is per-sample (else for the whole batch),
            the iterate z_0..z_T with the highest loss instead of z_T (one extra loss
            evaluation at z_T; ties keep the earlier iterate). Default False.
    """

    def __init__(
        self,
        *,
        steps: int = 40,
        alpha: float = 0.2,
        epsilon: float = 0.2,
        reading: str = "projected",
        step_rule: str = "sign",
        schedule: str = "constant",
        random_start: bool = False,
        clamp_min: float | None = None,
        keep_best: bool = False,
    ) -> None:
        self.steps = check_int("steps", steps, low=0)
        self.alpha = check_finite_number("alpha", alpha, low=0.0)
        self.epsilon = check_finite_number("epsilon", epsilon, low=0.0)
        self.reading = check_choice("reading", reading, READINGS)
        self.step_rule = check_choice("step_rule", step_rule, STEP_RULES)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        for name, flag in (("random_start", random_start), ("keep_best", keep_best)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.random_start = random_start
        self.keep_best = keep_best
        self.clamp_min = None if clamp_min is None else check_finite_number("clamp_min", clamp_min)

    def step_size(self, t: int) -> float:
        """size_t for step t = 0..T-1."""
        if self.schedule == "decay":
            return self.alpha * 2 * (self.steps - t) / self.steps
        return self.alpha

    def __call__(
        self,
        z0: Tensor,
        *,
        loss: LossFn | None = None,
        direction: DirectionFn | None = None,
        generator: torch.Generator | None = None,
        trace: PGDTrace | None = None,
    ) -> Tensor:
        """Run from ``z0`` (N, ...) and return the result (detached, shaped like ``z0``).

        ``loss(z)``: scalar or (N,) losses to ascend (differentiable in z). ``direction(z)``:
        the ascent direction itself (e.g. a mix of normalised gradients, or noise); when given,
        ``loss`` is only evaluated (without gradients) for ``trace`` and ``keep_best``.
        Call it under ``torch.no_grad()``: gradients are enabled only where taken. Under the
        projected reading with epsilon 0 the result is the (clamped) start and, unless a trace
        or keep-best asks for losses, neither ``loss`` nor ``direction`` is called.
        """
        if not isinstance(z0, Tensor) or not z0.is_floating_point() or z0.dim() < 1:
            raise ValueError(f"z0 must be a floating tensor (N, ...), got {z0!r:.60}")
        if loss is None and direction is None:
            raise ValueError("give a loss or a direction")
        if loss is None and (trace is not None or self.keep_best):
            raise ValueError("trace and keep_best need a loss")
        center = self._clamp(z0.detach())
        if self._pinned() and trace is None and not self.keep_best:
            # Every projected iterate is the centre itself: skip the T loss/gradient passes
            # (the result is bit-identical; AdvFace's epsilon-0 sweep point costs nothing).
            return center
        zt = center
        if self.random_start and self.epsilon > 0:
            zt = self._clamp(center + self.epsilon * noise_like(center, generator, "uniform"))
        best: tuple[Tensor, Tensor] | None = None
        for t in range(self.steps):
            d, value = self._direction(zt, loss, direction, trace is not None)
            if self.keep_best:
                best = _keep(best, zt, value)
            znext = self._clamp(self._project(self._advance(zt, d, self.step_size(t)), center))
            if trace is not None:
                trace.losses.append(float(_total(value)))
                trace.step_linf.append(float((znext - zt).abs().max()))
            zt = znext
        if trace is not None or self.keep_best:
            with torch.no_grad():
                value = _checked(loss(zt), zt).detach()  # type: ignore[misc]  # checked above
            if trace is not None:
                trace.losses.append(float(_total(value)))
            if self.keep_best:
                zt = _keep(best, zt, value)[0]
        if trace is not None:
            trace.drift_linf = float((zt - center).abs().max())
        return zt.detach()

    def _pinned(self) -> bool:
        """True when the projection pins every iterate to the centre (projected, epsilon 0)."""
        return self.reading == "projected" and self.epsilon == 0

    # -- one step -------------------------------------------------------------------------------

    def _direction(
        self, zt: Tensor, loss: LossFn | None, direction: DirectionFn | None, tracing: bool
    ) -> tuple[Tensor, Tensor | None]:
        """(ascent direction at zt, loss at zt or None when not needed)."""
        if direction is not None:
            value = None
            if loss is not None and (self.keep_best or tracing):
                with torch.no_grad():
                    value = _checked(loss(zt), zt).detach()
            return direction(zt), value
        assert loss is not None
        with torch.enable_grad():
            zg = zt.detach().requires_grad_(True)
            value = _checked(loss(zg), zg)
            (grad,) = torch.autograd.grad(_total(value), zg)
        return grad, value.detach()

    def _advance(self, zt: Tensor, d: Tensor, size: float) -> Tensor:
        if self.step_rule == "raw" and self.reading != "per-step":
            # Fused multiply-add (one rounding), as the random baseline has always added noise.
            return zt.add(d, alpha=size)
        if self.step_rule == "sign":
            step = d.sign()
        elif self.step_rule == "scaled":
            step = unit_scale(d)
        else:
            step = d
        if self.reading == "per-step":
            return zt + (size * step).clamp(-self.epsilon, self.epsilon)
        return zt + size * step

    def _project(self, z: Tensor, center: Tensor) -> Tensor:
        if self.reading != "projected":
            return z
        return center + (z - center).clamp(-self.epsilon, self.epsilon)

    def _clamp(self, z: Tensor) -> Tensor:
        return z if self.clamp_min is None else z.clamp_min(self.clamp_min)


def _total(value: Tensor | None) -> Tensor:
    assert value is not None
    return value if value.dim() == 0 else value.sum()


def _checked(value: Tensor, z: Tensor) -> Tensor:
    """The loss, after checking that it is a scalar or one value per sample."""
    if not isinstance(value, Tensor) or value.shape not in ((), z.shape[:1]):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"loss must return a scalar or ({z.shape[0]},) losses, got {got}")
    return value


def _keep(
    best: tuple[Tensor, Tensor] | None, z: Tensor, value: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The better of (best iterate, its loss) and (z, value): per sample for (N,) losses."""
    assert value is not None
    if best is None:
        return z, value
    best_z, best_v = best
    if value.dim() == 0:
        return (z, value) if bool(value > best_v) else best
    better = value > best_v
    mask = better.view(-1, *([1] * (z.dim() - 1)))
    return torch.where(mask, z, best_z), torch.where(better, value, best_v)
