"""Identity-disjoint splits: who may train on what, checked by identity name.

LFW View 2's ten folds are identity-disjoint, so an attacker can train on the people of some
folds (and on people in no pair) and be tested on the people of the others. The helpers here
build such splits and :func:`check_identity_disjoint` refuses any overlap by *name* (not by file
or pixels: another photo of a test person is still that person).

- :func:`lfw_identity` / :func:`cfp_identities`: the person in an image, as a normalised name
  (``George_W_Bush`` and ``George W Bush`` are one person).
- :func:`lfw_attacker_split`: LFW images of everyone outside the test folds (and, by default,
  outside CFP's 500 people, so that one attacker serves both test sets).
- :func:`lfw_test_split`: images of the pairs of the test folds.
- :func:`celeba_split`: CelebA crops split by identity id into a ``server`` half and an
  ``attacker`` half (the server's shadow never shares a person with an attacker). CelebA's ids
  are anonymous, so an overlap with LFW/CFP *people* cannot be checked by name; the sets come
  from different sources, and reports say so.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "IdentitySplit",
    "celeba_split",
    "cfp_identities",
    "check_identity_disjoint",
    "lfw_attacker_split",
    "lfw_identity",
    "lfw_test_split",
    "normalise_name",
]

#: Default test folds of LFW (0-based): folds 1-5 of pairs.txt.
LFW_TEST_FOLDS: tuple[int, ...] = (0, 1, 2, 3, 4)


def normalise_name(name: str) -> str:
    """Case-, accent- and separator-insensitive person name (``"José_Luis"`` -> ``"jose luis"``)."""
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"[\s_\-.]+", " ", text).strip().lower()


def lfw_identity(key: str) -> str:
    """The person of an LFW key ``Name/Name_NNNN.jpg`` (normalised)."""
    parts = PurePosixPath(key).parts
    if len(parts) != 2:
        raise ValueError(f"not an LFW key (Name/Name_NNNN.jpg): {key!r}")
    return normalise_name(parts[0])


def cfp_identities(root: str | Path) -> dict[str, str]:
    """CFP key -> normalised person name, from ``cfp/Data/list_name.txt`` (line i = folder i)."""
    from advface.data.protocols import cfp_keys

    path = Path(root) / "cfp" / "Data" / "list_name.txt"
    if not path.is_file():
        raise FileNotFoundError(f"CFP name list not found: {path}")
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = {}
    for key in cfp_keys(root):
        folder = int(PurePosixPath(key).parts[0])
        if not 1 <= folder <= len(names):
            raise ValueError(f"{path}: no name for CFP folder {folder:03d}")
        out[key] = normalise_name(names[folder - 1])
    return out


@dataclass(frozen=True)
class IdentitySplit:
    """Images of one role (``dataset`` keys) and the identity of each."""

    name: str
    dataset: str
    keys: list[str]
    identities: list[str]
    notes: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.identities):
            raise ValueError(
                f"split {self.name}: {len(self.keys)} keys but {len(self.identities)} identities"
            )

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def people(self) -> set[str]:
        return set(self.identities)

    def sample(self, n: int | None, seed: int) -> IdentitySplit:
        """A seeded random subset of ``n`` images (all when ``n`` is None or >= len)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"sample size must be >= 1, got {n}")
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return IdentitySplit(
            f"{self.name}[{n}]",
            self.dataset,
            [self.keys[i] for i in idx],
            [self.identities[i] for i in idx],
            {**self.notes, "sampled_from": len(self), "seed": seed},
        )


def check_identity_disjoint(train: IdentitySplit, tests: Iterable[IdentitySplit]) -> dict:
    """Raise ``ValueError`` if a person of ``train`` is in any of ``tests``; else a record of
    the check (``{"overlap": 0, ...}``) for the attacker's training log."""
    record: dict[str, object] = {"train": train.name, "train_people": len(train.people)}
    for test in tests:
        shared = sorted(train.people & test.people)
        if shared:
            raise ValueError(
                f"training set {train.name} shares {len(shared)} identit"
                f"{'y' if len(shared) == 1 else 'ies'} with test set {test.name}, "
                f"e.g. {shared[0]!r}"
            )
        record[f"overlap_with_{test.name}"] = 0
        record[f"{test.name}_people"] = len(test.people)
    record["overlap"] = 0
    return record


