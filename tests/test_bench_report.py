"""The bench's verdict per metric, its floors, intervals and training checks (no data)."""

from __future__ import annotations

import numpy as np
import pytest

from advface.pipelines.robustness import PROFILES, get_profile
from advface.pipelines.robustness.metrics import (
    ProtocolEval,
    _verification,
    far_threshold,
    recon_rows,
)
from advface.pipelines.robustness.models import check_same_training
from advface.pipelines.robustness.report import (
    embedding_floor,
    identity_beyond_floor,
    render,
    strongest,
    versus,
    weak_floor_decoder,
)
from advface.pipelines.robustness.run import attacker_training


def _row(method, attacker, ssim, srra, cos, *, n=500, psnr=13.0, width=0.005, **kw):
    half = 0.02 if n < 100 else 0.01
    return {
        "table": "robustness",
        "dataset": "lfw",
        "method": method,
        "attacker": attacker,
        "ssim": ssim,
        "ssim_ci95": [ssim - width, ssim + width],
        "psnr": psnr,
        "psnr_ci95": [psnr - 0.1, psnr + 0.1],
        "mse": 0.05,
        "srra": srra,
        "srra_ci95": [max(0.0, srra - half), min(1.0, srra + half)],
        "srra_far": None,
        "replay_cosine": cos,
        "replay_cosine_ci95": [cos - 0.01, cos + 0.01],
        "chance_srra": 0.01,
        "chance_srra_far": None,
        "threshold": 0.35,
        "threshold_far": None,
        "impostor_pairs": 100,
        "n_images": n,
        **kw,
    }


ROWS = [
    _row("floor-embedding", "floor-embedding", 0.468, 0.008, 0.10),
    _row("floor-embedding-inversion", "floor-embedding-inversion", 0.24, 1.0, 1.0, n=64),
    _row("floor-mean-face", "floor-mean-face", 0.467, 0.0, -0.02),
    _row("none", "embedding", 0.468, 0.008, 0.10),
    # SSIM below the mean face, yet accepted as the person: the SSIM winner is not the
    # identity winner.
    _row("advface", "paper-resrec", 0.358, 0.85, 0.516),
    _row("advface", "embedding", 0.464, 0.006, 0.10),
    _row("advface", "inversion", 0.713, 1.0, 0.957, n=64),
    _row("embedding-shadow", "adaptive-leaked", 0.457, 0.004, 0.035),
    _row("embedding-shadow", "embedding", 0.463, 0.010, 0.107),
    _row("embedding-shadow", "inversion", 0.171, 1.0, 0.967, n=64),
    _row("embedding-shadow", "embedding-inversion", 0.235, 1.0, 0.999, n=64),
]


def test_strongest_is_per_metric_and_names_its_attacker():
    assert strongest(ROWS, "lfw", "advface", "ssim")["attacker"] == "inversion"
    assert strongest(ROWS, "lfw", "advface", "srra")["attacker"] == "inversion"
    dec = strongest(ROWS, "lfw", "advface", "srra", decoders_only=True)
    assert dec["attacker"] == "paper-resrec" and dec["srra"] == 0.85
    es = {m: strongest(ROWS, "lfw", "embedding-shadow", m)["attacker"] for m in ("ssim", "srra")}
    assert es == {"ssim": "embedding", "srra": "inversion"}  # ties: larger n, then the first


def test_floor_is_the_best_embedding_only_attacker_per_metric():
    assert embedding_floor(ROWS, "lfw", "ssim")["attacker"] == "floor-embedding"
    assert embedding_floor(ROWS, "lfw", "srra")["attacker"] == "floor-embedding-inversion"
    dec = embedding_floor(ROWS, "lfw", "srra", decoders_only=True)
    assert dec["attacker"] in ("floor-embedding", "embedding") and dec["srra"] == 0.008
    mean_wins = [r for r in ROWS if r["method"] != "none"]
    mean_wins[0] = {**mean_wins[0], "ssim": 0.30, "ssim_ci95": [0.29, 0.31]}
    floor = embedding_floor(mean_wins, "lfw", "ssim")
    assert floor["attacker"] == "floor-mean-face"  # a weak decoder does not lower the floor
    # A protected method's rows never count towards the floor.
    assert all(embedding_floor(ROWS, "lfw", m)["method"] != "advface" for m in ("ssim", "srra"))


