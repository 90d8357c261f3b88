"""``advface protect-bulk``: sharded, resumable bulk protection on a local Ray (and serially)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from advface.cli import app
from advface.models.facenet import preprocess
from advface.models.recon import build_recon, save_checkpoint
from advface.pipelines.bulk import (
    SHARDS,
    ProtectionFactory,
    RayOptions,
    read_bulk,
    read_manifest,
    run_bulk,
)
from advface.pipelines.protect import protect_file
from advface.protection import protection_from_spec

N = 12


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (start-up takes seconds); run_bulk reuses it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


# Tiny tensors: one torch thread (the conftest fixture) for every test here.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def maps(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    z = torch.relu(torch.randn(N, 64, 77, 77, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "in.safetensors"
    save_file({"z": z, "label": torch.arange(N) * 10}, str(path), metadata={"source": "test"})
    return path, z


def _extractor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 64, 3), nn.ReLU()
    ).eval()


@pytest.fixture()
def shadow_ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_recon("resrec", width=4, blocks=0).eval()
    return save_checkpoint(tmp_path / "shadow", model, "resrec", {"width": 4, "blocks": 0})


def _plain(src: Path, out: Path, spec: str, batch_size: int, **kw) -> torch.Tensor:
    protect_file(src, out, protection_from_spec(spec, **kw), batch_size=batch_size)
    return load_file(str(out))["z"]


def _mtimes(dst: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((dst / SHARDS).iterdir())}


def test_ray_outputs_equal_plain_protect_and_resume(local_ray, tmp_path, maps, shadow_ckpt):
    src, z = maps
    e = _extractor()
    # AdvFace with per-batch BN statistics: equal when the shards hold whole batches of the
    # plain loop (shard size a multiple of the batch size).
    spec = f"advface:{shadow_ckpt},steps=2"
    want = _plain(src, tmp_path / "plain.safetensors", spec, 2, extractor=e)
    dst = tmp_path / "out"
    factory = ProtectionFactory(spec, extractor=e)
    s = run_bulk(src, dst, factory, shard_size=4, batch_size=2, ray_options=RayOptions(actors=2))
    assert (s["shards"], s["shards_computed"], s["shards_skipped"]) == (3, 3, 0)
    got = read_bulk(dst)
    assert torch.allclose(got["z"], want, atol=1e-5)
    assert torch.equal(got["index"], torch.arange(N)) and torch.equal(
        got["label"], torch.arange(N) * 10
    )
    body = read_manifest(dst)
    plan = body["plan"]
    assert plan["protection"]["name"] == "advface" and plan["protection"]["steps"] == 2
    assert plan["protection"]["shadow_sha256"] and plan["protection"]["extractor_sha256"]
    assert [x["name"] for x in plan["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert body["run"]["faces_computed"] == N and body["run"]["engine"] == "ray"
    with safe_open(str(dst / SHARDS / "shard-00001.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["bulk_plan_id"] == body["plan_id"] and meta["rows"] == "4:8"
    assert json.loads(meta["protection"]) == plan["protection"]

    # Resume: delete one shard; the rerun computes only that one.
    before = _mtimes(dst)
    (dst / SHARDS / "shard-00001.safetensors").unlink()
    (dst / SHARDS / ".shard-00001.safetensors.killed.tmp").write_bytes(b"half a shard")
    s = run_bulk(src, dst, factory, shard_size=4, batch_size=2, ray_options=RayOptions(actors=2))
    assert (s["shards_computed"], s["shards_skipped"], s["faces_computed"]) == (1, 2, 4)
    after = _mtimes(dst)
    assert after["shard-00000.safetensors"] == before["shard-00000.safetensors"]
    assert after["shard-00002.safetensors"] == before["shard-00002.safetensors"]
    assert torch.allclose(read_bulk(dst)["z"], want, atol=1e-5)
    assert not [p for p in (dst / SHARDS).iterdir() if p.suffix == ".tmp"]

    # Another plan (other parameters) is refused; --overwrite recomputes everything.
    with pytest.raises(ValueError, match="other settings.*protection"):
        run_bulk(src, dst, ProtectionFactory("none"), shard_size=4, batch_size=2)
    assert _mtimes(dst) == after


def test_ray_seeded_random_and_none_match_plain(local_ray, tmp_path, maps):
    src, z = maps
    # The protection's own seed restarts its generator at every call: equal to the plain
    # loop for the same batches, whichever actor runs which shard.
    spec = "random,seed=3,steps=2"
    want = _plain(src, tmp_path / "plain.safetensors", spec, 3)
    run_bulk(src, tmp_path / "r", ProtectionFactory(spec), shard_size=6, batch_size=3)
    assert torch.equal(read_bulk(tmp_path / "r")["z"], want)
    # --seed: one stream per shard, the same for any number of actors (here: serial vs Ray).
    spec = "random,steps=2"
    a = run_bulk(src, tmp_path / "a", ProtectionFactory(spec), shard_size=5, seed=7)
    b = run_bulk(
        src, tmp_path / "b", ProtectionFactory(spec), shard_size=5, seed=7, engine="serial"
    )
    assert a["plan_id"] == b["plan_id"]
    za, zb = read_bulk(tmp_path / "a")["z"], read_bulk(tmp_path / "b")["z"]
    assert torch.equal(za, zb) and not torch.equal(za, z)


def test_cli_protect_bulk_on_ray(local_ray, tmp_path, maps):
    src, z = maps
    dst = tmp_path / "cli"
    args = ["protect-bulk", str(src), str(dst), "--protection", "none", "--shard-size", "5"]
    r = CliRunner().invoke(app, [*args, "--actors", "2", "--json"])
    assert r.exit_code == 0, r.output
    # Ray's own processes may print after the summary (e.g. a raylet's disk-space warning).
    summary = json.loads([ln for ln in r.output.splitlines() if ln.startswith("{")][-1])
    assert summary["shards"] == 3 and summary["faces_computed"] == N
    assert torch.equal(read_bulk(dst)["z"], z)
    r = CliRunner().invoke(app, args)  # rerun: everything is done already
    assert r.exit_code == 0, r.output
    assert "0 faces in 0 shards (3 already done)" in r.output


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    nan = torch.zeros(6, 64, 77, 77)
    nan[4, 1, 2, 3] = float("nan")
    save_file({"z": nan}, str(tmp_path / "nan.safetensors"))
    save_file({"z": torch.zeros(2, 64, 76, 77)}, str(tmp_path / "shape.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "nokey.safetensors"))
    np.save(tmp_path / "faces.npy", np.zeros((2, 160, 150, 3), np.uint8))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    return {
        "does not exist": tmp_path / "missing.safetensors",
        r"face 4: .*NaN": tmp_path / "nan.safetensors",
        r"must be \(N, 64, 77, 77\)": tmp_path / "shape.safetensors",
        "no tensor 'z' or 'images'": tmp_path / "nokey.safetensors",
        r"must be \(N, 160, 160, 3\)": tmp_path / "faces.npy",
        "not a readable safetensors": tmp_path / "junk.safetensors",
    }


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path):
    for message, src in _bad_inputs(tmp_path).items():
        dst = tmp_path / "never"
        r = CliRunner().invoke(app, ["protect-bulk", str(src), str(dst), "--protection", "none"])
        assert r.exit_code == 2, (message, r.output)
        assert "error:" in r.output
        assert re.search(message, r.output), (message, r.output)
        assert not dst.exists()
    good = tmp_path / "good.safetensors"
    save_file({"z": torch.zeros(2, 64, 77, 77)}, str(good))
    r = CliRunner().invoke(
        app, ["protect-bulk", str(good), str(tmp_path / "o"), "--protection", "x"]
    )
    assert r.exit_code == 2 and "unknown protection" in r.output
    assert not (tmp_path / "o").exists()


def test_without_precheck_a_bad_shard_fails_alone(tmp_path):
    z = torch.relu(torch.randn(6, 64, 77, 77))
    z[4, 0, 0, 0] = float("inf")
    save_file({"z": z}, str(tmp_path / "in.safetensors"))
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=r"shard-00002: .*faces 4\.\.5: .*finite"):
        run_bulk(
            tmp_path / "in.safetensors",
            dst,
            ProtectionFactory("none"),
            shard_size=2,
            engine="serial",
            precheck=False,
        )
    assert sorted(p.name for p in (dst / SHARDS).iterdir()) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert read_manifest(dst)["run"]["shards_failed"] == 1


def test_aligned_faces_go_through_e_and_a_bulk_output_can_be_reprotected(tmp_path):
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (5, 160, 160, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", faces)
    e = _extractor()
    dst = tmp_path / "faces"
    s = run_bulk(
        tmp_path / "images.npy",
        dst,
        ProtectionFactory("none", extractor=e),
        shard_size=2,
        engine="serial",
    )
    with torch.inference_mode():
        want = e(preprocess(faces))
    assert torch.allclose(read_bulk(dst)["z"], want, atol=1e-6)
    plan = read_manifest(dst)["plan"]
    assert plan["sources"][0]["kind"] == "images" and len(plan["extractor_sha256"]) == 64
    assert s["shards"] == 3
    # Migration of a bulk gallery: its DST is the next run's SRC; the shards record both.
    again = tmp_path / "again"
    run_bulk(dst, again, ProtectionFactory("random,seed=1,steps=1"), engine="serial")
    with safe_open(str(again / SHARDS / "shard-00000.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["protection_previous"])["name"] == "none"
    assert json.loads(meta["protection"])["name"] == "random"
    assert torch.equal(read_bulk(again)["index"], torch.arange(5))


def test_package_imports_without_ray():
    code = (
        "import sys, advface.cli, advface.pipelines.bulk; "
        "assert 'ray' not in sys.modules, 'ray imported eagerly'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