def _check_folds(folds: Sequence[int], n_folds: int) -> tuple[int, ...]:
    out = tuple(sorted(set(int(f) for f in folds)))
    if not out or out[0] < 0 or out[-1] >= n_folds:
        raise ValueError(f"test folds must lie in 0..{n_folds - 1}, got {list(folds)}")
    if len(out) == n_folds:
        raise ValueError("test folds cannot be every fold: no identity would be left to train on")
    return out


def lfw_test_split(root: str | Path, folds: Sequence[int] = LFW_TEST_FOLDS) -> IdentitySplit:
    """Every image used by a pair of the test ``folds`` (0-based), sorted."""
    from advface.data.protocols import load_protocol

    proto = load_protocol("lfw", root, check_files=False)
    folds = _check_folds(folds, proto.n_folds)
    keep = np.isin(proto.fold, folds)
    keys = sorted(
        {k for k, m in zip(proto.keys_a, keep, strict=True) if m}
        | {k for k, m in zip(proto.keys_b, keep, strict=True) if m}
    )
    return IdentitySplit(
        "lfw-test",
        "lfw",
        keys,
        [lfw_identity(k) for k in keys],
        {"folds": [f + 1 for f in folds]},
    )


def lfw_attacker_split(
    root: str | Path,
    test_folds: Sequence[int] = LFW_TEST_FOLDS,
    *,
    exclude_cfp: bool = True,
) -> IdentitySplit:
    """LFW images of every person who appears in no pair of ``test_folds`` (0-based) and, with
    ``exclude_cfp``, is not one of CFP's people: the attackers' training set. Checked disjoint
    by name from the test split (and CFP) before it is returned."""
    from advface.data.protocols import lfw_keys

    test = lfw_test_split(root, test_folds)
    banned = set(test.people)
    tests = [test]
    notes: dict[str, object] = {"test_folds": [f + 1 for f in sorted(set(test_folds))]}
    if exclude_cfp:
        cfp = cfp_identities(root)
        cfp_split = IdentitySplit("cfp", "cfp", list(cfp), list(cfp.values()))
        banned |= cfp_split.people
        tests.append(cfp_split)
    all_keys = lfw_keys(root)
    keys = [k for k in all_keys if lfw_identity(k) not in banned]
    if exclude_cfp:
        lfw_people = {lfw_identity(k) for k in all_keys}
        notes["cfp_people_dropped"] = len(lfw_people & tests[-1].people - test.people)
    split = IdentitySplit("lfw-attacker", "lfw", keys, [lfw_identity(k) for k in keys], notes)
    split.notes["identity_check"] = check_identity_disjoint(split, tests)
    return split


def celeba_split(root: str | Path, part: str) -> IdentitySplit:
    """CelebA crops of the ``server`` or ``attacker`` half of its identities.

    Identities are sorted and alternated (even positions -> server, odd -> attacker), so both
    halves hold about as many people and images, and no person is in both."""
    from advface.data.protocols import celeba_keys

    if part not in ("server", "attacker"):
        raise ValueError(f"part must be 'server' or 'attacker', got {part!r}")
    keys, ids = celeba_keys(root)
    people = np.unique(ids)
    mine = set(people[0 if part == "server" else 1 :: 2].tolist())
    sel = [i for i, p in enumerate(ids.tolist()) if p in mine]
    return IdentitySplit(
        f"celeba-{part}",
        "celeba",
        [keys[i] for i in sel],
        [f"celeba:{int(ids[i])}" for i in sel],
        {"people": len(mine)},
    )
