"""AdvFace (CVPR 2023, Sec. 4): adversarial features against reconstruction attacks.

For client features z (N,64,77,77), with the server's shadow reconstructor S (features ->
images in [0,1]) and the client extractor E (images -> features):

    x~ = S(z),  z~ = E(x~)                                   (eq. 4)
    z_0 = z~,   z_{t+1} = z_t + alpha * sign(grad_z ||S(z_t) - x~||_1)   (eqs. 5-6)

and z_T is stored. Note that the stored feature starts from the *shadow* feature z~, not from z:
even with epsilon = 0 the stored feature is E(S(z)).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from advface.models.facenet import unit_to_facenet
from advface.models.fingerprint import state_fingerprint as fingerprint
from advface.protection.base import Protection, check_choice, check_finite_number, check_int
from advface.protection.pgd import PGD, PGDTrace

READINGS: tuple[str, ...] = ("per-step", "projected")
BN_MODES: tuple[str, ...] = ("batch", "sample", "running")
EXTRACTOR_INPUTS: tuple[str, ...] = ("facenet", "unit")


#: Images in [0,1] -> FaceNet input (x*255 - 127.5) / 128 (what E expects); the function lives
#: with the model, this name is kept for older imports.
facenet_standardize = unit_to_facenet


class _ShadowNorm(nn.Module):
    """Stand-in for one BatchNorm layer of the private copy of S.

    ``batch``: statistics over the batch and spatial positions (the paper's choice, Sec. 4.2);
    ``sample``: statistics of each sample over its own spatial positions (as if every face were
    protected alone: batch-composition independent); ``running``: the stored training
    statistics. Forward is stateless (F.batch_norm without running buffers), so the stored
    statistics never change and concurrent calls are safe. Where a mode has only one value
    per channel to estimate from (no spatial extent, e.g. BatchNorm1d on (1, C)), it falls back
    to the running statistics, as a variance cannot be estimated from one value.
    """

    def __init__(self, bn: _BatchNorm, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)

    def _running(self, x: Tensor) -> Tensor:
        if self.running_mean is None:  # track_running_stats=False: nothing stored
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def forward(self, x: Tensor) -> Tensor:
        spatial = x[0, 0].numel() if x.dim() > 2 else 1
        if self.mode == "running":
            return self._running(x)
        if self.mode == "batch":
            if x.shape[0] * spatial <= 1:
                return self._running(x)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # "sample": per-sample, per-channel statistics over spatial positions.
        if spatial <= 1:
            return self._running(x)
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _swap_norms(module: nn.Module, mode: str) -> int:
    """Replace every BatchNorm under ``module`` (in place) by a :class:`_ShadowNorm`."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(module, name, _ShadowNorm(child, mode))
            count += 1
        else:
            count += _swap_norms(child, mode)
    return count


def _frozen_copy(module: nn.Module) -> nn.Module:
    """Private eval-mode copy with parameters frozen: the caller's module is never touched
    (no requires_grad flips to restore, no BN buffers to protect, safe across threads)."""
    clone = copy.deepcopy(module).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def load_shadow(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a shadow reconstructor from a recon checkpoint directory.

    Returns ``(module, info)`` where ``info`` is JSON-serialisable (path and the checkpoint
    config when the loader returns one).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"shadow checkpoint {p} does not exist")
    from advface.models.recon import load_checkpoint  # core -> core; loaded lazily

    loaded = load_checkpoint(p)
    module, config = loaded, None
    if isinstance(loaded, tuple):
        module = loaded[0]
        config = next((x for x in loaded[1:] if isinstance(x, dict)), None)
    elif not isinstance(loaded, nn.Module):
        module = getattr(loaded, "model", None) or getattr(loaded, "module", None)
        config = getattr(loaded, "config", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"shadow checkpoint {p} did not yield a torch module")
    info: dict[str, Any] = {"shadow_path": str(p.resolve())}
    if config is not None and not isinstance(config, dict) and hasattr(config, "__dict__"):
        config = vars(config)
    if isinstance(config, dict):
        # Stored beside every template: keep what identifies the model, not its loss history.
        info["shadow_config"] = {
            k: v for k, v in config.items() if k not in _BULKY_CONFIG_KEYS and _jsonable(v)
        }
    return module, info


_BULKY_CONFIG_KEYS = frozenset({"history", "disjoint_check"})


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool | list | dict)


def _default_extractor() -> nn.Module:
    from advface.models.facenet import load_facenet
    from advface.models.split import split_facenet

    extractor, _ = split_facenet(load_facenet())
    return extractor


