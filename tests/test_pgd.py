"""The shared PGD engine: readings, step rules, schedules, random start, clamp, keep-best."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from advface.protection.pgd import PGD, PGDTrace, unit_scale


def _linear(w: Tensor):
    """loss(z) = sum(w * z) per sample: gradient w everywhere."""
    return lambda z: (w * z).flatten(1).sum(1)


def _run(z0: Tensor, engine: PGD, **kw) -> Tensor:
    with torch.no_grad():
        return engine(z0, **kw)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": -1}, "steps"),
        ({"alpha": float("nan")}, "alpha"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"reading": "sideways"}, "reading"),
        ({"step_rule": "adam"}, "step_rule"),
        ({"schedule": "cosine"}, "schedule"),
        ({"random_start": 1}, "random_start"),
        ({"keep_best": "yes"}, "keep_best"),
        ({"clamp_min": float("inf")}, "clamp_min"),
    ],
)
def test_bad_settings_raise_value_error(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PGD(**kw)


def test_bad_calls_raise_value_error() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss or a direction"):
        PGD()(z)
    with pytest.raises(ValueError, match="need a loss"):
        PGD()(z, direction=torch.ones_like, trace=PGDTrace())
    with pytest.raises(ValueError, match="floating"):
        PGD()(torch.zeros(2, 3, dtype=torch.int64), loss=lambda v: v.sum())
    with pytest.raises(ValueError, match=r"scalar or \(2,\)"):
        _run(z, PGD(steps=1), loss=lambda v: v * 2)


def test_readings_bound_what_they_say() -> None:
    z0 = torch.zeros(2, 5)
    w = torch.tensor([[1.0, -1.0, 2.0, 0.0, -3.0]]).expand(2, 5)
    loss = _linear(w)
    free = _run(z0, PGD(steps=6, alpha=0.2, reading="accumulated"), loss=loss)
    assert torch.allclose(free, 6 * 0.2 * w.sign())  # sign(0) = 0: no move
    projected = _run(z0, PGD(steps=6, alpha=0.2, epsilon=0.3), loss=loss)
    assert torch.allclose(projected, 0.3 * w.sign())
    trace = PGDTrace()
    per_step = _run(
        z0, PGD(steps=6, alpha=0.2, epsilon=0.05, reading="per-step"), loss=loss, trace=trace
    )
    assert torch.allclose(per_step, 6 * 0.05 * w.sign())
    assert max(trace.step_linf) == pytest.approx(0.05)
    assert trace.drift_linf == pytest.approx(0.3)
    assert len(trace.losses) == 7 and len(trace.step_linf) == 6
    assert trace.losses == sorted(trace.losses)  # a linear loss grows with every sign step


def test_decay_schedule_and_scaled_rule() -> None:
    engine = PGD(steps=4, alpha=0.1, schedule="decay", reading="accumulated", step_rule="scaled")
    sizes = [engine.step_size(t) for t in range(4)]
    assert sizes == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert sum(sizes) == pytest.approx(0.1 * (4 + 1))  # the same path as T+1 constant steps
    w = torch.tensor([[1.0, 3.0], [0.5, -0.5]])
    out = _run(torch.zeros(2, 2), engine, loss=_linear(w))
    # Scaled steps move each sample by alpha_t on average: total sum(sizes) per sample.
    assert out.abs().mean(1).tolist() == pytest.approx([sum(sizes)] * 2)
    assert torch.allclose(unit_scale(w).abs().mean(1), torch.ones(2))


def test_raw_rule_adds_the_direction() -> None:
    z0 = torch.zeros(1, 3)
    d = torch.tensor([[0.5, -1.0, 2.0]])
    out = _run(
        z0, PGD(steps=3, alpha=0.1, reading="accumulated", step_rule="raw"), direction=(lambda z: d)
    )
    assert torch.allclose(out, 0.3 * d)
    proj = PGD(steps=3, alpha=0.1, epsilon=0.15, step_rule="raw")
    assert torch.allclose(_run(z0, proj, direction=lambda z: d), (0.3 * d).clamp(-0.15, 0.15))


def test_random_start_is_seeded_bounded_and_skipped_at_zero_epsilon() -> None:
    z0 = torch.zeros(3, 4, 5)
    engine = PGD(steps=0, epsilon=0.25, random_start=True)
    a = _run(z0, engine, direction=torch.zeros_like, generator=torch.Generator().manual_seed(1))
    b = _run(z0, engine, direction=torch.zeros_like, generator=torch.Generator().manual_seed(1))
    c = _run(z0, engine, direction=torch.zeros_like, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 < a.abs().max() <= 0.25 and a.abs().mean() > 0.1
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    zero = PGD(steps=0, epsilon=0.0, random_start=True)
    assert torch.equal(_run(z0, zero, direction=torch.zeros_like, generator=g), z0)
    assert torch.equal(g.get_state(), state)  # nothing drawn


def test_clamp_min_applies_to_start_and_iterates() -> None:
    z0 = torch.full((2, 6), 0.1)
    w = -torch.ones(2, 6)
    engine = PGD(steps=3, alpha=0.2, epsilon=0.5, clamp_min=0.0, random_start=True)
    out = _run(z0, engine, loss=_linear(w), generator=torch.Generator().manual_seed(0))
    assert out.min() >= 0.0 and torch.equal(out, torch.zeros_like(out))


def test_keep_best_returns_the_best_iterate_per_sample() -> None:
    # loss = -|z - target|: sign steps of 0.2 from 0 oscillate between 0 and 0.2. Sample 0
    # (target 0.05) is best at 0 (z_0), sample 1 (target 0.15) at 0.2 (z_1); z_2 = 0 for both.
    target = torch.tensor([[0.05], [0.15]])

    def loss(z: Tensor) -> Tensor:
        return -(z - target).abs().flatten(1).sum(1)

    z0 = torch.zeros(2, 1)
    last = _run(z0, PGD(steps=2, alpha=0.2, reading="accumulated"), loss=loss)
    assert torch.equal(last, torch.zeros(2, 1))
    trace = PGDTrace()
    best = _run(
        z0, PGD(steps=2, alpha=0.2, reading="accumulated", keep_best=True), loss=loss, trace=trace
    )
    assert torch.allclose(best, torch.tensor([[0.0], [0.2]]))
    assert len(trace.losses) == 3 and trace.drift_linf == pytest.approx(0.2)
    # A scalar loss keeps the best iterate of the whole batch.
    whole = PGD(steps=2, alpha=0.2, reading="accumulated", keep_best=True)
    out = _run(z0, whole, loss=lambda z: loss(z)[:1].sum())
    assert torch.equal(out, torch.zeros(2, 1))


def test_keep_best_never_ends_below_the_last_iterate() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    target = torch.randn(4, 8) * 0.3

    def loss(z: Tensor) -> Tensor:
        return (torch.sin(4 * z) * w).flatten(1).sum(1) - (z - target).pow(2).flatten(1).sum(1)

    z0 = torch.zeros(4, 8)
    settings = {"steps": 15, "alpha": 0.3, "epsilon": 0.6}
    last = _run(z0, PGD(**settings), loss=loss)
    best = _run(z0, PGD(keep_best=True, **settings), loss=loss)
    assert (loss(best) >= loss(last)).all()
    assert (best.abs() <= 0.6 + 1e-6).all()


def test_direction_with_loss_traces_without_gradients() -> None:
    calls = []

    def loss(z: Tensor) -> Tensor:
        calls.append(torch.is_grad_enabled())
        return z.sum()

    trace = PGDTrace()
    _run(torch.zeros(1, 2), PGD(steps=2), direction=torch.ones_like, loss=loss, trace=trace)
    assert calls == [False, False, False] and len(trace.losses) == 3


def test_zero_epsilon_projected_returns_the_start_without_evaluating() -> None:
    z0 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def loss(z: Tensor) -> Tensor:
        calls.append(1)
        return z.flatten(1).sum(1)

    pinned = _run(z0, PGD(steps=40, alpha=0.2, epsilon=0.0, clamp_min=-0.5), loss=loss)
    assert calls == [] and torch.equal(pinned, z0.clamp_min(-0.5))
    # The same result as taking the steps (which the trace forces).
    traced = _run(
        z0, PGD(steps=3, alpha=0.2, epsilon=0.0, clamp_min=-0.5), loss=loss, trace=PGDTrace()
    )
    assert len(calls) == 4 and torch.equal(traced, pinned)
    # Other readings still move at epsilon 0.
    moved = _run(z0, PGD(steps=2, alpha=0.2, epsilon=0.0, reading="accumulated"), loss=loss)
    assert not torch.equal(moved, z0)
