"""The reproduction's context and trained networks: attackers, the server's shadows and the
adaptive attacker, each trained (or resumed, or loaded) under a key of everything it depends on.

Data (identity-disjoint, :mod:`advface.data.splits`): attackers train on ``lfw-attacker`` (LFW
people in no pair of test folds 1-5 and not in CFP) or, in the paper-like profile, CelebA's
attacker half; the server's shadows on CelebA's server half (no person in both halves).
Every attacker's record states its identity overlap with the test sets, counted by name; a
training set that shares a person with a test set is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from advface.attacks.train import MemoFeatures
from advface.data.splits import IdentitySplit
from advface.pipelines.context import PROTECTION_CODE, TRAIN_CODE, RunContext
from advface.pipelines.decoders import train_cached

CELEBA_NOTE = (
    "CelebA ids are anonymous: not comparable by name with LFW/CFP people (another source)"
)


@dataclass
class Context(RunContext):
    """The reproduction's context: training records, splits, fallbacks and protections."""

    training: dict[str, dict] = field(default_factory=dict)
    splits: dict[str, dict] = field(default_factory=dict)
    fallbacks: dict[str, dict] = field(default_factory=dict)
    protections: dict[str, dict] = field(default_factory=dict)
    #: Extra heads of Table 2 (offline mode): how each was made or where it came from.
    heads: dict[str, dict] = field(default_factory=dict)
    tag: ClassVar[str] = "reproduce"

    def images(self, dataset: str, keys: list[str]) -> np.ndarray:
        """Aligned faces of ``keys`` (``dataset``: an aligned set, lfw / cfp / celeba)."""
        from advface.pipelines.data import aligned_images

        return aligned_images(
            dataset, keys, data_root=self.root, cache=self.data_cache, progress=self.progress
        )[0]

    def count_fallbacks(self, dataset: str, keys: list[str], role: str) -> None:
        """Record how many of ``keys`` are MTCNN fallback crops (no face found), under
        ``role``; read from the aligned cache, so cached stages are counted too."""
        from advface.data.prepare import load_aligned
        from advface.pipelines.data import aligned_images

        try:
            full = load_aligned(dataset, cache=self.data_cache)
            if not all(k in full for k in keys):
                raise FileNotFoundError(dataset)
            found = full.found[full.indices(keys)]
        except FileNotFoundError:
            found = aligned_images(
                dataset, keys, data_root=self.root, cache=self.data_cache, progress=self.progress
            )[1]
        self.fallbacks[role] = {
            "dataset": dataset,
            "images": len(keys),
            "fallbacks": int((~np.asarray(found, dtype=bool)).sum()),
        }


@dataclass
class Networks:
    """Trained decoders by name (``attackers``: transrec/resrec/urec and adaptive-resrec;
    ``shadows``: the server's) and the cache key of each (``keys[name]``)."""

    attackers: dict[str, nn.Module]
    shadows: dict[str, nn.Module]
    keys: dict[str, str]


def test_splits(ctx: Context) -> list[IdentitySplit]:
    """The people whose faces are tested: LFW folds 1-5 and CFP's people."""
    from advface.data.splits import cfp_identities, lfw_test_split

    out = [lfw_test_split(ctx.root)]
    if "cfp-fp" in ctx.profile.datasets:
        names = cfp_identities(ctx.root)
        out.append(IdentitySplit("cfp", "cfp", list(names), list(names.values())))
    return out


def identity_record(train: IdentitySplit, tests: list[IdentitySplit]) -> dict:
    """People of ``train`` also in a test set, counted by normalised name; refuses any."""
    if train.dataset == "celeba":
        return {"overlap": None, "checked_by_name": False, "note": CELEBA_NOTE}
    by_test = {t.name: len(train.people & t.people) for t in tests}
    if any(by_test.values()):
        raise ValueError(f"training set {train.name} shares identities with a test set: {by_test}")
    return {
        "overlap": 0,
        "checked_by_name": True,
        "by_test_set": by_test,
        "train_people": len(train.people),
        "test_people": {t.name: len(t.people) for t in tests},
    }


def attacker_split(ctx: Context) -> IdentitySplit:
    from advface.data.splits import celeba_split, lfw_attacker_split

    p = ctx.profile
    if p.attacker_set == "lfw-attacker":
        split = lfw_attacker_split(ctx.root)
    else:
        split = celeba_split(ctx.root, "attacker")
    return split.sample(p.train_limit, p.seed)


