"""Bad input is refused before anything is computed or touched, with an ``error:`` line."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from advface.cli import app
from advface.models.recon import build_recon, save_checkpoint
from advface.pipelines.staging import STAGE_FORMAT

# Tiny tensors: one torch thread (the conftest fixture) for every test here.
pytestmark = pytest.mark.usefixtures("one_thread")


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(res, message: str, code: int = 2) -> None:
    """The CLI answered with ``error: ...`` and exit ``code``, not a traceback."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert "error:" in res.output and message in res.output, res.output


@pytest.fixture()
def maps(tmp_path: Path) -> Path:
    z = torch.relu(torch.randn(4, 64, 77, 77, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "in.safetensors"
    save_file({"z": z}, str(path))
    return path


# -- protect-bulk: a source inside DST ------------------------------------------------------
def test_bulk_refuses_a_source_inside_the_output(tmp_path: Path, maps: Path) -> None:
    from advface.pipelines.bulk import SHARDS, ProtectionFactory, read_bulk, run_bulk

    first = tmp_path / "b1"
    run_bulk(maps, first, ProtectionFactory("random,seed=3"), shard_size=2, engine="serial")
    before = _digests(first)
    factory = ProtectionFactory("random,seed=4")
    # DST itself (an earlier run as SRC), one of its shards, and a link to one.
    link = tmp_path / "link.safetensors"
    link.symlink_to(first / SHARDS / "shard-00000.safetensors")
    for src in (first, first / SHARDS, first / SHARDS / "shard-00001.safetensors", link):
        with pytest.raises(ValueError, match="inside the output"):
            run_bulk(src, first, factory, engine="serial", overwrite=True)
    assert _digests(first) == before
    res = CliRunner().invoke(
        app,
        ["protect-bulk", str(first), str(first), "--protection", "random,seed=4",
         "--engine", "serial", "--overwrite"],
    )  # fmt: skip
    _refused(res, "inside the output")
    assert _digests(first) == before
    # An earlier run into another folder is what the docs allow.
    run_bulk(first, tmp_path / "b2", factory, engine="serial")
    assert read_bulk(tmp_path / "b2")["z"].shape == (4, 64, 77, 77)


# -- train-recon: an existing checkpoint ----------------------------------------------------
@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    model = build_recon("transrec", width=4)
    return save_checkpoint(tmp_path / "ck", model, "transrec", {"width": 4}, train_set="t")


def test_train_recon_refuses_an_existing_checkpoint(tmp_path: Path, checkpoint: Path) -> None:
    from advface.pipelines.attack import check_train_out

    before = _digests(checkpoint)
    runner = CliRunner()
    base = ["train-recon", "--arch", "transrec", "--train-set", str(tmp_path / "nowhere"),
            "--data-root", str(tmp_path), "--no-progress"]  # fmt: skip
    _refused(runner.invoke(app, [*base, "--out", str(checkpoint)]), "already holds a checkpoint")
    _refused(
        runner.invoke(app, [*base, "--out", str(checkpoint), "--resume", "--overwrite"]),
        "give one",
    )
    (tmp_path / "file").write_text("x")
    _refused(runner.invoke(app, [*base, "--out", str(tmp_path / "file")]), "not a folder")
    # --resume of a folder without a checkpoint fails before the training set is loaded
    _refused(runner.invoke(app, [*base, "--out", str(tmp_path / "new"), "--resume"]), "config.json")
    assert _digests(checkpoint) == before and not (tmp_path / "new").exists()
    check_train_out(checkpoint, resume=True, overwrite=False)
    check_train_out(checkpoint, resume=False, overwrite=True)
    check_train_out(tmp_path / "new", resume=False, overwrite=False)
    help_text = runner.invoke(app, ["train-recon", "--help"], terminal_width=200).output
    assert "--overwrite" in help_text


# -- attack: thresholds and the grid --------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "nan"], "--threshold must be"),
        (["--threshold", "5"], "--threshold must be"),
        (["--threshold", "-1.5"], "--threshold must be"),
        (["--threshold", "0.3", "--threshold-far", "inf"], "--threshold-far must be"),
    ],
)
def test_attack_refuses_a_threshold_that_is_no_cosine(tmp_path: Path, flags, message) -> None:
    res = CliRunner().invoke(
        app, ["attack", "--attacker", str(tmp_path / "none"), "--data-root", str(tmp_path), *flags]
    )
    _refused(res, message)


def test_attack_grid_target_is_checked_up_front(tmp_path: Path, checkpoint: Path) -> None:
    from advface.pipelines.attack import check_grid_target, check_thresholds

    (tmp_path / "old.png").write_bytes(b"an earlier grid")
    (tmp_path / "file").write_text("x")
    runner = CliRunner()
    cases = [
        (tmp_path / "old.png", "exists"),
        (tmp_path, "is a folder"),
        (tmp_path / "file" / "g.png", "not a writable folder"),
    ]
    for grid, message in cases:
        res = runner.invoke(
            app,
            ["attack", "--attacker", str(checkpoint), "--grid", str(grid), "--threshold", "0.3",
             "--data-root", str(tmp_path)],
        )  # fmt: skip
        _refused(res, message)
    assert (tmp_path / "old.png").read_bytes() == b"an earlier grid"
    assert check_grid_target(tmp_path / "old.png", overwrite=True) == tmp_path / "old.png"
    assert check_grid_target(tmp_path / "new" / "deeper" / "g.png").name == "g.png"
    with pytest.raises(ValueError, match="finite"):
        check_thresholds({"operating": float("nan")})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_attack_grid_in_a_read_only_folder(tmp_path: Path) -> None:
    from advface.pipelines.attack import check_grid_target

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not a writable folder"):
            check_grid_target(folder / "g.png")
    finally:
        folder.chmod(0o755)


