"""Protections of client features z (N,64,77,77): none, random, dp, advface, embedding-shadow.

``build_protection(name, **params)`` is the one entry point the CLI, pipelines and the
template service use; every protection has ``protect(z)``, ``name`` and ``params()``.
"""

from __future__ import annotations

from typing import Any

from advface.protection.base import FEATURE_SHAPE, NoProtection, Protection
from advface.protection.spec import feature_fn_from_spec, parse_spec, protection_from_spec

#: Names accepted by :func:`build_protection`.
PROTECTIONS: tuple[str, ...] = ("none", "random", "dp", "advface", "embedding-shadow")


def _classes() -> dict[str, type[Protection]]:
    # Imported here so that ``import advface.protection`` stays light for the service.
    from advface.protection.advface import AdvFace
    from advface.protection.dp import LaplaceDP
    from advface.protection.embedding_shadow import EmbeddingShadow
    from advface.protection.random import RandomPerturbation

    return {
        "none": NoProtection,
        "random": RandomPerturbation,
        "dp": LaplaceDP,
        "advface": AdvFace,
        "embedding-shadow": EmbeddingShadow,
    }


def build_protection(name: str, **params: Any) -> Protection:
    """Build a protection by registry name.

    - ``none``: ``seed``
    - ``random``: ``steps=40, bound=0.2, distribution="uniform"|"sign",
      reading="accumulated"|"projected", epsilon=0.2, seed``
    - ``dp``: ``epsilon_dp=1.0, sensitivity=0.2, seed``
    - ``advface``: ``shadow`` (module or checkpoint dir, required), ``extractor`` (module;
      default: E of the converted FaceNet), ``steps=40, alpha=0.2, epsilon=0.2,
      reading="projected"|"per-step", bn="batch"|"sample"|"running", clamp_min=None,
      keep_best=False, device``
    - ``embedding-shadow``: ``generator`` and ``shadow`` (modules or checkpoint dirs, required),
      ``extractor``/``head`` (default: the converted FaceNet's E and Psi), ``steps=30,
      alpha=0.1, epsilon=1.0, decay=True, identity_weight=1.0, random_start=True,
      bn="sample", step_rule="sign", device``

    All take ``expected_shape=(64, 77, 77)``. Unknown names or parameters raise ``ValueError``.
    """
    classes = _classes()
    if name not in classes:
        raise ValueError(f"unknown protection {name!r}; choose one of {', '.join(PROTECTIONS)}")
    cls = classes[name]
    try:
        return cls(**params)
    except TypeError as exc:  # unknown/missing keyword -> the library's ValueError convention
        raise ValueError(f"bad parameters for protection {name!r}: {exc}") from exc


__all__ = [
    "FEATURE_SHAPE",
    "PROTECTIONS",
    "NoProtection",
    "Protection",
    "build_protection",
    "feature_fn_from_spec",
    "parse_spec",
    "protection_from_spec",
]
