import json

import numpy as np
import pytest
from typer.testing import CliRunner

from advface.cli import app
from advface.pipelines.eval_fr import pair_scores, sample_pairs, select_pairs


class _Proto:
    def __init__(self):
        n = 40
        self.keys_a = [f"a{i % 7}" for i in range(n)]
        self.keys_b = [f"b{i}" for i in range(n)]
        self.issame = np.tile([True, False], n // 2)
        self.fold = np.repeat(np.arange(4), n // 4)


def test_select_pairs_balances_and_indexes():
    sub = select_pairs(_Proto(), folds=2, pairs_per_fold=4)
    assert len(sub.issame) == 8 and sub.issame.sum() == 4
    assert set(sub.fold) == {0, 1}
    assert sub.keys == sorted(set(sub.keys))
    for ia, ib in zip(sub.idx_a, sub.idx_b, strict=True):
        assert sub.keys[ia].startswith("a") and sub.keys[ib].startswith("b")


def test_sample_pairs_is_seeded_stratified_and_respects_folds():
    proto = _Proto()
    sub = sample_pairs(proto, pairs_per_fold=4, seed=3, folds=3)
    assert len(sub.issame) == 12 and sub.issame.sum() == 6
    assert set(sub.fold) == {0, 1, 2}
    for f in range(3):
        assert sub.issame[sub.fold == f].sum() == 2
    again = sample_pairs(proto, pairs_per_fold=4, seed=3, folds=3)
    assert again.keys == sub.keys and np.array_equal(again.idx_a, sub.idx_a)
    draws = {tuple(sample_pairs(proto, pairs_per_fold=4, seed=s).keys) for s in range(5)}
    assert len(draws) > 1  # a sample, not the first pairs of each fold
    with pytest.raises(ValueError, match="folds"):
        sample_pairs(proto, pairs_per_fold=4, folds=1)


def test_select_pairs_rejects_one_fold():
    with pytest.raises(ValueError, match="folds"):
        select_pairs(_Proto(), folds=1)


def test_pair_scores_is_cosine_of_unit_vectors():
    a = np.array([[1.0, 0.0], [0.6, 0.8]])
    b = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert np.allclose(pair_scores(a, b), [1.0, 0.8])


@pytest.mark.data
def test_eval_fr_json_on_real_lfw_subset(data_root):
    res = CliRunner().invoke(
        app,
        ["eval-fr", "--dataset", "lfw", "--folds", "2", "--pairs-per-fold", "20", "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in (
        "dataset",
        "accuracy",
        "accuracy_std",
        "tar_at_far_1e-3",
        "auc",
        "n_pairs",
        "no_face",
    ):
        assert key in out
    assert out["n_pairs"] == 40 and out["pairs"].startswith("seeded sample (seed 0)")
    # Pretrained FaceNet (98.6% on the full protocol) separates a 40-pair sample well.
    assert out["accuracy"] >= 0.9 and out["auc"] >= 0.95


def test_eval_fr_unknown_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVFACE_DATA_ROOT", str(tmp_path))
    res = CliRunner().invoke(app, ["eval-fr", "--dataset", "agedb", "--json"])
    assert res.exit_code == 2
    assert "unknown dataset" in res.output


def test_protected_stored_side_is_cached_in_chunks_and_resumes(data_root, tmp_path, monkeypatch):
    """A protection's stored-side embeddings are computed once per chunk: a killed run resumes
    at its first missing chunk, a rerun protects nothing, a changed parameter recomputes."""
    import advface.pipelines.eval_fr as mod
    from advface.models.facenet import load_facenet
    from advface.protection import build_protection

    monkeypatch.setattr(mod, "PROTECT_CHUNK", 4)
    real, protected = mod.embed_split, []

    def counting(images, enc, head, fn, **kw):
        if fn is not None:
            protected.append(len(images))
            if len(protected) == 3 and kill:
                raise KeyboardInterrupt  # the process dies in its third chunk
        return real(images, enc, head, fn, **kw)

    import advface.pipelines.embed as embed_mod

    clean_calls, real_clean = [], embed_mod.embed_images

    def counting_clean(images, model, **kw):
        clean_calls.append(len(images))
        return real_clean(images, model, **kw)

    monkeypatch.setattr(mod, "embed_split", counting)
    monkeypatch.setattr(embed_mod, "embed_images", counting_clean)
    run = dict(folds=2, pairs_per_fold=6, cache=tmp_path, progress=False, batch_size=4)
    run["model"] = load_facenet()
    kill = True
    with pytest.raises(KeyboardInterrupt):
        mod.eval_fr("lfw", protection=build_protection("dp", seed=0), **run)
    assert protected[:2] == [4, 4]
    kill, protected[:] = False, []
    first = mod.eval_fr("lfw", protection=build_protection("dp", seed=0), **run)
    assert len(protected) == 1  # the two chunks written before the kill were kept
    n_stored = 8 + protected[0]
    protected.clear()
    clean_calls.clear()
    again = mod.eval_fr("lfw", protection=build_protection("dp", seed=0), **run)
    assert protected == [] and again["accuracy"] == first["accuracy"]
    assert clean_calls == []  # the probe side's clean embeddings come from the cache too
    mod.eval_fr("lfw", protection=build_protection("dp", seed=1), **run)
    assert sum(protected) == n_stored


def test_clean_embedding_cache_is_keyed_by_code_and_model(tmp_path, monkeypatch):
    """The per-image clean-embedding store changes with the embedding code, the model's
    weights and flip, so a change in any of them never reuses old embeddings."""
    import torch

    import advface.pipelines.context as context
    import advface.pipelines.eval_fr as mod

    stores = []
    monkeypatch.setattr(mod, "embed_cached", lambda *a, **kw: stores.append(a[3]))
    model = torch.nn.Linear(2, 2)
    kw = {"flip": False}

    def store(code: str, flip: bool = False) -> str:
        monkeypatch.setattr(context, "code_fingerprint", lambda parts: code * 16)
        mod._clean_embeddings(None, [], model, "lfw", tmp_path, True, {**kw, "flip": flip})
        return stores[-1]

    base = store("a")
    assert store("a") == base
    assert store("b") != base
    assert store("a", flip=True) != base
    with torch.no_grad():
        model.weight.add_(1.0)
    assert store("a") != base
    mod._clean_embeddings(None, [], model, "lfw", tmp_path, False, kw)
    assert stores[-1] is None
