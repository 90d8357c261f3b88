"""Protections of client features: validation, seeding, AdvFace bounds and BN behaviour.

Most tests use a miniature E/S pair (features 4x9x9 from 3x20x20 images) so that they run in
well under a second each; one test runs the real feature shape with a narrow ResRec.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advface.protection import PROTECTIONS, build_protection
from advface.protection.advface import AdvFace
from advface.protection.base import NoProtection
from advface.protection.dp import LaplaceDP
from advface.protection.random import RandomPerturbation

SMALL = (4, 9, 9)


# Tiny tensors: one torch thread (the conftest fixture) for every test here.
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyE(nn.Module):
    """(N,3,20,20) in [0,1] -> (N,4,9,9) >= 0 (conv-BN-ReLU, like E's last stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class TinyS(nn.Module):
    """(N,4,9,9) -> (N,3,20,20) in [0,1], with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv1(z)))
        h = F.interpolate(h, size=20, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.conv2(h))


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    e, s = TinyE().eval(), TinyS().eval()
    # Non-trivial running statistics, so "running" and "batch" modes differ visibly.
    s.bn.running_mean.uniform_(-0.5, 0.5)
    s.bn.running_var.uniform_(0.5, 2.0)
    return e, s


def _features(n: int, e: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return e(torch.rand(n, 3, 20, 20, generator=g))


def _advface(s: nn.Module, e: nn.Module, **kw) -> AdvFace:
    kw.setdefault("steps", 6)
    kw.setdefault("extractor_input", "unit")
    return AdvFace(s, e, expected_shape=SMALL, **kw)


def _all_small(s: nn.Module, e: nn.Module) -> list:
    return [
        NoProtection(expected_shape=SMALL),
        RandomPerturbation(expected_shape=SMALL, seed=0),
        LaplaceDP(expected_shape=SMALL, seed=0),
        _advface(s, e),
    ]


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(4, 9, 9), "4-D"),
        (torch.zeros(0, 4, 9, 9), "at least one sample"),
        (torch.zeros(2, 4, 9, 8), "shape"),
        (torch.zeros(2, 3, 9, 9), "shape"),
        (torch.zeros(2, 4, 9, 9, dtype=torch.int64), "floating"),
        (torch.zeros(2, 4, 9, 9, dtype=torch.bool), "floating"),
        (torch.zeros(2, 4, 9, 9).index_fill_(0, torch.tensor([1]), float("nan")), "NaN"),
        (torch.zeros(2, 4, 9, 9).index_fill_(0, torch.tensor([0]), float("inf")), "Inf"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error(bad, message: str) -> None:
    e, s = _pair()
    for p in _all_small(s, e):
        with pytest.raises(ValueError, match=message):
            p.protect(bad)


@pytest.mark.parametrize("generator", [5, "seed", torch.Generator])
def test_bad_generator_raises_value_error(generator) -> None:
    e, s = _pair()
    z = _features(2, e)
    for p in _all_small(s, e):
        with pytest.raises(ValueError, match="generator must be"):
            p.protect(z, generator=generator)


@pytest.mark.parametrize(
    "protection",
    [
        # Parameters within float32 whose noise overflows it: a third of Laplace draws exceed
        # 1.1 scales, 40 bounded uniform rounds of 1e38 add up past float32's 3.4e38.
        LaplaceDP(expected_shape=SMALL, seed=0, sensitivity=3e38),
        RandomPerturbation(expected_shape=SMALL, seed=0, bound=1e38),
    ],
)
def test_overflowing_parameters_never_return_inf(protection) -> None:
    e, _ = _pair()
    with pytest.raises(ValueError, match="not finite"):
        protection.protect(_features(2, e))


def test_float64_work_that_overflows_float16_is_refused() -> None:
    e, _ = _pair()
    z = _features(2, e).half()
    p = RandomPerturbation(expected_shape=SMALL, seed=0, bound=1e5, steps=2)
    with pytest.raises(ValueError, match="not finite"):
        p.protect(z)


def test_default_shape_is_e_output() -> None:
    p = NoProtection()
    assert p.expected_shape == (64, 77, 77)
    with pytest.raises(ValueError, match=r"\(N, 64, 77, 77\)"):
        p.protect(torch.zeros(1, 4, 9, 9))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("nope", {}, "unknown protection"),
        ("random", {"steps": -1}, "steps"),
        ("random", {"bound": float("nan")}, "bound"),
        ("random", {"bound": 1e39}, "float32"),
        ("dp", {"sensitivity": 1e300}, "float32"),
        ("random", {"distribution": "gauss"}, "distribution"),
        ("random", {"colour": 1}, "bad parameters"),
        ("dp", {"epsilon_dp": 0.0}, "epsilon_dp"),
        ("dp", {"sensitivity": -1.0}, "sensitivity"),
        ("dp", {"epsilon_dp": 1e-320}, "overflows"),
        ("dp", {"epsilon_dp": 1e-10, "sensitivity": 1e30}, "overflows"),
        ("none", {"seed": -3}, "seed"),
        ("none", {"expected_shape": (4, 9)}, "expected_shape"),
        ("advface", {}, "bad parameters"),
    ],
)
def test_build_protection_rejects_bad_parameters(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_protection(name, **params)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": 1.5}, "steps"),
        ({"alpha": -0.1}, "alpha"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"reading": "both"}, "reading"),
        ({"bn": "train"}, "bn"),
        ({"extractor_input": "raw"}, "extractor_input"),
        ({"device": "warp-drive"}, "device"),
    ],
)
def test_advface_rejects_bad_parameters(kw: dict, message: str) -> None:
    e, s = _pair()
    with pytest.raises(ValueError, match=message):
        _advface(s, e, **kw)
    with pytest.raises(ValueError, match="shadow"):
        AdvFace("/nonexistent/shadow/ckpt", e)


def test_output_keeps_shape_dtype_and_leaves_input_alone() -> None:
    e, s = _pair()
    z = _features(3, e)
    for p in _all_small(s, e):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            zin = z.to(dtype)
            before = zin.clone()
            out = p.protect(zin)
            assert out.shape == zin.shape and out.dtype == dtype and out.device == zin.device
            assert not out.requires_grad
            assert torch.equal(zin, before)
            assert out.data_ptr() != zin.data_ptr()


def test_protect_works_under_no_grad_and_inference_mode() -> None:
    e, s = _pair()
    p = _advface(s, e)
    z = _features(2, e)
    ref = p.protect(z)
    with torch.no_grad():
        assert torch.equal(p.protect(z), ref)
    with torch.inference_mode():
        zi = z.clone()
        assert torch.equal(p.protect(zi), ref)


def test_params_are_json_and_rebuild() -> None:
    e, s = _pair()
    for p in _all_small(s, e):
        record = json.loads(json.dumps(p.params()))
        assert record["name"] == p.name and p.name in PROTECTIONS
        if p.name in ("none", "random", "dp"):
            args = {k: v for k, v in record.items() if k not in ("name", "scale")}
            again = build_protection(p.name, expected_shape=SMALL, **args)
            assert again.params() == p.params()
    adv = _advface(s, e).params()
    assert adv["reading"] == "projected" and adv["bn"] == "batch"
    assert len(adv["shadow_sha256"]) == 64


# -- determinism and baselines ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RandomPerturbation, LaplaceDP])
def test_seeded_noise_is_reproducible(cls) -> None:
    z = torch.rand(3, *SMALL)
    a = cls(expected_shape=SMALL, seed=7)
    assert torch.equal(a.protect(z), a.protect(z))
    assert torch.equal(a.protect(z), cls(expected_shape=SMALL, seed=7).protect(z))
    assert not torch.equal(a.protect(z), cls(expected_shape=SMALL, seed=8).protect(z))
    # An explicit generator overrides the seed; a stream across calls differs per call.
    g = torch.Generator().manual_seed(7)
    assert torch.equal(a.protect(z, generator=g), a.protect(z))
    assert not torch.equal(a.protect(z, generator=g), a.protect(z))
    unseeded = cls(expected_shape=SMALL)
    assert not torch.equal(unseeded.protect(z), unseeded.protect(z))


def test_random_perturbation_bounds() -> None:
    z = torch.rand(4, *SMALL)
    one = RandomPerturbation(expected_shape=SMALL, steps=1, bound=0.2, seed=0).protect(z)
    assert float((one - z).abs().max()) <= 0.2 + 1e-6
    full = RandomPerturbation(expected_shape=SMALL, seed=0).protect(z)
    assert float((full - z).abs().max()) <= 40 * 0.2 + 1e-5
    # Sum of 40 U[-0.2, 0.2]: std = 0.2 * sqrt(40 / 3) ~ 0.73.
    assert 0.6 < float((full - z).std()) < 0.86
    sign = RandomPerturbation(expected_shape=SMALL, steps=1, distribution="sign", seed=0)
    assert torch.allclose((sign.protect(z) - z).abs(), torch.full_like(z, 0.2), atol=1e-6)
    assert torch.equal(RandomPerturbation(expected_shape=SMALL, steps=0).protect(z), z)


def test_laplace_scale_matches_budget() -> None:
    p = LaplaceDP(seed=0)
    assert p.scale == pytest.approx(0.2)
    z = torch.zeros(2, 64, 77, 77)
    noise = p.protect(z)
    assert torch.isfinite(noise).all()
    assert float(noise.abs().mean()) == pytest.approx(0.2, rel=0.01)  # E|Lap(b)| = b
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.005)
    assert LaplaceDP(epsilon_dp=0.5, sensitivity=0.2).scale == pytest.approx(0.4)


# -- AdvFace ----------------------------------------------------------------------------------


def test_advface_is_deterministic() -> None:
    e, s = _pair()
    z = _features(3, e)
    a = _advface(s, e).protect(z)
    assert torch.equal(a, _advface(s, e).protect(z))
    assert torch.equal(a, _advface(s, e, seed=3).protect(z))


def test_epsilon_zero_stores_the_shadow_feature() -> None:
    e, s = _pair()
    z = _features(2, e)
    out = _advface(s, e, epsilon=0.0).protect(z)
    with torch.no_grad():
        x_shadow = copy.deepcopy(s).train()(z)  # batch statistics, as AdvFace uses
        assert torch.allclose(out, e(x_shadow), atol=1e-6)
    assert torch.equal(_advface(s, e, steps=0).protect(z), out)


def test_per_step_reading_bounds_each_step_not_the_total() -> None:
    e, s = _pair()
    z = _features(3, e)
    res = _advface(s, e, steps=10, reading="per-step").run(z)
    assert len(res.step_linf) == 10 and len(res.losses) == 11
    assert max(res.step_linf) <= 0.2 + 1e-6
    assert res.drift_linf > 0.2 + 1e-3  # drift accumulates beyond epsilon
    assert res.drift_linf <= 10 * 0.2 + 1e-5
    # epsilon < alpha: steps are clipped to epsilon.
    small = _advface(s, e, steps=5, alpha=0.2, epsilon=0.05, reading="per-step").run(z)
    assert max(small.step_linf) <= 0.05 + 1e-6 and small.drift_linf > 0.05 + 1e-4


@pytest.mark.parametrize(("alpha", "eps"), [(0.2, 0.2), (0.05, 0.2), (0.3, 0.1)])
def test_projected_reading_stays_in_the_ball(alpha: float, eps: float) -> None:
    e, s = _pair()
    z = _features(3, e)
    res = _advface(s, e, steps=8, alpha=alpha, epsilon=eps, reading="projected").run(z)
    assert float((res.z - res.shadow_feature).abs().max()) <= eps + 1e-6
    assert res.drift_linf <= eps + 1e-6
    assert max(res.step_linf) <= min(alpha, 2 * eps) + 1e-6


def test_clamp_min_keeps_features_in_relu_range() -> None:
    e, s = _pair()
    z = _features(3, e)
    for reading in ("per-step", "projected"):
        res = _advface(s, e, steps=8, reading=reading, clamp_min=0.0).run(z)
        assert float(res.z.min()) >= 0.0
        assert max(res.step_linf) <= 0.2 + 1e-6
        if reading == "projected":
            assert res.drift_linf <= 0.2 + 1e-6
    unclamped = _advface(s, e, steps=8).protect(z)
    assert float(unclamped.min()) < 0.0  # the literal eq. 6 leaves E's range


def test_keep_best_stores_each_faces_highest_shadow_loss() -> None:
    e, s = _pair()
    z = _features(4, e)
    # "sample" statistics: a face's shadow loss does not depend on its batch-mates, so the
    # per-face best iterates can be compared directly.
    plain = _advface(s, e, steps=12, alpha=0.3, bn="sample")
    best = _advface(s, e, steps=12, alpha=0.3, bn="sample", keep_best=True)
    assert "keep_best" not in plain.params() and best.params()["keep_best"] is True
    res = best.run(z)
    assert max(res.losses) > res.losses[-1]  # sign steps overshoot: the last is not the best

    def per_face(out: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return best._loss(out, res.shadow_image)

    last = plain.protect(z)
    kept = best.protect(z)
    assert (per_face(kept) >= per_face(last)).all() and (per_face(kept) > per_face(last)).any()
    assert float((kept - res.shadow_feature).abs().max()) <= 0.2 + 1e-6
    with pytest.raises(ValueError, match="keep_best"):
        _advface(s, e, keep_best=1)


def test_shadow_and_extractor_are_never_modified() -> None:
    e, s = _pair()
    s.train()  # whatever mode the caller left them in is kept
    s_state = {k: v.clone() for k, v in s.state_dict().items()}
    e_state = {k: v.clone() for k, v in e.state_dict().items()}
    grads = [p.requires_grad for p in s.parameters()]
    z = _features(4, e)
    for bn in ("batch", "sample", "running"):
        _advface(s, e, bn=bn).protect(z)
    assert s.training and not e.training
    assert [p.requires_grad for p in s.parameters()] == grads and all(grads)
    for k, v in s.state_dict().items():
        assert torch.equal(v, s_state[k]), k  # running stats and num_batches_tracked
    for k, v in e.state_dict().items():
        assert torch.equal(v, e_state[k]), k
    assert all(p.grad is None for p in s.parameters())


def test_bn_statistics_come_from_the_batch() -> None:
    e, s = _pair()
    z = _features(4, e)
    batch = _advface(s, e, steps=0).run(z)
    with torch.no_grad():
        assert torch.allclose(batch.shadow_image, copy.deepcopy(s).train()(z), atol=1e-6)
        running = _advface(s, e, steps=0, bn="running").run(z)
        assert torch.allclose(running.shadow_image, s.eval()(z), atol=1e-6)
    assert not torch.allclose(batch.shadow_image, running.shadow_image, atol=1e-3)


def test_batch_of_one_and_batch_composition() -> None:
    e, s = _pair()
    z = _features(3, e)
    # One face alone: BN statistics over that face's 9x9 positions.
    one = _advface(s, e, bn="batch").run(z[:1])
    with torch.no_grad():
        assert torch.allclose(one.shadow_image, copy.deepcopy(s).train()(z[:1]), atol=1e-6)
    alone = torch.cat([_advface(s, e, bn="batch").protect(z[i : i + 1]) for i in range(3)])
    # "sample" mode on a batch == each face protected alone, whatever the batch.
    assert torch.allclose(_advface(s, e, bn="sample").protect(z), alone, atol=1e-5)
    assert torch.allclose(_advface(s, e, bn="sample").protect(z[1:]), alone[1:], atol=1e-5)
    # "batch" mode: a face's output depends on its batch-mates (documented behaviour).
    assert not torch.allclose(_advface(s, e, bn="batch").protect(z), alone, atol=1e-3)
    # "running" mode is composition-independent too.
    run_all = _advface(s, e, bn="running").protect(z)
    run_one = _advface(s, e, bn="running").protect(z[2:])
    assert torch.allclose(run_all[2:], run_one, atol=1e-5)


def test_shadow_loss_increases_on_a_trained_shadow() -> None:
    torch.manual_seed(0)
    e, s = TinyE().eval(), TinyS()
    images = torch.rand(16, 3, 20, 20)
    with torch.no_grad():
        feats = e(images)
    opt = torch.optim.Adam(s.parameters(), lr=1e-2)
    for _ in range(40):  # L1 training of the shadow (eq. 3)
        opt.zero_grad()
        F.l1_loss(s(feats), images).backward()
        opt.step()
    s.eval()
    z = _features(8, e, seed=5)
    for reading in ("per-step", "projected"):
        res = _advface(s, e, steps=10, reading=reading).run(z)
        assert res.losses[-1] > 1.2 * res.losses[0], (reading, res.losses)
        if reading == "per-step":  # projected PGD with alpha = epsilon oscillates in the box
            rises = sum(b > a for a, b in zip(res.losses, res.losses[1:], strict=False))
            assert rises >= 6, res.losses


def test_full_shape_with_resrec_shadow_and_checkpoint(tmp_path) -> None:
    from advface.models.recon import build_recon, save_checkpoint

    torch.manual_seed(0)
    shadow = build_recon("resrec", width=8, blocks=1).eval()
    extractor = nn.Sequential(  # E's geometry: 160 -> 79 -> 77 -> 77, ReLU at the end
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 64, 3), nn.ReLU()
    ).eval()
    save_checkpoint(tmp_path / "shadow", shadow, "resrec", {"width": 8, "blocks": 1}, seed=0)
    p = build_protection("advface", shadow=str(tmp_path / "shadow"), extractor=extractor, steps=2)
    z = torch.relu(torch.randn(1, 64, 77, 77))
    out = p.protect(z)
    assert out.shape == z.shape and torch.isfinite(out).all()
    params = json.loads(json.dumps(p.params()))
    assert params["shadow_config"]["arch"] == "resrec"
    assert params["shadow_path"].endswith("shadow")
    assert torch.equal(AdvFace(shadow, extractor, steps=2).protect(z), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    e, s = _pair()
    z = _features(3, e)
    # One step: later steps would compound any sign flip of a near-zero gradient entry.
    cpu = _advface(s, e, steps=1, reading="projected").run(z)
    gpu = _advface(s, e, steps=1, reading="projected", device="cuda")
    out = gpu.protect(z.cuda())
    assert out.is_cuda
    # Sign flips on near-zero gradients can differ; the bulk must agree.
    assert float((out.cpu() - cpu.z).abs().gt(1e-4).float().mean()) < 0.01
    for cls in (RandomPerturbation, LaplaceDP):
        p = cls(expected_shape=SMALL, seed=1)
        assert torch.allclose(p.protect(z.cuda()).cpu(), p.protect(z), atol=1e-6)


def test_concurrent_calls_agree() -> None:
    from concurrent.futures import ThreadPoolExecutor

    e, s = _pair()
    p = _advface(s, e, bn="sample")
    z = _features(4, e)
    ref = [p.protect(z[i : i + 1]) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda i: p.protect(z[i : i + 1]), range(4)))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int32, torch.uint8, torch.bool]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 10), min_size=0, max_size=5),
    dtype=st.sampled_from(_DTYPES),
    poison=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
)
def test_any_malformed_input_gives_value_error(shape, dtype, poison) -> None:
    z = torch.zeros(shape, dtype=dtype)
    if poison is not None and z.is_floating_point() and z.numel():
        z.view(-1)[0] = poison
    valid = tuple(shape[1:]) == SMALL and shape[0] >= 1 and z.is_floating_point() and poison is None
    for p in (NoProtection(expected_shape=SMALL), LaplaceDP(expected_shape=SMALL, seed=0)):
        if valid:
            assert p.protect(z).shape == z.shape
        else:
            with pytest.raises(ValueError):
                p.protect(z)


def test_channels_last_matches_default() -> None:
    e, s = _pair()
    z = _features(3, e)
    res = _advface(s, e, reading="projected", steps=1).run(z)
    fast = _advface(s, e, reading="projected", steps=1, channels_last=True).run(z)
    assert torch.allclose(fast.shadow_image, res.shadow_image, atol=1e-5)
    assert float((fast.z - res.z).abs().gt(1e-4).float().mean()) < 0.01