@dataclass
class AdvFaceResult:
    """Output of :meth:`AdvFace.run`. Tensors live on the protection's device.

    ``losses[t]`` is ||S(z_t) - x~||_1 summed over the batch, t = 0..T (z_0 = z~);
    ``step_linf[t]`` = max |z_{t+1} - z_t|; ``drift_linf`` = max |z_T - z~|.
    """

    z: Tensor
    shadow_image: Tensor
    shadow_feature: Tensor
    losses: list[float] = field(default_factory=list)
    step_linf: list[float] = field(default_factory=list)
    drift_linf: float = 0.0


class AdvFace(Protection):
    """AdvFace protection (paper Sec. 4, eqs. 2-6).

    Args:
        shadow: shadow reconstructor S, (N,64,77,77) -> (N,3,160,160) in [0,1] (a module or a
            recon checkpoint directory). Its BatchNorm layers are re-estimated (``bn``).
        extractor: client extractor E, (N,3,160,160) -> (N,64,77,77); default the converted
            FaceNet's E. Used in eval mode with its own (training) BN statistics.
        steps: T, PGD iterations (default 40, Sec. 5.1.2).
        alpha: step size of eq. 6 (default 0.2).
        epsilon: l_inf noise bound (default 0.2). Its meaning depends on ``reading``.
        reading: eq. 6 bounds ||z_{t+1} - z_t|| < epsilon.
            ``"projected"`` (default): standard PGD [21], each iterate projected onto
            {||z - z~||_inf <= epsilon}. ``"per-step"`` (the literal reading): each step is
            alpha*sign(g) clipped element-wise to [-epsilon, epsilon], so |z_T - z~| can reach
            T*min(alpha, epsilon) (8.0 at the defaults). The default was chosen by measurement
            (docs/results/cpu/report.md): on LFW, projected gave SSIM 0.31 / SRRA 10.8% /
            accuracy 99% (paper: 0.28 / 4.03% / 96.43%); per-step gave SSIM 0.01 / SRRA 0% but
            accuracy 63%.
        bn: statistics used by S's BatchNorm layers. ``"batch"`` (default, end of Sec. 4.2):
            from the batch being protected, so a face's output depends on which faces share its
            batch; batch of one = statistics from that sample's 77x77 spatial positions.
            ``"sample"``: each face's own statistics (equal to protecting faces one at a time,
            independent of batch composition; what a one-face-per-request service gets).
            ``"running"``: S's training statistics.
        clamp_min: if set (e.g. 0.0), clamp every iterate to >= clamp_min. Off by default:
            eq. 6 has no domain constraint and Psi accepts any real input. E ends in ReLU, so
            ``clamp_min=0.0`` keeps stored features in E's range (harder to tell apart from
            clean ones) at the cost of dropping the negative steps on zero activations.
            Applied after the projection; the projected bound still holds because z~ >= 0.
        extractor_input: ``"facenet"`` feeds E with (x*255-127.5)/128 (FaceNet's
            preprocessing), ``"unit"`` with the [0,1] image unchanged.
        device: where S and E run (default CPU); inputs are moved there and outputs back.
        channels_last: run S and E in channels-last memory format (about 12% less CPU time
            with oneDNN in our measurement; results differ from the default only by float
            rounding). An execution detail, so not part of :meth:`params`.
        keep_best: store, for each face, the iterate z_0..z_T with the highest shadow loss
            ||S(z_t) - x~||_1 (that face's share of eq. 5 as evaluated in its batch) instead of
            z_T. Off by default (the paper stores z_T).

    The loss is the L1 norm summed over all elements of the batch (eq. 5); only its sign
    matters, so sum vs mean does not change the result. sign(0) = 0 as in the paper.
    The iterations run on the shared PGD engine (:mod:`advface.protection.pgd`).
    Deterministic: no randomness is used (``seed`` is accepted for interface uniformity);
    on CUDA, non-deterministic cuDNN kernels can still flip signs of near-zero gradients.
    """

    name: ClassVar[str] = "advface"

    def __init__(
        self,
        shadow: nn.Module | str | Path,
        extractor: nn.Module | None = None,
        *,
        steps: int = 40,
        alpha: float = 0.2,
        epsilon: float = 0.2,
        reading: str = "projected",
        bn: str = "batch",
        clamp_min: float | None = None,
        extractor_input: str = "facenet",
        device: str | torch.device | None = None,
        channels_last: bool = False,
        keep_best: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(keep_best, bool):
            raise ValueError(f"keep_best must be a bool, got {keep_best!r}")
        self.keep_best = keep_best
        self.channels_last = bool(channels_last)
        self.steps = check_int("steps", steps, low=0)
        self.alpha = check_finite_number("alpha", alpha, low=0.0)
        self.epsilon = check_finite_number("epsilon", epsilon, low=0.0)
        self.reading = check_choice("reading", reading, READINGS)
        self.bn = check_choice("bn", bn, BN_MODES)
        self.clamp_min = None if clamp_min is None else check_finite_number("clamp_min", clamp_min)
        self.extractor_input = check_choice("extractor_input", extractor_input, EXTRACTOR_INPUTS)
        self._to_input: Callable[[Tensor], Tensor] = (
            unit_to_facenet if extractor_input == "facenet" else (lambda x: x)
        )

        self._shadow_info: dict[str, Any] = {}
        if isinstance(shadow, str | Path):
            shadow, self._shadow_info = load_shadow(shadow)
        if not isinstance(shadow, nn.Module):
            raise ValueError(f"shadow must be a torch module or a checkpoint path, got {shadow!r}")
        if extractor is None:
            extractor = _default_extractor()
        if not isinstance(extractor, nn.Module):
            raise ValueError(f"extractor must be a torch module, got {type(extractor).__name__}")

        self.shadow_sha256 = fingerprint(shadow)
        self.extractor_sha256 = fingerprint(extractor)
        self.shadow = _frozen_copy(shadow)
        self.n_bn = _swap_norms(self.shadow, self.bn)
        self.extractor = _frozen_copy(extractor)
        self.device = torch.device("cpu")
        self.to(device if device is not None else "cpu")

    def to(self, device: str | torch.device) -> AdvFace:
        """Move S and E to ``device`` (returns self)."""
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"bad device {device!r}: {exc}") from exc
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.shadow.to(dev, memory_format=fmt)
        self.extractor.to(dev, memory_format=fmt)
        self.device = dev
        return self

    # -- the attack ---------------------------------------------------------------------------

    def run(self, z: Tensor, *, trace: bool = True) -> AdvFaceResult:
        """Validate ``z`` and protect it, returning the iterates' diagnostics as well."""
        self.validate(z)
        with torch.inference_mode(False), torch.no_grad():
            return self._run(z.detach().clone(), trace)

    def _protect(self, z: Tensor, generator: torch.Generator | None) -> Tensor:
        return self._run(z, trace=False).z

    def _loss(self, z: Tensor, x_shadow: Tensor) -> Tensor:
        """||S(z) - x~||_1: summed over the batch (eq. 5), or per face (N,) for keep-best."""
        diff = (self.shadow(z) - x_shadow).abs()
        return diff.flatten(1).sum(1) if self.keep_best else diff.sum()

    def _run(self, z: Tensor, trace: bool) -> AdvFaceResult:
        dtype = next(self.shadow.parameters(), torch.empty(0)).dtype
        z = z.to(self.device, dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        # Eq. 4: shadow image and shadow feature (no graph needed).
        x_shadow = self.shadow(z).detach()
        z0 = self.extractor(self._to_input(x_shadow)).detach()
        if z0.shape != z.shape:
            raise ValueError(
                f"E(S(z)) has shape {tuple(z0.shape)}, expected {tuple(z.shape)}: "
                "shadow and extractor do not match the feature shape"
            )
        if self.clamp_min is not None:
            z0 = z0.clamp_min(self.clamp_min)
        engine = PGD(
            # With epsilon = 0 every reading keeps z~: skip the (costly) gradient steps.
            steps=self.steps if self.epsilon > 0 else 0,
            alpha=self.alpha,
            epsilon=self.epsilon,
            reading=self.reading,
            step_rule="sign",
            clamp_min=self.clamp_min,
            keep_best=self.keep_best,
        )
        record = PGDTrace() if trace else None
        zt = engine(z0, loss=lambda zz: self._loss(zz, x_shadow), trace=record)
        result = AdvFaceResult(z=zt, shadow_image=x_shadow, shadow_feature=z0)
        if record is not None:
            result.losses, result.step_linf = record.losses, record.step_linf
            result.drift_linf = record.drift_linf
        return result

    def _params(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "alpha": self.alpha,
            "epsilon": self.epsilon,
            "reading": self.reading,
            "bn": self.bn,
            "clamp_min": self.clamp_min,
            "extractor_input": self.extractor_input,
            "shadow_sha256": self.shadow_sha256,
            "extractor_sha256": self.extractor_sha256,
            **({"keep_best": True} if self.keep_best else {}),  # older records stay unchanged
            **self._shadow_info,
        }