def _stand_in_attack(monkeypatch, tmp_path: Path) -> Path:
    """run_attack's collaborators replaced by tiny stand-ins; returns the attacker folder."""
    import advface.models.facenet as facenet
    import advface.models.split as split
    import advface.pipelines.data as pdata
    from advface.pipelines import attack

    torch.manual_seed(0)
    e = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2), nn.Conv2d(32, 32, 3),
                      nn.Conv2d(32, 64, 3, padding=1))  # fmt: skip
    full = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16))
    keys = [f"p/{i}.jpg" for i in range(3)]
    images = (np.random.default_rng(0).random((3, 160, 160, 3)) * 255).astype(np.uint8)
    monkeypatch.setattr(facenet, "load_facenet", lambda **kw: full)
    monkeypatch.setattr(split, "split_facenet", lambda m: (e, None))
    monkeypatch.setattr(
        pdata,
        "aligned_images",
        lambda ds, k, **kw: (images[[keys.index(x) for x in k]], np.ones(len(k))),
    )
    monkeypatch.setattr(attack, "_test_keys", lambda d, root, ckpt: (keys, {"test_people": 1}))
    ck = save_checkpoint(tmp_path / "ck", build_recon("transrec", width=4), "transrec",
                         {"width": 4}, train_set="t", epochs=1)  # fmt: skip
    return ck


def test_attack_writes_a_grid_only_when_asked(monkeypatch, tmp_path: Path) -> None:
    from advface.pipelines import attack

    ck = _stand_in_attack(monkeypatch, tmp_path)
    before = _digests(ck)
    thresholds = {"operating": 0.3, "far_1e-3": 0.5}
    out = attack.run_attack(ck, "lfw", data_root=tmp_path, thresholds=thresholds, progress=False)
    assert "grid" not in out and _digests(ck) == before
    grid = tmp_path / "grids" / "g.png"
    out = attack.run_attack(
        ck, "lfw", data_root=tmp_path, thresholds=thresholds, progress=False, grid=grid
    )
    assert out["grid"] == str(grid) and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in grid.parent.iterdir()] == ["g.png"]  # no temporary file left
    with pytest.raises(ValueError, match="exists"):
        attack.run_attack(ck, "lfw", data_root=tmp_path, thresholds=thresholds, grid=grid)
    with pytest.raises(ValueError, match="finite"):
        attack.run_attack(ck, "lfw", data_root=tmp_path, thresholds={"operating": float("nan")})


# -- protect: DST a folder ------------------------------------------------------------------
class _Untouchable:
    """A protection that fails the test if anything is computed."""

    name = "untouchable"

    def protect(self, z, generator=None):  # noqa: ARG002
        raise AssertionError("computed before the output was checked")


def test_protect_refuses_a_folder_as_output(tmp_path: Path, maps: Path) -> None:
    from advface.pipelines.protect import protect_file

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        protect_file(maps, folder, _Untouchable(), overwrite=True)
    res = CliRunner().invoke(
        app, ["protect", str(maps), str(folder), "--method", "none", "--overwrite"]
    )
    _refused(res, "is a folder")
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- prepare --download: an unreachable server ---------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_download_from_an_unreachable_server(tmp_path: Path) -> None:
    from advface.data.download import ensure_lfw

    url = f"http://127.0.0.1:{_closed_port()}/"
    with pytest.raises(ValueError, match=f"download of {url}pairs.txt failed"):
        ensure_lfw(tmp_path / "data", base_url=url, progress=False)
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="download of nowhere/pairs.txt failed"):
        ensure_lfw(tmp_path / "data", base_url="nowhere", progress=False)
    res = CliRunner().invoke(
        app,
        ["prepare", "lfw", "--download", "--download-url", url, "--data-root",
         str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
    )  # fmt: skip
    # prepare reports every user error with exit 1
    _refused(res, f"download of {url}pairs.txt failed", code=1)
    assert not (tmp_path / "data").exists()


# -- unstage: a damaged manifest ------------------------------------------------------------
@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"format": STAGE_FORMAT}, "'parts'"),
        ([1, 2], "JSON object"),
        ({"format": STAGE_FORMAT - 1, "parts": {"part-00": {}}}, "stage format"),
        ({"format": STAGE_FORMAT, "parts": {"../x": {}}}, "not a part name"),
        ({"format": STAGE_FORMAT, "parts": {"part-00": ["meta.tar"]}}, "must map file names"),
        (
            {"format": STAGE_FORMAT, "parts": {"part-00": {"../../etc/x": "0" * 64}}},
            "without a valid",
        ),
        ({"format": STAGE_FORMAT, "parts": {"part-00": {"meta.tar": 5}}}, "without a valid"),
        ({"format": STAGE_FORMAT, "parts": {"part-00": {}}}, "weights.files"),
        (
            {"format": STAGE_FORMAT, "parts": {"part-00": {}}, "weights": {"files": ["part-01/w"]}},
            "not a file of the stage",
        ),
        ("{not json", "not a readable stage manifest"),
    ],
)
def test_unstage_refuses_a_damaged_manifest(tmp_path: Path, manifest, message) -> None:
    from advface.pipelines import staging

    stage = tmp_path / "stage"
    (stage / "part-00").mkdir(parents=True)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (stage / "part-00" / staging.MANIFEST).write_text(text)
    with pytest.raises(ValueError, match=message):
        staging.unstage(stage, tmp_path / "root")
    res = CliRunner().invoke(app, ["unstage", str(stage), "--root", str(tmp_path / "root")])
    _refused(res, message.strip("'"))
    assert not (tmp_path / "root").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]
