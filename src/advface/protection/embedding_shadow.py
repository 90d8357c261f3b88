"""Embedding-shadow: stored features computed from the embedding alone, never from z.

AdvFace's shadow image S(z) is computed from the full feature z, so it carries the face and an
attacker who trains on protected features learns to undo the perturbation. Here the stored
feature is a function of the embedding e = Psi(z) and of fresh randomness only:

    e   = Psi(z)                                   (the only thing read from z)
    x~  = D(e)                                     (server's embedding-to-image generator)
    z~  = E(x~)
    z_0 = z~ + u,  u ~ U[-epsilon, epsilon]        (random start: the randomness r)
    alpha_t = alpha * 2 (T - t) / T                 (decaying steps)
    z_{t+1} = Proj_eps( z_t + alpha_t * sign(g_rec/|g_rec| + lambda g_id/|g_id|) )

(Proj_eps: onto {||z - z~||_inf <= epsilon})

with g_rec the gradient of AdvFace's loss ||S(z_t) - x~||_1 (S: the server's shadow
reconstructor) and g_id the gradient of cos(Psi(z_t), e), each normalised by its mean absolute
value so that ``identity_weight`` (lambda) balances them whatever their scales. Every step
depends on (e, u) alone, so by the data-processing inequality no attacker of the stored z_T can
learn more about the face than an attacker of e: the *embedding floor*. Two feature maps with
the same embedding get identically distributed outputs (:meth:`EmbeddingShadow.protect_embedding`
is the core and takes only e).

Shapes: z (N,64,77,77) -> (N,64,77,77); e (N,512); D: (N,512) -> (N,3,160,160) in [0,1];
S: (N,64,77,77) -> (N,3,160,160); E: FaceNet input -> (N,64,77,77); Psi: (N,64,77,77) -> (N,512).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advface.checks import check_batch
from advface.models.facenet import unit_to_facenet
from advface.protection.advface import BN_MODES, _frozen_copy, _swap_norms, fingerprint, load_shadow
from advface.protection.base import (
    Protection,
    check_choice,
    check_finite_number,
    check_generator,
    check_int,
    check_output_finite,
)
from advface.protection.pgd import PGD, unit_scale


def default_weights_dir() -> Path:
    """Where ``advface train-protection`` puts the default generator and shadow (used when none
    is given): ``$ADVFACE_CACHE_DIR/weights/embedding-shadow``. Trained networks are data, not
    code: they live in the cache, with a manifest of how they were made."""
    from advface.config import cache_dir

    return cache_dir() / "weights" / "embedding-shadow"


#: ``sign``: alpha * sign(g) (AdvFace's step); ``scaled``: alpha * g / mean|g| (the same mean
#: step, larger where the gradient is larger; it measured no better than sign). The iterations
#: run on the shared PGD engine (:mod:`advface.protection.pgd`).
STEP_RULES: tuple[str, ...] = ("sign", "scaled")


def _default_split() -> tuple[nn.Module, nn.Module]:
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet

    return split_facenet(load_facenet())


def _module(value: nn.Module | str | Path, what: str) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(value, str | Path):
        module, info = load_shadow(value)
        return module, {f"{what}_path": info["shadow_path"]}
    if not isinstance(value, nn.Module):
        raise ValueError(f"{what} must be a torch module or a checkpoint path, got {value!r}")
    return value, {}


class EmbeddingShadow(Protection):
    """The ``embedding-shadow`` protection (see the module docstring for the algorithm).

    Args:
        generator: D, embedding -> image in [0,1] (module or EmbDec checkpoint directory),
            trained by the server on its own faces; default: the one ``advface
            train-protection`` built.
        shadow: S, feature -> image (module or checkpoint), the reconstructor PGD works against;
            default: the one ``advface train-protection`` built (:func:`default_weights_dir`).
        extractor, head: E and Psi; default the converted FaceNet split at conv2d_2b.
        steps: PGD iterations T (default 30).
        alpha: mean step size (default 0.1).
        epsilon: l_inf radius around z~ of the random start and of every iterate (default 1.0).
            It bounds how far the stored feature is from a generated face's, not what it
            reveals (that is bounded by e whatever epsilon is).
        decay: step size alpha * 2(T - t)/T at step t (default True) instead of a fixed alpha.
            Defaults chosen on 32 LFW test faces with CPU-profile S and D (mean cos(Psi(z'), e)):
            20 fixed steps of 0.05 within 0.5 gave 0.80; with decay 0.89; alpha 0.1 within 1.0
            with decay 0.93 (20 steps) and 0.97 (30 steps).
        identity_weight: lambda, weight of the normalised identity gradient (default 1.0;
            0 = AdvFace's objective alone started from D(e)).
        identity_every: recompute the identity gradient every k-th step and reuse it in
            between (default 1: every step). Psi's backward dominates a step's cost.
        random_start: draw u (default True); without it the output is a deterministic function
            of e.
        bn: statistics of S's BatchNorm layers as in AdvFace (default ``"sample"``: each face
            is protected as if alone, whatever else is in its batch).
        device: where the networks run (default CPU).

    Costs per face and step one forward+backward of S and of Psi (Psi dominates: about 4
    GFLOPs for FaceNet), plus one forward of D and E.
    """

    name: ClassVar[str] = "embedding-shadow"

    def __init__(
        self,
        generator: nn.Module | str | Path | None = None,
        shadow: nn.Module | str | Path | None = None,
        extractor: nn.Module | None = None,
        head: nn.Module | None = None,
        *,
        steps: int = 30,
        alpha: float = 0.1,
        epsilon: float = 1.0,
        identity_weight: float = 1.0,
        identity_every: int = 1,
        random_start: bool = True,
        bn: str = "sample",
        step_rule: str = "sign",
        decay: bool = True,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.step_rule = check_choice("step_rule", step_rule, STEP_RULES)
        if not isinstance(decay, bool):
            raise ValueError(f"decay must be a bool, got {decay!r}")
        self.decay = decay
        self.steps = check_int("steps", steps, low=0)
        self.alpha = check_finite_number("alpha", alpha, low=0.0)
        self.epsilon = check_finite_number("epsilon", epsilon, low=0.0)
        self.identity_weight = check_finite_number("identity_weight", identity_weight, low=0.0)
        self.identity_every = check_int("identity_every", identity_every, low=1)
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be a bool, got {random_start!r}")
        self.random_start = random_start
        self.bn = check_choice("bn", bn, BN_MODES)
        if generator is None or shadow is None:
            default = default_weights_dir()
            if not (default / "manifest.json").is_file():
                raise ValueError(
                    f"no generator/shadow given and no trained networks at {default}: build "
                    "them once with `advface train-protection` (CelebA's server half, minutes)"
                )
            generator = default / "generator" if generator is None else generator
            shadow = default / "shadow" if shadow is None else shadow
        gen, self._info = _module(generator, "generator")
        sha, info = _module(shadow, "shadow")
        self._info.update(info)
        if (extractor is None) != (head is None):
            raise ValueError("give both extractor and head, or neither (the FaceNet default)")
        if extractor is None:
            extractor, head = _default_split()
        for name, m in (("extractor", extractor), ("head", head)):
            if not isinstance(m, nn.Module):
                raise ValueError(f"{name} must be a torch module, got {type(m).__name__}")
        self.fingerprints = {
            "generator_sha256": fingerprint(gen),
            "shadow_sha256": fingerprint(sha),
            "extractor_sha256": fingerprint(extractor),
            "head_sha256": fingerprint(head),
        }
        self.generator = _frozen_copy(gen)
        self.shadow = _frozen_copy(sha)
        _swap_norms(self.shadow, self.bn)
        self.extractor = _frozen_copy(extractor)
        self.head = _frozen_copy(head)
        self.device = torch.device("cpu")
        self.to(device if device is not None else "cpu")

    def to(self, device: str | torch.device) -> EmbeddingShadow:
        """Move every network to ``device`` (returns self)."""
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"bad device {device!r}: {exc}") from exc
        for m in (self.generator, self.shadow, self.extractor, self.head):
            m.to(dev)
        self.device = dev
        return self

    # -- the protection ---------------------------------------------------------------------

    def _protect(self, z: Tensor, generator: torch.Generator | None) -> Tensor:
        z = z.to(self.device, torch.float32)
        e = self.head(z)
        return self._from_embedding(e, generator)

    def protect_embedding(self, e: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The core: stored features (N,64,77,77) from embeddings e (N,512) and randomness."""
        check_batch("embeddings (N, D)", e, dims=2)
        width = self._embedding_width()
        if width is not None and e.shape[1] != width:
            raise ValueError(f"embeddings must be {width}-d (D's input), got {e.shape[1]}")
        generator = check_generator(generator)
        if generator is None and self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
        with torch.inference_mode(False), torch.no_grad():
            out = self._from_embedding(e.detach().to(self.device, torch.float32), generator)
        check_output_finite(self.name, out)
        return out

    def _embedding_width(self) -> int | None:
        """The embedding width D reads: its ``input_shape`` (EmbDec records it), else its first
        linear layer's input; None when neither says."""
        shape = getattr(self.generator, "input_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int):
            return shape[0]
        first = next((m for m in self.generator.modules() if isinstance(m, nn.Linear)), None)
        return None if first is None else int(first.in_features)

    def _from_embedding(self, e: Tensor, generator: torch.Generator | None) -> Tensor:
        e = F.normalize(e, dim=1)
        x_shadow = self.generator(e)
        z0 = self.extractor(unit_to_facenet(x_shadow))
        engine = PGD(
            steps=self.steps if self.epsilon > 0 else 0,
            alpha=self.alpha,
            epsilon=self.epsilon,
            reading="projected",
            step_rule=self.step_rule,
            # "decay": alpha * 2(T - t)/T, the same total path with large early steps and fine
            # late ones (sign steps of a fixed size oscillate around the target embedding).
            schedule="decay" if self.decay else "constant",
            random_start=self.random_start,
        )

        step = 0
        g_id: Tensor | None = None

        def direction(zt: Tensor) -> Tensor:
            nonlocal step, g_id
            with torch.enable_grad():
                zg = zt.detach().requires_grad_(True)
                rec = (self.shadow(zg) - x_shadow).abs().sum()
                (g_rec,) = torch.autograd.grad(rec, zg)
                g = unit_scale(g_rec)
                if self.identity_weight > 0:
                    # Psi's backward is most of a step's cost: with identity_every = k the
                    # identity direction is recomputed every k-th step and reused in between.
                    if step % self.identity_every == 0:
                        zi = zt.detach().requires_grad_(True)
                        ident = F.cosine_similarity(self.head(zi), e, dim=1).sum()
                        (grad,) = torch.autograd.grad(ident, zi)
                        g_id = unit_scale(grad)
                    g = g + self.identity_weight * g_id
            step += 1
            return g

        return engine(z0, direction=direction, generator=generator)

    def _params(self) -> dict[str, Any]:
        # identity_every = 1 computes exactly what versions without the option did: it is left
        # out then, so templates and cached stages made by those versions still match.
        every = {"identity_every": self.identity_every} if self.identity_every != 1 else {}
        return {
            "steps": self.steps,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "identity_weight": self.identity_weight,
            **every,
            "random_start": self.random_start,
            "bn": self.bn,
            "step_rule": self.step_rule,
            "decay": self.decay,
            **self.fingerprints,
            **self._info,
        }