def test_versus_uses_the_intervals():
    floor = {"ssim": 0.5, "ssim_ci95": [0.49, 0.51]}
    assert versus({"ssim": 0.6, "ssim_ci95": [0.59, 0.61]}, floor, "ssim") == "above"
    assert versus({"ssim": 0.52, "ssim_ci95": [0.505, 0.535]}, floor, "ssim") == "at"
    assert versus({"ssim": 0.4, "ssim_ci95": [0.39, 0.41]}, floor, "ssim") == "below"
    assert versus({"ssim": 0.9}, floor, "ssim") == "no interval"


def test_identity_is_judged_by_srra_and_replay_against_the_floors():
    # Any attacker: the floor's optimiser replays every face, so nothing is above it.
    assert not identity_beyond_floor(ROWS, "lfw", "advface")
    # Decoders only: AdvFace's paper attacker is accepted for 85% against the floor's 0.8%,
    # though its SSIM (0.358) is under the mean face (0.467).
    assert identity_beyond_floor(ROWS, "lfw", "advface", decoders_only=True)
    assert not identity_beyond_floor(ROWS, "lfw", "embedding-shadow", decoders_only=True)


def test_weak_floor_decoder_is_reported():
    assert "floor decoders are weak" in weak_floor_decoder(ROWS, "lfw")
    strong = [
        {**r, "ssim": 0.6, "ssim_ci95": [0.59, 0.61]} if r["method"] == "floor-embedding" else r
        for r in ROWS
    ]
    assert weak_floor_decoder(strong, "lfw") is None
    # Either floor decoder above the mean face measures the floor; the ridge one is a floor
    # attacker that sees only the embedding.
    ridge = _row("floor-embedding-ridge", "floor-embedding-ridge", 0.52, 0.01, 0.12)
    assert weak_floor_decoder([*ROWS, ridge], "lfw") is None
    assert embedding_floor([*ROWS, ridge], "lfw", "ssim")["attacker"] == "floor-embedding-ridge"


def _meta(**extra):
    return {
        "profile": get_profile("smoke").to_dict(),
        "device": "cpu",
        "machine": "x",
        "wall_s": 1.0,
        "complete": True,
        "splits": {"attacker": {"images": 3, "people": 2}, "server": {"images": 2, "people": 1}},
        "training": {
            "server-shadow": {
                "train_set": "celeba-server",
                "n_train": 2,
                "epochs": 1,
                "seconds": 1.0,
                "identity_overlap_with_test": None,
                "loss_curve": [0.2],
                "flip": True,
            }
        },
        **extra,
    }


def test_report_verdict_per_metric_n_far_and_records():
    acc = {
        "table": "robustness",
        "dataset": "lfw",
        "method": "advface",
        "attacker": None,
        "accuracy": 0.98,
        "accuracy_ci95": [0.93, 0.99],
        "accuracy_ci95_folds": [0.95, 1.01],
        "n_pairs": 100,
        "full_protocol": False,
        "stored_identity_cosine": 0.95,
    }
    same = {
        "train_set": "lfw-attacker[3]",
        "n_train": 3,
        "data_sha256": "abc",
        "flip": True,
        "epochs_setting": 1,
        "max_minutes": None,
        "attackers": ["attacker-resrec", "adaptive-own-advface"],
    }
    md = render(_meta(git_commit="0123abcd4567", attacker_training=same), [*ROWS, acc])
    assert "code: commit 0123abcd4567" in md
    assert "trains on the same 3 images" in md and "protect the mirrored images too" in md
    assert "unchecked" in md and "unchecked (CelebA)" in md
    # Per metric, each with its attacker; the smaller face set is marked.
    assert "| advface | 0.713 inversion (n=64): above |" in md
    assert "85.0% paper-resrec: above" in md  # decoders only
    assert "n/a (too few impostor pairs)" in md and "(100 impostor pairs; it needs 1,000)" in md
    assert "Wilson over pairs" in md and "98.00 [93.00, 99.00]" in md
    assert "floor decoders are weak" in md


def test_accuracy_interval_is_wilson_over_pairs():
    fold = np.repeat(np.arange(10), 2)
    issame = np.tile([True, False], 10)
    scores = np.where(issame, 0.9, 0.1)
    ver = _verification(scores, issame, fold)
    assert ver["correct_pairs"] == 20 and ver["accuracy"] == 1.0
    lo, hi = ver["accuracy_ci95"]
    assert hi == 1.0 and 0.8 < lo < 0.85  # Wilson 20/20: [0.839, 1]; never above 100%
    assert ver["accuracy_ci95_folds"] == [1.0, 1.0]  # the old interval: zero width
    assert ver["threshold_far"] is None and ver["impostor_pairs"] == 10
    one_wrong = scores.copy()
    one_wrong[1] = 0.95  # an impostor pair above every genuine one
    ver = _verification(one_wrong, issame, fold)
    assert ver["correct_pairs"] == 19 and ver["accuracy_ci95"][1] < 1.0


