"""Reconstruction training (stand-in E), resume, feature hook, training-set disjointness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from advface.attacks import trainsets
from advface.attacks.train import TrainSettings, to_unit, train_recon, unit_to_facenet
from advface.attacks.trainsets import TrainSet, check_disjoint
from advface.models.recon import load_checkpoint


def stand_in_extractor() -> nn.Module:
    """Same shapes as FaceNet's E: (N,3,160,160) -> (N,64,77,77)."""
    torch.manual_seed(123)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


def faces(n: int = 12, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (N,160,160,3): low-frequency blobs, easy to invert."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 10, 10, generator=g)
    img = torch.nn.functional.interpolate(low, size=160, mode="bilinear", align_corners=False)
    return (img.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_unit_conversions() -> None:
    x = faces(2)
    u = to_unit(x)
    assert u.shape == (2, 3, 160, 160) and float(u.max()) <= 1
    from advface.models.facenet import preprocess

    assert torch.allclose(unit_to_facenet(u), preprocess(x), atol=1e-5)
    with pytest.raises(ValueError):
        to_unit(x.astype(np.float32))


def test_training_reduces_loss_and_resumes(tmp_path) -> None:
    images, e = faces(8), stand_in_extractor()
    s = TrainSettings(epochs=1, batch_size=4, lr=1e-2, seed=0, progress=False)
    out = tmp_path / "ck"
    res = train_recon(
        images,
        e,
        arch="transrec",
        cfg={"width": 6},
        settings=s,
        out_dir=out,
        meta={"train_set": "generated", "features": "clean"},
    )
    assert res.epochs_done == 1 and len(res.history) == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["train_set"] == "generated" and cfg["seed"] == 0
    assert (out / "optimizer.safetensors").is_file()
    # Resume for 3 more epochs: history continues, loss keeps falling from the first epoch.
    s2 = TrainSettings(epochs=4, batch_size=4, lr=1e-2, seed=0, progress=False)
    res2 = train_recon(
        images,
        e,
        arch="transrec",
        cfg={"width": 6},
        settings=s2,
        out_dir=out,
        resume=True,
        meta={"train_set": "generated", "features": "clean"},
    )
    assert [h["epoch"] for h in res2.history] == [1, 2, 3, 4]
    assert res2.history[-1]["l1"] < 0.8 * res2.history[0]["l1"]
    model, meta = load_checkpoint(out)
    assert meta["epochs"] == 4
    with torch.no_grad():
        z = e(unit_to_facenet(to_unit(images[:2])))
        assert torch.equal(model(z), res2.model(z))


def test_feature_fn_is_applied() -> None:
    seen: list[tuple[int, ...]] = []

    def scramble(z: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(z.shape))
        return z + 1.0

    s = TrainSettings(epochs=1, batch_size=4, seed=1, progress=False, flip=False)
    train_recon(
        faces(8),
        stand_in_extractor(),
        arch="resrec",
        cfg={"width": 4, "blocks": 1},
        settings=s,
        feature_fn=scramble,
    )
    assert seen == [(4, 64, 77, 77), (4, 64, 77, 77)]


@pytest.mark.parametrize("flip", [False, True])
def test_filled_memo_is_not_protected_again_while_training(flip: bool) -> None:
    """After ``fill`` every epoch finds its features: no protection inside the time budget."""
    from advface.attacks.train import MemoFeatures

    calls: list[int] = []

    def protect(z: torch.Tensor) -> torch.Tensor:
        calls.append(len(z))
        return z * 0.5

    images, e = faces(6), stand_in_extractor()
    memo = MemoFeatures(protect)
    memo.fill(images, e, batch_size=4, flips=flip, progress=False)
    filled = list(calls)
    assert sum(filled) == len(images) * (2 if flip else 1) == len(memo)
    s = TrainSettings(epochs=3, batch_size=4, seed=2, progress=False, flip=flip)
    train_recon(images, e, arch="transrec", cfg={"width": 4}, settings=s, feature_fn=memo)
    assert calls == filled
    # The memo holds fn of E of each (mirrored) image.
    x = to_unit(images[1:2])
    x = x.flip(-1) if flip else x
    with torch.no_grad():
        want = e(unit_to_facenet(x)) * 0.5
    got = memo.lookup([(1, flip)], lambda rows: pytest.fail("should be held"))
    assert torch.allclose(got, want, atol=1e-2)


def test_budget_clock_ignores_time_the_process_does_not_run(monkeypatch) -> None:
    """On the CPU a time budget counts CPU time per thread: waiting for the cores (here:
    sleeping) does not spend it, and a training stops once the budget clock passes it."""
    import time

    import advface.attacks.train as train_mod

    clock = train_mod.budget_clock(torch.device("cpu"))
    before = clock()
    time.sleep(0.3)
    assert clock() - before < 0.1

    ticks = iter(range(0, 10_000, 20))  # every reading of the clock: 20 s later
    monkeypatch.setattr(train_mod, "budget_clock", lambda device: lambda: float(next(ticks)))
    s = TrainSettings(epochs=5, batch_size=2, progress=False, flip=False, max_minutes=1.0)
    res = train_recon(faces(8), stand_in_extractor(), arch="transrec", cfg={"width": 4}, settings=s)
    assert res.stopped_early and res.epochs_done == 0
    assert res.history[0]["images"] == 6 and res.history[0]["budget_seconds"] == 80.0


def test_settings_validation() -> None:
    bad_settings = (
        {"epochs": 0},
        {"epochs": 2.5},
        {"batch_size": 1},
        {"batch_size": 8.0},
        {"lr": 0.0},
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"max_minutes": -1.0},
        {"max_minutes": float("inf")},
        {"seed": -1},
        {"flip": "no"},
    )
    for bad in bad_settings:
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            TrainSettings(**bad)
    with pytest.raises(ValueError):
        train_recon(faces(1), stand_in_extractor(), arch="transrec")
    with pytest.raises(ValueError):
        train_recon(faces(4), stand_in_extractor(), arch="transrec", resume=True)


def test_a_decompression_bomb_in_a_folder_is_a_clear_error(monkeypatch, tmp_path) -> None:
    from PIL import Image

    Image.fromarray(faces(1)[0]).save(tmp_path / "a.png")
    # Any image past PIL's pixel limit is refused by PIL with DecompressionBombError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="cannot read image .*a.png"):
        trainsets._read_folder(tmp_path, None)


def test_disjointness_check(monkeypatch, tmp_path) -> None:
    imgs = faces(6)
    monkeypatch.setattr(trainsets, "test_keys", lambda root: {"lfw": {"A/a_1.jpg"}, "cfp": set()})

    class Cache:
        keys = ["A/a_1.jpg"]

        def take(self, keys):
            return imgs[:1]

    import advface.data.prepare as prepare

    monkeypatch.setattr(prepare, "load_aligned", lambda name, **kw: Cache())
    # Same key as a test image.
    with pytest.raises(ValueError, match="test image"):
        check_disjoint(
            TrainSet("x", imgs[1:3], ["A/a_1.jpg", "B/b_1.jpg"]), tmp_path, dataset="lfw"
        )
    # Same pixels as a test image under another name.
    with pytest.raises(ValueError, match="equals test image"):
        check_disjoint(TrainSet("x", imgs[:2], ["X/1.jpg", "X/2.jpg"]), tmp_path)
    report = check_disjoint(
        TrainSet("x", imgs[2:4], ["X/1.jpg", "X/2.jpg"]), tmp_path, dataset="lfw"
    )
    assert report["key_check"] == "lfw" and report["content_check"]
