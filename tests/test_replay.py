"""Replay attack (SRRA) logic on synthetic embeddings, and the attack pipeline end to end
with stand-ins for FaceNet and the data (no real data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from advface.attacks.replay import embed_unit_images, pair_cosine, replay_success
from advface.pipelines.attack import save_grid, select_keys


def test_srra_counts_threshold_inclusive() -> None:
    orig = np.eye(4, 8)
    # cosines 1, 0.6, 0.3, -1 with the originals
    rec = orig.copy()
    rec[1] = 0.6 * orig[1] + 0.8 * np.eye(8)[5]
    rec[2] = 0.3 * orig[2] + np.sqrt(1 - 0.09) * np.eye(8)[6]
    rec[3] = -orig[3]
    np.testing.assert_allclose(pair_cosine(rec, orig), [1, 0.6, 0.3, -1], atol=1e-12)
    cos = pair_cosine(rec, orig)
    # Inclusive at exactly the recorded cosine.
    res = replay_success(rec, orig, {"operating": float(cos[2]), "far_1e-3": 0.59})
    assert res.successes == {"operating": 3, "far_1e-3": 2}
    assert res.rates["operating"] == 0.75 and res.n == 4
    # Embeddings need not be unit norm.
    assert replay_success(rec * 3.0, orig, {"t": 0.29}).successes == {"t": 3}
    lo, hi = res.ci["far_1e-3"]
    assert lo < 0.5 < hi
    with pytest.raises(ValueError):
        replay_success(rec, orig, {})
    with pytest.raises(ValueError):
        replay_success(rec, orig[:3], {"t": 0.1})


@pytest.mark.parametrize(
    ("x", "kw", "message"),
    [
        (torch.zeros(0, 3, 8, 8), {}, "N >= 1"),
        (torch.zeros(2, 1, 8, 8), {}, "N,3,H,W"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {}, "floating"),
        (torch.full((2, 3, 8, 8), float("nan")), {}, "finite"),
        (torch.zeros(2, 3, 8, 8), {"batch_size": 0}, "batch_size"),
    ],
)
def test_embed_unit_images_refuses_bad_input(x, kw, message) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ValueError, match=message):
        embed_unit_images(model, x, **kw)


def test_select_keys() -> None:
    keys = [f"k{i:03d}" for i in range(100)]
    sub = select_keys(keys, 10, seed=0)
    assert len(sub) == 10 and sub == sorted(sub) and sub == select_keys(keys, 10, seed=0)
    assert select_keys(keys, None) == keys and select_keys(keys, 500) == keys


def test_save_grid(tmp_path) -> None:
    import matplotlib.image as mpimg

    path = save_grid(torch.rand(5, 3, 20, 20), torch.rand(5, 3, 20, 20), tmp_path / "g.png", 2)
    img = mpimg.imread(path)
    assert img.shape[0] == 3 * 24 and img.shape[1] == 2 * 44


def test_run_attack_with_stand_ins(monkeypatch, tmp_path) -> None:
    """The pipeline wiring: E, protection hook, recon, metrics, replay, JSON, grid."""
    import advface.data.protocols as protocols
    import advface.models.facenet as facenet
    import advface.models.split as split
    import advface.pipelines.data as pdata
    from advface.models.recon import build_recon, save_checkpoint
    from advface.pipelines import attack

    torch.manual_seed(0)
    e = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2), nn.Conv2d(32, 32, 3),
                      nn.Conv2d(32, 64, 3, padding=1))  # fmt: skip
    full = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16))
    keys = [f"p/{i}.jpg" for i in range(6)]
    images = (np.random.default_rng(0).random((6, 160, 160, 3)) * 255).astype(np.uint8)

    class Proto:
        def unique_keys(self):
            return keys

    monkeypatch.setattr(protocols, "load_protocol", lambda name, root: Proto())
    monkeypatch.setattr(facenet, "load_facenet", lambda **kw: full)
    monkeypatch.setattr(split, "split_facenet", lambda m: (e, None))
    monkeypatch.setattr(
        pdata,
        "aligned_images",
        lambda ds, k, **kw: (images[[keys.index(x) for x in k]], np.ones(len(k))),
    )
    model = build_recon("transrec", width=4)
    save_checkpoint(
        tmp_path / "ck",
        model,
        "transrec",
        {"width": 4},
        train_set="t",
        epochs=1,
        seed=0,
        features="clean",
    )
    seen = []
    monkeypatch.setattr(
        attack, "resolve_protection", lambda name, **kw: lambda z: seen.append(z.shape) or z
    )
    # Which images are tested (and their identity overlap) is tested on real data elsewhere.
    monkeypatch.setattr(attack, "_test_keys", lambda d, root, ckpt: (keys, {"test_people": 1}))
    out = attack.run_attack(
        tmp_path / "ck",
        "lfw",
        limit=4,
        data_root=tmp_path,
        batch_size=3,
        thresholds={"operating": -1.0, "far_1e-3": 1.01},
        progress=False,
        grid=tmp_path / "grid.png",
    )
    json.dumps(out)
    assert out["n_images"] == 4 and len(seen) == 2
    assert out["srra"] == 1.0 and out["srra_far_1e-3"] == 0.0
    for k in ("ssim", "psnr", "mse", "ssim_ci95", "srra_ci95", "no_face"):
        assert k in out
    assert (tmp_path / "grid.png").is_file()
    with pytest.raises(ValueError):
        attack.run_attack(tmp_path / "ck", "agedb", data_root=tmp_path)