def test_far_threshold_needs_enough_impostor_pairs():
    assert far_threshold(0.45, 999) is None
    assert far_threshold(0.45, 1000) == 0.45 and far_threshold(0.45, 3000) == 0.45


def test_recon_rows_without_a_far_threshold():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(4, 8))
    clean /= np.linalg.norm(clean, axis=1, keepdims=True)
    proto = ProtocolEval(
        dataset="lfw",
        keys=[],
        idx_a=np.zeros(0, int),
        idx_b=np.zeros(0, int),
        issame=np.zeros(0, bool),
        fold=np.zeros(0, int),
        clean=clean,
        threshold=0.5,
        threshold_far=None,
        chance=0.0,
        chance_far=None,
        impostor_pairs=10,
        clean_accuracy={},
        key="k",
        full=False,
    )
    res = {
        "a/ssim": np.array([0.5, 0.6, 0.7, 0.8]),
        "a/psnr": np.array([10.0, 11, 12, 13]),
        "a/mse": np.array([0.1, 0.1, 0.1, 0.1]),
        "a/emb": clean.copy(),
    }
    (row,) = recon_rows("lfw", "none", {"a": res}, clean, proto)
    assert row["srra"] == 1.0 and row["srra_far"] is None and row["srra_far_ci95"] is None
    assert row["threshold_far"] is None and row["impostor_pairs"] == 10
    lo, hi = row["replay_cosine_ci95"]
    assert lo <= row["replay_cosine"] <= hi and row["replay_cosine"] == pytest.approx(1.0)


def test_every_attacker_trains_alike():
    assert all(p.flip for p in PROFILES.values())
    assert not hasattr(get_profile("cpu"), "adaptive_limit")  # no per-attacker data size
    rec = {
        "train_set": "lfw-attacker[3]",
        "n_train": 3,
        "data_sha256": "abc",
        "flip": True,
        "epochs_setting": 1,
        "max_minutes": None,
    }
    training = {"attacker-resrec": rec, "server-shadow": {**rec, "train_set": "celeba-server"}}
    check_same_training(training, "adaptive-own-advface", dict(rec))
    check_same_training(training, "server-generator", {**rec, "flip": False})  # not an attacker
    for change in ({"flip": False}, {"data_sha256": "def", "n_train": 2}, {"max_minutes": 0.4}):
        with pytest.raises(ValueError, match="must train on the same images"):
            check_same_training(training, "adaptive-own-advface", {**rec, **change})
    summary = attacker_training({**training, "adaptive-own-advface": {**rec, "loss_curve": []}})
    assert summary["flip"] is True and summary["attackers"] == [
        "attacker-resrec",
        "adaptive-own-advface",
    ]
    with pytest.raises(ValueError):
        attacker_training({**training, "adaptive-own-advface": {**rec, "flip": False}})
    # A closed-form fit has no epochs or budget: only its images and flips are compared.
    ridge = {k: rec[k] for k in ("train_set", "n_train", "data_sha256", "flip")}
    ridge["closed_form"] = True
    check_same_training(training, "attacker-ridge", ridge)
    with pytest.raises(ValueError, match="data_sha256"):
        check_same_training(training, "attacker-ridge", {**ridge, "data_sha256": "def"})
    summary = attacker_training({"attacker-ridge": ridge, **training})
    assert summary["attackers"] == ["attacker-resrec"] and summary["epochs_setting"] == 1
    assert summary["closed_form"] == ["attacker-ridge"]


def test_cli_report_rerenders_a_bench_folder_without_touching_its_results(tmp_path):
    import json

    from typer.testing import CliRunner

    from advface.cli import app
    from advface.pipelines.robustness.report import render

    results = tmp_path / "results.json"
    results.write_text(json.dumps({**_meta(), "rows": ROWS}))
    before = results.read_bytes()
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.md").read_text() == render(_meta(), ROWS)
    assert (tmp_path / "robustness.csv").is_file() and results.read_bytes() == before
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text(json.dumps({"rows": [{"table": "robustness"}]}))
    res = CliRunner().invoke(app, ["report", str(broken)])
    assert res.exit_code == 2 and "cannot read" in res.output, res.output
    assert not (broken / "report.md").exists() and not (broken / "robustness.csv").exists()
