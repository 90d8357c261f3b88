import numpy as np
import pytest

from advface.data.splits import (
    IdentitySplit,
    celeba_split,
    check_identity_disjoint,
    lfw_attacker_split,
    lfw_identity,
    lfw_test_split,
    normalise_name,
)


def test_names_are_compared_normalised():
    assert normalise_name("José_Luis Rodríguez") == normalise_name("jose luis rodriguez")
    assert lfw_identity("George_W_Bush/George_W_Bush_0001.jpg") == "george w bush"
    with pytest.raises(ValueError, match="not an LFW key"):
        lfw_identity("George_W_Bush_0001.jpg")


def test_overlap_by_identity_is_refused_even_with_other_files():
    train = IdentitySplit("train", "lfw", ["A/A_0001.jpg", "B/B_0003.jpg"], ["a", "b"])
    test = IdentitySplit("test", "lfw", ["B/B_0001.jpg"], ["b"])  # another photo of b
    with pytest.raises(ValueError, match="shares 1 identity with test set test"):
        check_identity_disjoint(train, [test])
    ok = check_identity_disjoint(train, [IdentitySplit("t2", "lfw", ["C/C_0001.jpg"], ["c"])])
    assert ok["overlap"] == 0 and ok["overlap_with_t2"] == 0


def test_sample_is_seeded_and_keeps_identities_aligned():
    keys = [f"P{i}/P{i}_0001.jpg" for i in range(50)]
    split = IdentitySplit("s", "lfw", keys, [lfw_identity(k) for k in keys])
    a, b = split.sample(10, seed=3), split.sample(10, seed=3)
    assert a.keys == b.keys and len(a) == 10 and a.keys != split.sample(10, seed=4).keys
    assert all(lfw_identity(k) == i for k, i in zip(a.keys, a.identities, strict=True))
    assert split.sample(None, 0) is split
    with pytest.raises(ValueError):
        split.sample(0, 0)
    with pytest.raises(ValueError, match="identities"):
        IdentitySplit("bad", "lfw", keys, ["x"])


@pytest.mark.data
def test_lfw_attackers_never_see_a_test_or_cfp_person(data_root):
    from advface.data.splits import cfp_identities

    test = lfw_test_split(data_root)
    train = lfw_attacker_split(data_root)
    assert len(test) > 3000 and len(train) > 5000
    assert not (test.people & train.people)
    assert not (set(cfp_identities(data_root).values()) & train.people)
    assert train.notes["identity_check"]["overlap"] == 0
    # Folds 6-10 are still available to the attacker: their people appear in its set.
    later = lfw_test_split(data_root, folds=(5, 6, 7, 8, 9))
    assert train.people & later.people
    with pytest.raises(ValueError, match="every fold"):
        lfw_test_split(data_root, folds=range(10))


@pytest.mark.data
def test_celeba_halves_share_no_identity(data_root):
    server, attacker = celeba_split(data_root, "server"), celeba_split(data_root, "attacker")
    assert check_identity_disjoint(server, [attacker])["overlap"] == 0
    assert abs(len(server) - len(attacker)) < 0.2 * len(server)
    assert not set(server.keys) & set(attacker.keys)
    with pytest.raises(ValueError):
        celeba_split(data_root, "both")


def test_sample_pairs_is_stratified_and_seeded():
    from advface.pipelines.eval_fr import sample_pairs

    class Proto:
        keys_a = [f"a{i}" for i in range(400)]
        keys_b = [f"b{i}" for i in range(400)]
        issame = np.tile(np.repeat([True, False], 20), 10)
        fold = np.repeat(np.arange(10), 40)

    sub = sample_pairs(Proto, pairs_per_fold=6, seed=1)
    assert len(sub.issame) == 60
    for f in range(10):
        sel = sub.fold == f
        assert sel.sum() == 6 and sub.issame[sel].sum() == 3
    again = sample_pairs(Proto, pairs_per_fold=6, seed=1)
    assert again.keys == sub.keys and sample_pairs(Proto, pairs_per_fold=6, seed=2).keys != sub.keys
    # Not the first pairs of each fold: a sample spans the fold.
    assert any(int(k[1:]) % 20 >= 3 for k in sub.keys if k.startswith("a"))
    assert len(sample_pairs(Proto, pairs_per_fold=None).issame) == 400


@pytest.mark.data
def test_attack_reports_the_identity_overlap_of_its_attacker(data_root):
    from advface.pipelines.attack import _test_keys

    keys, info = _test_keys("lfw", data_root, {"train_set": "lfw-attacker"})
    assert info["identity_overlap"] == 0 and set(keys) == set(lfw_test_split(data_root).keys)
    _, legacy = _test_keys("lfw", data_root, {"train_set": "lfw-nonpairs"})
    assert legacy["identity_overlap"] > 100  # image-disjoint, not identity-disjoint
    cfp_keys, cfp_info = _test_keys("cfp-fp", data_root, {"train_set": "lfw-attacker"})
    from advface.data.protocols import load_protocol

    wanted = load_protocol("cfp-fp", data_root).unique_keys()
    assert cfp_info["identity_overlap"] == 0 and sorted(cfp_keys) == sorted(wanted)
