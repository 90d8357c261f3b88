"""Reproduction profiles: a minutes-long smoke run, a 2-core CPU run of about an hour (subsets,
stated), a CPU run with the full protocols and attackers trained to a time budget (resumable
across days), and a GPU run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

ARCHS: tuple[str, ...] = ("transrec", "resrec", "urec")
#: Attackers' training sets: LFW people outside the test folds and CFP (identity-disjoint,
#: checked by name), or CelebA's attacker half (the paper trains on CelebA; anonymous ids).
ATTACKER_SETS: tuple[str, ...] = ("lfw-attacker", "celeba-attacker")
#: Table 2's protections that can get an offline row (a Psi' distilled for them).
OFFLINE_METHODS: tuple[str, ...] = ("random", "dp", "advface")


@dataclass(frozen=True)
class Profile:
    """Every size a reproduction depends on; recorded in ``results.json``."""

    name: str
    datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Operating thresholds (SRRA) and the unprotected accuracy on the full protocol?
    fr_full: bool = True
    # Verification pairs of the accuracy rows: None = the full protocol (LFW 6,000 pairs,
    # CFP-FP 7,000); n = a seeded random sample of n pairs per fold, half genuine.
    pairs_per_fold: int | None = None
    # Reconstruction test faces per dataset (seeded sample of LFW folds 1-5 / CFP; None: all).
    test_n: int | None = None
    attacker_set: str = "lfw-attacker"
    # Reconstruction networks.
    archs: tuple[str, ...] = ARCHS
    recon: str = "gpu"  # advface.models.recon.PROFILES entry: per-architecture width/depth
    width: int | None = None  # overrides the recon profile's width
    train_limit: int | None = None  # images per training set (None: all)
    epochs: int = 20  # the cap; with max_minutes the time budget usually ends training first
    max_minutes: float | None = None  # training time budget per decoder (kept across resumes)
    train_batch: int = 32
    lr: float = 1e-4
    # AdvFace (and the random baseline's budget: the same steps, bound and projection).
    steps: int = 40
    alpha: float = 0.2
    epsilon: float = 0.2
    reading: str = "projected"  # the library default; the other reading is reported beside it
    # Laplace noise baseline ("dp"): scale = sensitivity / epsilon_dp.
    dp_epsilon: float = 1.0
    dp_sensitivity: float = 0.2
    protect_batch: int = 32
    chunk: int = 256  # faces per cached chunk of a stage: an interrupted run loses at most one
    sweep: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
    sweep_datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Datasets of Tables 3/4 (every shadow x attacker); the others use the ResRec shadow only.
    transfer_datasets: tuple[str, ...] = ("lfw", "cfp-fp")
    # Adaptive attacker (trains on AdvFace features made with its own shadow).
    adaptive_limit: int | None = None
    adaptive_epochs: int | None = None
    grid_n: int = 6
    seed: int = 0
    # Offline mode (Table 2's offline rows): a Psi' distilled for each listed method's
    # protection (the online rows' own) on ``distill_limit`` images of CelebA's server half
    # (seeded sample; None: all), for at most ``distill_epochs`` epochs and, when set,
    # ``distill_minutes`` of wall time per head (feature pass included).
    offline: tuple[str, ...] = ()
    distill_limit: int | None = 400
    distill_epochs: int = 20
    distill_minutes: float | None = None
    # The robustness bench (advface.pipelines.robustness) run into OUT/robustness with this
    # bench profile, its rows merged into results.json (None: not run).
    robustness: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.attacker_set not in ATTACKER_SETS:
            raise ValueError(
                f"attacker_set must be one of {ATTACKER_SETS}, got {self.attacker_set!r}"
            )
        if self.pairs_per_fold is not None and self.pairs_per_fold < 2:
            raise ValueError(f"pairs_per_fold must be >= 2 or None, got {self.pairs_per_fold}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes}")
        if self.chunk < 1 or self.grid_n < 0:
            raise ValueError("chunk must be >= 1 and grid_n >= 0")
        if "resrec" not in self.archs:
            raise ValueError("archs must include resrec (Table 1's attacker and shadow)")
        self._check_extras()

    def _check_extras(self) -> None:
        bad = [m for m in self.offline if m not in OFFLINE_METHODS]
        if bad or len(set(self.offline)) != len(self.offline):
            raise ValueError(
                f"offline must list distinct methods of {OFFLINE_METHODS}, got {self.offline}"
            )
        if self.distill_limit is not None and self.distill_limit < 1:
            raise ValueError(f"distill_limit must be >= 1 or None, got {self.distill_limit}")
        if self.distill_epochs < 1:
            raise ValueError(f"distill_epochs must be >= 1, got {self.distill_epochs}")
        if self.distill_minutes is not None and not self.distill_minutes > 0:
            raise ValueError(f"distill_minutes must be > 0 or None, got {self.distill_minutes}")
        if self.robustness is not None:
            from advface.pipelines.robustness.profiles import PROFILES as BENCH

            if self.robustness not in BENCH:
                raise ValueError(
                    f"robustness must be a bench profile ({sorted(BENCH)}) or None, "
                    f"got {self.robustness!r}"
                )

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        fr_full=False,
        pairs_per_fold=2,
        test_n=4,
        recon="cpu",
        width=8,
        train_limit=24,
        epochs=1,
        train_batch=8,
        lr=1e-3,
        steps=2,
        protect_batch=8,
        chunk=8,
        sweep=(0.0, 0.2),
        sweep_datasets=("lfw",),
        transfer_datasets=("lfw",),
        adaptive_limit=16,
        adaptive_epochs=1,
        grid_n=3,
        offline=("advface",),
        distill_limit=8,
        distill_epochs=1,
        notes=("smoke: tiny sizes to exercise every stage; figures are not meaningful",),
    ),
    "cpu": Profile(
        name="cpu",
        fr_full=True,
        pairs_per_fold=20,
        test_n=100,
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
            "1,000-image subsets with lr 1e-3 (the paper: attackers on CelebA, shadows on "
            "CASIA-WebFace with lr 1e-4), far from "
            "converged (see cpu-full); accuracy rows on a seeded stratified sample of 20 pairs "
            "per fold (200 pairs per dataset: wide intervals), reconstruction on 100 test faces "
            "per dataset; the noise-bound sweep on LFW only with 4 bounds, and so are Tables "
            "3/4 (three shadows); the adaptive attacker trains on 300 protected features",
        ),
    ),
    "cpu-full": Profile(
        name="cpu-full",
        fr_full=True,
        pairs_per_fold=None,
        test_n=1000,
        recon="cpu",
        train_limit=None,
        epochs=1000,
        max_minutes=30.0,
        train_batch=32,
        lr=1e-3,
        protect_batch=32,
        adaptive_limit=1000,
        adaptive_epochs=1000,
        offline=OFFLINE_METHODS,
        distill_limit=400,
        distill_epochs=100,
        distill_minutes=60.0,
        robustness="cpu",
        notes=(
            "cpu-full: the full protocols (LFW 6,000 pairs, CFP-FP 7,000) for every accuracy "
            "row; decoders of the 'cpu' recon profile trained on every image of their "
            "identity-disjoint training set for a 30-minute budget each (CPU time per thread, "
            "so that other jobs on the cores do not shorten it; lr 1e-3; loss curves below), "
            "the adaptive attacker on 1,000 protected features for the same budget; "
            "reconstruction on 1,000 test faces per dataset. Offline rows: a Psi' per "
            "protection distilled on 400 images of CelebA's server half for up to 100 epochs "
            "or 60 minutes (feature pass included; CPU time per thread, counted across "
            "resumes); the robustness bench's cpu profile runs "
            "into robustness/. Every stage is cached in chunks and training checkpoints every "
            "epoch: rerun the command to resume",
        ),
    ),
    "paper": Profile(
        name="paper",
        fr_full=True,
        pairs_per_fold=None,
        test_n=None,
        attacker_set="celeba-attacker",
        recon="gpu",
        train_limit=None,
        epochs=30,
        train_batch=64,
        offline=OFFLINE_METHODS,
        distill_limit=None,
        robustness="gpu",
        notes=(
            "paper: full sizes for a GPU; attackers train on CelebA's attacker half and the "
            "server's shadows on its server half (no shared identity), smaller than the "
            "paper's CelebA / CASIA-WebFace; offline rows: a Psi' per protection distilled "
            "on all of the server half (20 epochs), not retrained with labels",
        ),
    ),
}


def get_profile(name: str, **overrides) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return replace(PROFILES[name], **overrides) if overrides else PROFILES[name]
