"""Offline mode: distilled server head (student Psi' for protected features)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from advface.data.splits import IdentitySplit
from advface.models.distill import (
    head_parts,
    load_student,
    make_student,
    save_student,
    state_fingerprint,
    train_from_choices,
)
from advface.models.facenet import InceptionResnetV1
from advface.models.split import split_facenet
from advface.pipelines.offline import DistillSettings, distill_head, distill_loss
from advface.protection import build_protection
from advface.service.backend import _ToyPsi


class Noisy:
    """A stand-in protection (seeded uniform noise): keeps these tests independent of the
    protections' own parameters."""

    name = "noisy"

    def __init__(self, bound: float, seed: int, block: int = 11) -> None:
        self.bound, self.seed, self.block = bound, seed, block

    def protect(self, z: torch.Tensor) -> torch.Tensor:
        # Coarse (blocks of block x block) noise: it survives the toy head's pooling.
        g = torch.Generator().manual_seed(self.seed)
        n = z.shape[-1] // self.block
        u = 2 * torch.rand((*z.shape[:2], n, n), generator=g) - 1
        u = u.repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)
        return z + self.bound * u

    def params(self) -> dict:
        return {"name": self.name, "bound": self.bound, "seed": self.seed}


def toy_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _ToyPsi().eval()


def feature_maps(n: int, seed: int = 1, size: int = 77) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, 64, size, size, generator=g))


