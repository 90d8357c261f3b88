"""Regression: AdvFace, the random baseline and EmbeddingShadow give bit-identical outputs to
straightforward reference loops kept here (each one the algorithm as first written, before the
protections shared a PGD engine). Same networks, same seeds, ``torch.equal``, trace included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advface.protection.advface import AdvFace
from advface.protection.embedding_shadow import EmbeddingShadow
from advface.protection.random import RandomPerturbation

SMALL = (4, 9, 9)


# Tiny tensors: one torch thread (the conftest fixture) for every test here.
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyE(nn.Module):
    """(N,3,20,20) -> (N,4,9,9) >= 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class TinyS(nn.Module):
    """(N,4,9,9) -> (N,3,20,20) in [0,1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = F.relu(self.bn(self.conv1(z)))
        h = F.interpolate(h, size=20, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.conv2(h))


class TinyPsi(nn.Module):
    """(N,4,9,9) -> (N,6) unit embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 9 * 9, 6)

    def forward(self, z: Tensor) -> Tensor:
        return F.normalize(self.fc(z.flatten(1)), dim=1)


class TinyD(nn.Module):
    """(N,6) -> (N,3,20,20) in [0,1]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3 * 20 * 20)

    def forward(self, e: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(e)).view(-1, 3, 20, 20)


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    e, s = TinyE().eval(), TinyS().eval()
    with torch.no_grad():
        s.bn.running_mean.uniform_(-0.5, 0.5)
        s.bn.running_var.uniform_(0.5, 2.0)
    return {"extractor": e, "shadow": s, "head": TinyPsi().eval(), "generator": TinyD().eval()}


def _features(nets: dict[str, nn.Module], n: int = 3, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return nets["extractor"](torch.rand(n, 3, 20, 20, generator=g))


# -- reference loops ----------------------------------------------------------------------------


def _ref_advface(p: AdvFace, z: Tensor) -> tuple[Tensor, list[float], list[float], float]:
    with torch.no_grad():
        x_shadow = p.shadow(z)
        z0 = p.extractor(p._to_input(x_shadow))
        if p.clamp_min is not None:
            z0 = z0.clamp_min(p.clamp_min)
        zt, losses, step_linf = z0, [], []
        size = min(p.alpha, p.epsilon) if p.reading == "per-step" else p.alpha
        for _ in range(p.steps if p.epsilon > 0 else 0):
            with torch.enable_grad():
                zg = zt.detach().requires_grad_(True)
                loss = (p.shadow(zg) - x_shadow).abs().sum()
                (grad,) = torch.autograd.grad(loss, zg)
            znext = zt + size * grad.sign()
            if p.reading == "projected":
                znext = z0 + (znext - z0).clamp(-p.epsilon, p.epsilon)
            if p.clamp_min is not None:
                znext = znext.clamp_min(p.clamp_min)
            losses.append(float(loss))
            step_linf.append(float((znext - zt).abs().max()))
            zt = znext
        losses.append(float((p.shadow(zt) - x_shadow).abs().sum()))
        drift = float((zt - z0).abs().max()) if p.steps else 0.0
    return zt, losses, step_linf, drift


def _ref_random(p: RandomPerturbation, z: Tensor, generator: torch.Generator) -> Tensor:
    out = z.clone()
    for _ in range(p.steps):
        n = torch.rand(z.shape, generator=generator, dtype=z.dtype).mul_(2).sub_(1)
        if p.distribution == "sign":
            n = torch.where(n >= 0, 1.0, -1.0).to(z.dtype)
        out.add_(n, alpha=p.bound)
        if p.reading == "projected":
            out = z + (out - z).clamp_(-p.epsilon, p.epsilon)
    return out


def _ref_unit(g: Tensor) -> Tensor:
    scale = g.abs().flatten(1).mean(1).clamp_min(1e-20)
    return g / scale.view(-1, *([1] * (g.dim() - 1)))


def _ref_embedding_shadow(p: EmbeddingShadow, z: Tensor, generator: torch.Generator) -> Tensor:
    with torch.no_grad():
        e = F.normalize(p.head(z), dim=1)
        x_shadow = p.generator(e)
        z0 = p.extractor((x_shadow * 255.0 - 127.5) / 128.0)
        zt = z0
        if p.random_start and p.epsilon > 0:
            u = torch.rand(z0.shape, generator=generator, dtype=z0.dtype).mul_(2).sub_(1)
            zt = z0 + p.epsilon * u
        steps = p.steps if p.epsilon > 0 else 0
        for t in range(steps):
            with torch.enable_grad():
                zg = zt.detach().requires_grad_(True)
                rec = (p.shadow(zg) - x_shadow).abs().sum()
                (g_rec,) = torch.autograd.grad(rec, zg)
                g = _ref_unit(g_rec)
                if p.identity_weight > 0:
                    ident = F.cosine_similarity(p.head(zg), e, dim=1).sum()
                    (g_id,) = torch.autograd.grad(ident, zg)
                    g = g + p.identity_weight * _ref_unit(g_id)
            step = g.sign() if p.step_rule == "sign" else _ref_unit(g)
            size = p.alpha * 2 * (steps - t) / steps if p.decay else p.alpha
            zt = z0 + (zt + size * step - z0).clamp(-p.epsilon, p.epsilon)
    return zt


# -- the protections against them ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"reading": "per-step", "alpha": 0.3, "epsilon": 0.1},
        {"reading": "per-step", "alpha": 0.05, "epsilon": 0.2, "clamp_min": 0.0},
        {"clamp_min": 0.0, "bn": "sample", "alpha": 0.07, "epsilon": 0.15},
        {"bn": "running", "extractor_input": "facenet", "steps": 3},
        {"epsilon": 0.0},
        {"steps": 0},
    ],
)
def test_advface_matches_reference(nets, kw) -> None:
    settings = {"steps": 5, "extractor_input": "unit", **kw}
    p = AdvFace(nets["shadow"], nets["extractor"], expected_shape=SMALL, **settings)
    z = _features(nets)
    res = p.run(z)
    z_ref, losses, step_linf, drift = _ref_advface(p, z)
    assert torch.equal(res.z, z_ref)
    assert torch.equal(p.protect(z), z_ref)
    assert res.losses == losses and res.step_linf == step_linf and res.drift_linf == drift


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"distribution": "sign"},
        {"reading": "projected", "epsilon": 0.1},
        {"reading": "projected", "epsilon": 0.3, "distribution": "sign", "bound": 0.25},
        {"reading": "projected", "epsilon": 0.0, "steps": 3},
        {"steps": 0},
    ],
)
def test_random_matches_reference(nets, kw) -> None:
    p = RandomPerturbation(expected_shape=SMALL, **{"steps": 7, **kw})
    z = _features(nets)
    out = p.protect(z, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, _ref_random(p, z, torch.Generator().manual_seed(5)))
    seeded = RandomPerturbation(expected_shape=SMALL, seed=11, **{"steps": 7, **kw})
    assert torch.equal(seeded.protect(z), _ref_random(p, z, torch.Generator().manual_seed(11)))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"step_rule": "scaled", "decay": False},
        {"step_rule": "scaled", "identity_weight": 0.0},
        {"random_start": False, "identity_weight": 3.0, "bn": "batch"},
        {"epsilon": 0.0},
        {"steps": 0, "epsilon": 0.3},
    ],
)
def test_embedding_shadow_matches_reference(nets, kw) -> None:
    settings = {"steps": 4, "alpha": 0.05, "epsilon": 0.2, **kw}
    p = EmbeddingShadow(expected_shape=SMALL, **nets, **settings)
    z = _features(nets)
    out = p.protect(z, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, _ref_embedding_shadow(p, z, torch.Generator().manual_seed(3)))
