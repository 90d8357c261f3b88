"""The networks the service and the SDK run: client extractor E and server part Psi.

``facenet`` is the real split FaceNet (``advface.models``); ``toy`` is a tiny deterministic
stand-in with the same tensor contract, for tests and smoke runs without converted weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from advface.service.payload import FEATURE_SHAPE

# Bump when the split point or the weights change: stored templates carry it, and templates of
# another version are not comparable (they are skipped, and counted, at start-up).
FACENET_VERSION = "facenet-casia-20180408/conv2d_2b"
TOY_VERSION = "toy-v1"


@dataclass
class Backend:
    """E (images -> feature maps) and Psi (feature maps -> L2-normalised embeddings)."""

    extractor: Callable[[Tensor], Tensor]
    psi: Callable[[Tensor], Tensor]
    version: str
    feature_shape: tuple[int, int, int] = FEATURE_SHAPE
    # Version of Psi alone (stored with each embedding). Change it when Psi changes but E does
    # not: stored maps stay valid and ``advface reembed`` recomputes their embeddings.
    psi_version: str = ""
    # Protection a distilled Psi was trained for ("" for the original Psi).
    head_protection: str = ""
    _dim: int = 0

    @property
    def embedding_version(self) -> str:
        return self.psi_version or self.version

    @property
    def embedding_dim(self) -> int:
        """Length of Psi's embeddings (one forward pass on zeros, once)."""
        if not self._dim:
            self._dim = int(self.embed(torch.zeros((1, *self.feature_shape))).shape[1])
        return self._dim

    @torch.inference_mode()
    def embed(self, z: Tensor) -> Tensor:
        """Psi on float32 feature maps (N, 64, 77, 77) -> (N, D), unit-norm rows."""
        return nn.functional.normalize(self.psi(z.float()), dim=1)


class _ToyE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 160 -> 77 like FaceNet's stem: (160 - 7) // 2 + 1 = 77.
        self.conv = nn.Conv2d(3, 64, kernel_size=7, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x))


class _ToyPsi(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.fc = nn.Linear(64 * 36, 128)

    def forward(self, z: Tensor) -> Tensor:
        return nn.functional.normalize(self.fc(self.pool(z).flatten(1)), dim=1)


def toy_backend(seed: int = 0) -> Backend:
    """Deterministic stand-in networks (same weights in every process for a given seed)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        e, psi = _ToyE().eval(), _ToyPsi().eval()
    finally:
        torch.random.set_rng_state(gen_state)
    return Backend(extractor=e, psi=psi, version=TOY_VERSION)


def facenet_backend() -> Backend:
    """The converted FaceNet split at the paper's point (E on clients, Psi on the server)."""
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet

    e, psi = split_facenet(load_facenet())
    return Backend(extractor=e.eval(), psi=psi.eval(), version=FACENET_VERSION)


def with_head(base: Backend, head: str | Path) -> Backend:
    """``base`` with Psi replaced by the distilled head in folder ``head`` (``advface
    distill``): same E and feature maps, Psi version = the head's ``model_version``, so stored
    embeddings are recorded under it and ``advface reembed`` migrates them. The head must have
    been distilled from ``base``'s Psi (checked by fingerprint)."""
    from advface.models.distill import load_student

    if not isinstance(base.psi, nn.Module):
        raise ValueError("a distilled head needs a backend whose Psi is a torch module")
    student, config = load_student(head, base.psi)
    return Backend(
        extractor=base.extractor,
        psi=student,
        version=base.version,
        feature_shape=base.feature_shape,
        psi_version=config["model_version"],
        head_protection=str((config.get("protection") or {}).get("name", "")),
    )


def load_backend(name: str, head: str | Path | None = None) -> Backend:
    """``"facenet"`` or ``"toy"``; with ``head``, its Psi is that distilled head."""
    if name == "facenet":
        base = facenet_backend()
    elif name == "toy":
        base = toy_backend()
    else:
        raise ValueError(f"unknown backend {name!r}; choose 'facenet' or 'toy'")
    return with_head(base, head) if head else base
