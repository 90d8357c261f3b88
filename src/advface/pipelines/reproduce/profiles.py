"""Reproduction profiles: sizes for a seconds-long smoke run, a 2-core CPU run, a GPU run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

ARCHS: tuple[str, ...] = ("transrec", "resrec", "urec")


@dataclass(frozen=True)
class Profile:
    """Every size a reproduction depends on; recorded in ``results.json``."""

    name: str
    datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Unprotected benchmark (and the SRRA operating threshold) on the full protocol?
    fr_full: bool = True
    # Pair subset for the protected experiments: first `folds` folds, balanced pairs per fold.
    folds: int | None = 10
    pairs_per_fold: int | None = None
    # Reconstruction networks.
    archs: tuple[str, ...] = ARCHS
    recon: str = "gpu"  # advface.models.recon.PROFILES entry: per-architecture width/depth
    width: int | None = None  # overrides the recon profile's width
    train_limit: int | None = None  # images per training set (None: all)
    epochs: int = 20
    train_batch: int = 32
    lr: float = 1e-4
    # AdvFace.
    steps: int = 40
    alpha: float = 0.2
    epsilon: float = 0.2
    reading: str = "projected"  # the library default; docs/results/cpu used "per-step"
    protect_batch: int = 32
    sweep: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
    sweep_datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Datasets of Tables 3/4 (every shadow x attacker); the others use the ResRec shadow only.
    transfer_datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Adaptive attacker (trains on AdvFace features made with its own shadow).
    adaptive_limit: int | None = None
    adaptive_epochs: int | None = None
    grid_n: int = 6
    seed: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        fr_full=False,
        folds=2,
        pairs_per_fold=4,
        recon="cpu",
        width=8,
        train_limit=24,
        epochs=1,
        train_batch=8,
        lr=1e-3,
        steps=2,
        protect_batch=8,
        sweep=(0.0, 0.2),
        sweep_datasets=("lfw",),
        adaptive_limit=16,
        adaptive_epochs=1,
        grid_n=3,
        notes=("smoke: tiny sizes to exercise every stage; figures are not meaningful",),
    ),
    "cpu": Profile(
        name="cpu",
        fr_full=True,
        folds=10,
        pairs_per_fold=10,
        recon="cpu",
        train_limit=1000,
        epochs=2,
        train_batch=32,
        lr=1e-3,
        protect_batch=32,
        sweep=(0.0, 0.1, 0.2, 0.3),
        sweep_datasets=("lfw",),
        transfer_datasets=("lfw",),
        adaptive_limit=300,
        adaptive_epochs=2,
        notes=(
            "cpu: narrow decoders (advface.models.recon 'cpu' profile: TransRec width 32, "
            "ResRec width 16 x 2 blocks, URec width 16 x 2 levels) trained 2 epochs on "
            "1,000-image subsets with lr 1e-3 (paper: 1e-4 on all of CelebA); protected "
            "experiments on 10 pairs per fold (100 pairs) per dataset; the noise-bound sweep on "
            "LFW only with 4 bounds, and so are Tables 3/4 (three shadows); the adaptive "
            "attacker trains on 300 protected features",
        ),
    ),
    "paper": Profile(
        name="paper",
        fr_full=True,
        folds=10,
        pairs_per_fold=None,
        recon="gpu",
        train_limit=None,
        epochs=30,
        train_batch=64,
        notes=(
            "paper: full sizes for a GPU; the training sets are still the 5,532 LFW non-pair "
            "images (attacker) and 6,264 CelebA crops (shadow), smaller than the paper's",
        ),
    ),
}


def get_profile(name: str, **overrides) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return replace(PROFILES[name], **overrides) if overrides else PROFILES[name]
