"""Sizes of the robustness bench: a seconds-long smoke run, a 2-core CPU run, a GPU run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class BenchProfile:
    """Every size and setting the bench depends on (recorded in ``results.json``)."""

    name: str
    datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Decoders (attackers, the server's shadow S and generator D): advface.models.recon profile.
    recon: str = "gpu"
    width: int | None = None  # overrides the recon profile's width (smoke)
    train_limit: int | None = None  # images per training set (None: all)
    epochs: int = 10
    max_minutes: float | None = None  # per decoder: the same time budget for every attacker
    train_batch: int = 64
    lr: float = 1e-3
    # Horizontal flips for every network of the run. An adaptive attacker's features of the
    # mirrored images are protected too (twice the protection work), so that it learns from
    # the same augmented data as the paper's attacker and the embedding floor. Every attacker
    # trains on the same images: there is no per-attacker data size.
    flip: bool = True
    # Reconstruction test images per dataset (seeded sample of the test people's images).
    test_n: int | None = 1000
    inversion_n: int = 64  # optimisation-based inversions are slow: first n test images
    inversion_steps: int = 200
    # Verification pairs per fold (None: the full protocol), a seeded stratified sample.
    pairs_per_fold: int | None = None
    # AdvFace and the baselines (same projected l_inf budget).
    steps: int = 40
    alpha: float = 0.2
    epsilon: float = 0.2
    # embedding-shadow.
    es_steps: int = 30
    es_alpha: float = 0.1
    es_epsilon: float = 1.0
    es_identity_weight: float = 1.0
    protect_batch: int = 64
    grid_n: int = 6
    seed: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, BenchProfile] = {
    "smoke": BenchProfile(
        name="smoke",
        datasets=("lfw",),
        recon="cpu",
        width=4,
        train_limit=24,
        epochs=1,
        train_batch=8,
        test_n=6,
        inversion_n=2,
        inversion_steps=2,
        pairs_per_fold=2,
        steps=2,
        es_steps=2,
        protect_batch=8,
        grid_n=2,
        notes=("smoke: tiny sizes to exercise every stage; the numbers mean nothing",),
    ),
    "cpu": BenchProfile(
        name="cpu",
        recon="cpu",
        train_limit=300,
        epochs=5,
        train_batch=32,
        test_n=64,
        inversion_n=12,
        inversion_steps=100,
        pairs_per_fold=20,
        protect_batch=32,
        notes=(
            "cpu: narrow decoders (recon profile 'cpu') trained 5 epochs on 300 "
            "people-disjoint LFW images (every attacker, adaptive ones included, on the same "
            "300 with flips; adaptive attackers protect the mirrored images too); "
            "reconstruction on 64 test images per dataset (the two inversions on 12, 100 "
            "steps); accuracy on a seeded sample of 20 pairs per fold (200 pairs, stratified "
            "over folds and genuine/impostor; too few impostor pairs for a FAR = 1e-3 "
            "threshold)",
        ),
    ),
    "gpu": BenchProfile(
        name="gpu",
        recon="gpu",
        datasets=("lfw",),
        width=32,
        train_limit=3000,
        epochs=12,
        max_minutes=0.4,
        train_batch=64,
        test_n=500,
        inversion_n=64,
        inversion_steps=300,
        pairs_per_fold=None,
        protect_batch=128,
        notes=(
            "gpu: GPU-depth decoders at width 32 (ResRec 8 blocks, EmbDec), every attacker "
            "(adaptive ones included) on the same 3,000 people-disjoint LFW images with flips "
            "(adaptive attackers protect the mirrored images too), 12 epochs or 24 s of "
            "training each; reconstruction on 500 test images (the two inversions on 64); "
            "accuracy on the full protocol; LFW only (the device's time limit), CFP-FP in the "
            "cpu profile",
        ),
    ),
}


def get_profile(name: str, **overrides) -> BenchProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown bench profile {name!r}; choose one of {sorted(PROFILES)}")
    return replace(PROFILES[name], **overrides) if overrides else PROFILES[name]