def late_maps(n: int, seed: int = 1) -> torch.Tensor:
    """Inputs of a Psi cut late (after repeat_2: (N, 896, 8, 8)), which keeps the tests fast."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, 896, 8, 8, generator=g))


@pytest.fixture(scope="module")
def facenet_head() -> torch.nn.Module:
    torch.manual_seed(0)  # random weights: the cut, not the accuracy, is under test
    return split_facenet(InceptionResnetV1().eval(), at="repeat_2")[1]


def test_head_parts_compose_to_the_head(facenet_head: torch.nn.Module) -> None:
    z = late_maps(2)
    with torch.no_grad():
        full = facenet_head(z)
        for at in ("repeat_3", "last_linear", "all"):
            parts = head_parts(facenet_head, at)
            assert torch.equal(parts.tail(parts.prefix(z)), full), at
    parts = head_parts(facenet_head, "repeat_3")
    assert all(
        k.startswith(("stages.repeat_3", "stages.block8", "stages.avgpool", "last_"))
        for k in parts.tail_keys
    )
    assert "stages.repeat_3.0.conv2d.weight" in parts.tail_keys
    assert not any(k.startswith("stages.repeat_2") for k in parts.tail_keys)
    assert train_from_choices(toy_teacher()) == ["all"]
    with pytest.raises(ValueError, match="train_from"):
        head_parts(toy_teacher(), "repeat_3")
    with pytest.raises(ValueError, match="train_from"):
        head_parts(facenet_head, "conv2d_1a")  # a stage of E, not of Psi


def test_student_starts_as_teacher_and_trains_only_its_tail(facenet_head) -> None:
    student, parts = make_student(facenet_head, "last_linear")
    assert state_fingerprint(student) == state_fingerprint(facenet_head)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"last_linear.weight", "last_bn.weight", "last_bn.bias"}
    assert not student.training


def test_distillation_reduces_the_loss() -> None:
    teacher = toy_teacher()
    before = state_fingerprint(teacher)
    z = feature_maps(12)
    prot = Noisy(0.5, 3)
    settings = DistillSettings(epochs=8, lr=3e-3, batch_size=4, train_from="all", seed=0)
    student, rec = distill_head(teacher, prot, features=z, settings=settings, progress=False)
    assert rec["loss_before"]["protected"] > 0.01
    assert rec["loss_after"]["protected"] < 0.5 * rec["loss_before"]["protected"]
    assert len(rec["history"]) == 8 and rec["steps"] == 24 and rec["stopped_by"] == "epochs"
    assert rec["protection"] == {"name": "noisy", "bound": 0.5, "seed": 3} and rec["images"] == 12
    assert state_fingerprint(teacher) == before  # the teacher is never trained
    with torch.no_grad():  # the record is the student's real loss on protected features
        got = distill_loss(student(prot.protect(z)), teacher(z), "cosine")
    assert float(got) == pytest.approx(rec["loss_after"]["protected"], rel=1e-4)


def test_time_budget_stops_training() -> None:
    settings = DistillSettings(epochs=50, batch_size=2, train_from="all", time_budget_s=1e-3)
    _, rec = distill_head(
        toy_teacher(),
        build_protection("none"),
        features=feature_maps(4),
        settings=settings,
        progress=False,
    )
    assert rec["stopped_by"] == "time budget" and rec["steps"] == 1


def test_time_budget_counts_across_resumes(tmp_path: Path, monkeypatch) -> None:
    import advface.attacks.train as train

    ticks = iter(range(10**6))  # a clock that advances one second per reading
    monkeypatch.setattr(train, "budget_clock", lambda device: lambda: float(next(ticks)))
    kw = dict(features=feature_maps(4), progress=False, work_dir=tmp_path / "wd")

    def run(**settings):
        s = DistillSettings(batch_size=2, train_from="all", **settings)
        return distill_head(toy_teacher(), build_protection("none"), settings=s, **kw)[1]

    first = run(epochs=2)
    spent = first["budget_seconds"]
    assert first["stopped_by"] == "epochs" and len(first["history"]) == 2 and spent > 0
    # Resumed with more epochs but a budget the first run already spent: no further training.
    again = run(epochs=50, time_budget_s=spent - 1)
    assert again["stopped_by"] == "time budget" and len(again["history"]) == 2
    assert again["budget_seconds"] > spent
    # With budget left it goes on, and stops once the total (both runs) passes it.
    more = run(epochs=50, time_budget_s=again["budget_seconds"] + 8)
    assert more["stopped_by"] == "time budget" and 2 < len(more["history"]) < 50
    assert more["budget_seconds"] > again["budget_seconds"] + 8


def test_save_load_round_trip(tmp_path: Path, facenet_head) -> None:
    z = late_maps(2)
    prot = Noisy(0.3, 1, block=2)
    settings = DistillSettings(epochs=2, lr=1e-3, batch_size=1, train_from="last_linear")
    student, rec = distill_head(facenet_head, prot, features=z, settings=settings, progress=False)
    cfg = save_student(
        tmp_path / "s",
        student,
        teacher_fingerprint=rec["teacher_fingerprint"],
        train_from="last_linear",
        protection=rec["protection"],
        record=rec,
    )
    assert cfg["model_version"].startswith("psi-distilled-")
    assert sorted(cfg["tail_keys"]) == cfg["tail_keys"] and "last_linear.weight" in cfg["tail_keys"]
    loaded, cfg2 = load_student(tmp_path / "s", facenet_head)
    assert cfg2["model_version"] == cfg["model_version"]
    assert cfg2["record"]["history"] == json.loads(json.dumps(rec["history"]))
    assert state_fingerprint(loaded) == state_fingerprint(student)
    with torch.no_grad():
        assert torch.equal(loaded(z), student(z))
        assert not torch.equal(loaded(z), facenet_head(z))
    # Saving the same weights again gives the same version; other weights another one.
    again = save_student(
        tmp_path / "t",
        loaded,
        teacher_fingerprint=rec["teacher_fingerprint"],
        train_from="last_linear",
    )
    assert again["model_version"] == cfg["model_version"]
    torch.manual_seed(5)
    other_teacher = split_facenet(InceptionResnetV1().eval(), at="repeat_2")[1]
    with pytest.raises(ValueError, match="another Psi"):
        load_student(tmp_path / "s", other_teacher)
    with pytest.raises(ValueError, match="distilled from a ServerHead"):
        load_student(tmp_path / "s", toy_teacher())
    # A changed weight file no longer matches the recorded version.
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "s" / "model.safetensors"))
    w["last_linear.weight"][0, 0] += 1.0
    save_file(w, str(tmp_path / "s" / "model.safetensors"))
    with pytest.raises(ValueError, match="model_version"):
        load_student(tmp_path / "s", facenet_head)
    with pytest.raises(ValueError, match="not a distilled head"):
        load_student(tmp_path / "missing", facenet_head)


def test_work_dir_resumes_and_refuses_other_runs(tmp_path: Path) -> None:
    z = feature_maps(6)
    prot = Noisy(0.5, 2)
    base = dict(lr=3e-3, batch_size=3, train_from="all", seed=0)
    whole, rec_whole = distill_head(
        toy_teacher(),
        prot,
        features=z,
        settings=DistillSettings(epochs=3, **base),
        progress=False,
    )
    wd = tmp_path / "work"
    distill_head(
        toy_teacher(),
        prot,
        features=z,
        settings=DistillSettings(epochs=2, **base),
        work_dir=wd,
        progress=False,
    )
    assert len(list((wd / "features").glob("chunk-*.safetensors"))) >= 1
    resumed, rec = distill_head(
        toy_teacher(),
        prot,
        features=z,
        settings=DistillSettings(epochs=3, **base),
        work_dir=wd,
        progress=False,
    )
    assert [h["protected"] for h in rec["history"]] == pytest.approx(
        [h["protected"] for h in rec_whole["history"]], rel=1e-4
    )
    assert state_fingerprint(resumed) != state_fingerprint(toy_teacher())
    with torch.no_grad():
        assert torch.allclose(resumed(z), whole(z), atol=1e-5)
    with pytest.raises(ValueError, match="other inputs or settings"):
        distill_head(
            toy_teacher(),
            prot,
            features=z,
            settings=DistillSettings(epochs=3, **{**base, "lr": 1e-2}),
            work_dir=wd,
            progress=False,
        )


@pytest.mark.parametrize(
    "kw",
    [
        {"epochs": 0},
        {"lr": 0.0},
        {"loss": "l1"},
        {"clean_weight": -1.0},
        {"time_budget_s": 0},
        {"batch_size": 0},
        {"seed": -1},
    ],
)
def test_settings_are_validated(kw: dict) -> None:
    with pytest.raises(ValueError):
        DistillSettings(**kw)


def test_inputs_are_validated() -> None:
    prot = build_protection("none")
    with pytest.raises(ValueError, match="either images"):
        distill_head(toy_teacher(), prot, progress=False)
    with pytest.raises(ValueError, match="extractor"):
        import numpy as np

        distill_head(
            toy_teacher(), prot, images=np.zeros((2, 160, 160, 3), np.uint8), progress=False
        )


@pytest.mark.data
def test_server_identity_check_by_name(data_root: Path) -> None:
    from advface.data.splits import celeba_split
    from advface.pipelines.offline import server_identity_check

    rec = server_identity_check(data_root, celeba_split(data_root, "server").sample(50, 0))
    assert rec["overlap"] == 0 and rec["overlap_with_lfw-view2"] == 0
    assert rec["overlap_with_cfp"] == 0 and "anonymous" in rec["note"]
    bad = IdentitySplit("bad", "lfw", ["George_W_Bush/George_W_Bush_0001.jpg"], ["george w bush"])
    with pytest.raises(ValueError, match="shares 1 identity"):
        server_identity_check(data_root, bad)


@pytest.mark.data
def test_distill_and_eval_cli(tmp_path: Path, data_root: Path) -> None:
    """End to end on real faces: with protection none the student learns nothing new, so the
    offline, online and clean rows agree; the record states the data and identity check."""
    from typer.testing import CliRunner

    from advface.cli import app as cli_app

    out = tmp_path / "student"
    args = ["distill", "--out", str(out), "--protection", "none", "--limit", "2", "--epochs", "1"]
    args += ["--train-from", "last_linear", "--quiet", "--data-root", str(data_root)]
    r = CliRunner().invoke(cli_app, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["train_set"] == "celeba-server[2]" and cfg["data"]["images"] == 2
    assert cfg["data"]["identity_check"]["overlap"] == 0 and len(cfg["data"]["keys"]) == 2
    assert cfg["record"]["loss_before"]["protected"] == pytest.approx(0.0, abs=1e-6)
    r = CliRunner().invoke(cli_app, args)  # an existing student is not overwritten
    assert r.exit_code == 2 and "exists" in r.output
    r = CliRunner().invoke(
        cli_app,
        [
            "eval-offline",
            str(out),
            "--protection",
            "none",
            "--pairs-per-fold",
            "2",
            "--quiet",
            "--data-root",
            str(data_root),
        ],
    )
    assert r.exit_code == 0, r.output
    row = json.loads((out / "eval-lfw.json").read_text())
    assert row["n_pairs"] == 20 and "seeded sample" in row["pairs"]
    assert row["student"] == cfg["model_version"] and row["train_from"] == "last_linear"
    lo, hi = row["accuracy_ci95"]
    assert 0.0 <= lo <= row["accuracy"] <= hi <= 1.0
    for ref in ("clean", "online", "offline_teacher_probe"):
        assert row["reference"][ref]["accuracy"] == row["accuracy"]