def server_split(ctx: Context) -> IdentitySplit:
    """CelebA's server half, checked to share no person with its attacker half."""
    from advface.data.splits import celeba_split, check_identity_disjoint

    p = ctx.profile
    split = celeba_split(ctx.root, "server").sample(p.train_limit, p.seed)
    check = check_identity_disjoint(split, [celeba_split(ctx.root, "attacker")])
    ctx.splits["server"] = _split_info(split, check)
    return split


def _split_info(split: IdentitySplit, check: dict) -> dict:
    return {
        "name": split.name,
        "images": len(split),
        "people": len(split.people),
        "identity_check": check,
    }


def train_model(
    ctx: Context,
    name: str,
    arch: str,
    split: IdentitySplit,
    *,
    identity: dict,
    features: str = "clean",
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    depends: dict | None = None,
    code: tuple[str, ...] = TRAIN_CODE,
    epochs: int | None = None,
) -> tuple[nn.Module, str]:
    """Train, resume or load one decoder (:func:`advface.pipelines.decoders.train_cached`:
    keyed by everything it depends on, a time budget counting the minutes already spent) and
    record it with its identity check; returns ``(model in eval mode, its cache key)``."""
    model, config, ckpt_name = train_cached(
        ctx,
        name,
        arch,
        split,
        lambda: ctx.images(split.dataset, split.keys),
        features=features,
        feature_fn=feature_fn,
        depends=depends or {},
        code=code,
        epochs=epochs or ctx.profile.epochs,
        flip=feature_fn is None,  # adaptive: one protected feature per stored face
        meta={"train_set": split.name, "features": features, "role": name},
    )
    ctx.count_fallbacks(split.dataset, split.keys, f"train {name}")
    ctx.training[name] = _record(name, arch, features, split, identity, config, ckpt_name)
    return model, ckpt_name


def _record(
    name: str,
    arch: str,
    features: str,
    split: IdentitySplit,
    identity: dict,
    config: dict,
    key: str,
) -> dict:
    history = config.get("history", [])
    return {
        "arch": arch,
        "features": features,
        "train_set": split.name,
        "n_train": len(split),
        "people": len(split.people),
        "epochs": config.get("epochs"),
        "partial_epoch": config.get("partial_epoch"),
        "loss_curve": [round(h["l1"], 5) for h in history],
        "epoch_seconds": [round(h["seconds"], 1) for h in history],
        "seconds": round(sum(h["seconds"] for h in history), 1),
        "budget_seconds": round(sum(h.get("budget_seconds", h["seconds"]) for h in history), 1),
        "identity_overlap_with_test": identity.get("overlap"),
        "identity_check": identity,
        "key": key,
    }


def train_networks(ctx: Context) -> Networks:
    """Attackers (one per architecture), the server's shadows, then the adaptive attacker: a
    ResRec trained on AdvFace features that it makes with its own shadow (its own clean
    ResRec) on a sample of its training faces."""
    from advface.pipelines.reproduce.evaluate import advface_protection

    p = ctx.profile
    tests = test_splits(ctx)
    att_split, srv_split = attacker_split(ctx), server_split(ctx)
    ident = identity_record(att_split, tests)
    ctx.splits["attacker"] = _split_info(att_split, ident)
    attackers, shadows, keys = {}, {}, {}
    for a in p.archs:
        attackers[a], keys[a] = train_model(ctx, f"attacker-{a}", a, att_split, identity=ident)
    for s in p.archs:
        shadows[s], keys[f"shadow-{s}"] = train_model(
            ctx, f"shadow-{s}", s, srv_split, identity=identity_record(srv_split, tests)
        )
    own = advface_protection(ctx, attackers["resrec"], p.epsilon, p.reading)
    ad_split = att_split.sample(p.adaptive_limit, p.seed + 1)
    attackers["adaptive-resrec"], keys["adaptive-resrec"] = train_model(
        ctx,
        "adaptive-resrec",
        "resrec",
        ad_split,
        identity=identity_record(ad_split, tests),
        features="advface (own shadow)",
        feature_fn=MemoFeatures(own.protect),
        # Every AdvFace parameter, its shadow's and E's weights: a change retrains it.
        depends={"protection": own.key_params(), "own_shadow": keys["resrec"]},
        code=TRAIN_CODE + PROTECTION_CODE,
        epochs=p.adaptive_epochs,
    )
    return Networks(attackers, shadows, keys)
