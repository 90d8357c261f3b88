"""End to end on real data: train-recon on a tiny folder, then attack a few LFW faces."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from advface.cli import app


@pytest.mark.data
def test_train_recon_and_attack_cli(data_root, tmp_path) -> None:
    crops = sorted((data_root / "celeba" / "img_mtcnn160").glob("*.jpg"))[:6]
    folder = tmp_path / "faces" / "someone"
    folder.mkdir(parents=True)
    for p in crops:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "ck"
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["train-recon", "--arch", "transrec", "--train-set", str(tmp_path / "faces"),
         "--out", str(out), "--epochs", "1", "--batch-size", "3", "--width", "4",
         "--data-root", str(data_root), "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["n_train"] == 6 and summary["epochs"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_set"] == str(tmp_path / "faces") and cfg["features"] == "clean"
    res = runner.invoke(
        app,
        ["attack", "--attacker", str(out), "--dataset", "lfw", "--limit", "3", "--json",
         "--threshold", "0.4", "--threshold-far", "0.6", "--grid", str(tmp_path / "g.png"),
         "--data-root", str(data_root)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    for key in ("ssim", "psnr", "mse", "srra", "srra_far_1e-3", "n_images"):
        assert key in report
    assert report["n_images"] == 3 and (tmp_path / "g.png").is_file()


@pytest.mark.data
def test_train_set_rejects_test_folder(data_root, tmp_path) -> None:
    res = CliRunner().invoke(
        app,
        ["train-recon", "--train-set", str(data_root / "lfw" / "lfw-deepfunneled"),
         "--out", str(tmp_path / "x"), "--data-root", str(data_root)],
    )  # fmt: skip
    assert res.exit_code == 2 and "overlaps the test dataset" in res.output
