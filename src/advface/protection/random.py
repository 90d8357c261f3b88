"""Random-perturbation baseline (paper Sec. 5.1.3): T rounds of bounded random noise."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from advface.protection.base import (
    Protection,
    check_choice,
    check_finite_number,
    check_int,
    noise_like,
)
from advface.protection.pgd import PGD


class RandomPerturbation(Protection):
    """Add ``steps`` rounds of element-wise random noise, each bounded by ``bound`` in l_inf.

    z (N,64,77,77) -> z + sum_t n_t with n_t ~ U[-bound, bound] (``distribution="uniform"``,
    default) or n_t = bound * random sign (``"sign"``: AdvFace's step with a random instead of
    an adversarial direction). Defaults follow the paper: 40 iterations, bound 0.2. The noise
    starts from the client feature z (not from a shadow feature) as the paper describes.
    No clamping to the feature domain: the paper's baseline has none.

    ``reading="accumulated"`` (default, the paper's text) lets the rounds add up (per-element
    spread about ``bound * sqrt(steps / 3)``); ``reading="projected"`` projects the running sum
    onto {||z' - z||_inf <= epsilon} after every round, the same budget as AdvFace's projected
    reading, so that the two are compared like for like. Runs on the shared PGD engine
    (:mod:`advface.protection.pgd`) with a random direction and the ``raw`` step rule.
    """

    name: ClassVar[str] = "random"

    def __init__(
        self,
        *,
        steps: int = 40,
        bound: float = 0.2,
        distribution: str = "uniform",
        reading: str = "accumulated",
        epsilon: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reading = check_choice("reading", reading, ("accumulated", "projected"))
        self.epsilon = check_finite_number("epsilon", epsilon, low=0.0)
        self.steps = check_int("steps", steps, low=0)
        self.bound = check_finite_number("bound", bound, low=0.0)
        self.distribution = check_choice("distribution", distribution, ("uniform", "sign"))

    def _protect(self, z: Tensor, generator: torch.Generator | None) -> Tensor:
        engine = PGD(
            steps=self.steps,
            alpha=self.bound,
            epsilon=self.epsilon,
            reading=self.reading,
            step_rule="raw",
        )

        def direction(_: Tensor) -> Tensor:
            # One draw per round (not one scaled draw) so that each round is bounded on its own.
            n = noise_like(z, generator, "uniform")
            if self.distribution == "sign":
                n = torch.where(n >= 0, 1.0, -1.0).to(z.dtype)
            return n

        return engine(z, direction=direction)

    def _params(self) -> dict[str, Any]:
        out = {"steps": self.steps, "bound": self.bound, "distribution": self.distribution}
        if self.reading == "projected":  # the legacy record stays unchanged
            out.update(reading=self.reading, epsilon=self.epsilon)
        return out
