"""``advface protect`` and the protection specs: files in, protected files out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from advface.cli import app
from advface.models.recon import build_recon, save_checkpoint
from advface.pipelines.protect import build_from_options, protect_file
from advface.protection import feature_fn_from_spec, parse_spec, protection_from_spec
from advface.protection.advface import AdvFace

# Tiny tensors: one torch thread (the conftest fixture) for every test here.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def features(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(5, 64, 77, 77, generator=g))
    path = tmp_path / "in.safetensors"
    save_file({"z": z, "label": torch.arange(5)}, str(path), metadata={"source": "unit-test"})
    return path, z


def _read(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118


def _extractor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 64, 3), nn.ReLU()
    ).eval()


@pytest.fixture()
def shadow_ckpt(tmp_path):
    torch.manual_seed(0)
    model = build_recon("resrec", width=4, blocks=0).eval()
    return save_checkpoint(tmp_path / "shadow", model, "resrec", {"width": 4, "blocks": 0})


def test_protect_file_keeps_other_tensors_and_records_params(tmp_path, features) -> None:
    src, z = features
    dst = tmp_path / "out.safetensors"
    p = build_from_options("random", steps=3, epsilon=0.1)
    summary = protect_file(src, dst, p, batch_size=2, seed=4)
    tensors, meta = _read(dst)
    assert torch.equal(tensors["label"], torch.arange(5))
    assert tensors["z"].shape == z.shape and tensors["z"].dtype == z.dtype
    assert float((tensors["z"] - z).abs().max()) <= 0.3 + 1e-5
    assert meta["source"] == "unit-test" and meta["protection_batch_size"] == "2"
    record = json.loads(meta["protection"])
    assert record == summary["protection"] and record["bound"] == 0.1 and record["steps"] == 3
    # Same seed, same output; no temporary files left behind.
    again = tmp_path / "again.safetensors"
    protect_file(src, again, p, batch_size=2, seed=4)
    assert torch.equal(_read(again)[0]["z"], tensors["z"])
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(
        ["in.safetensors", "out.safetensors", "again.safetensors"]
    )


def test_protect_file_advface_matches_in_memory(tmp_path, features, shadow_ckpt) -> None:
    src, z = features
    e = _extractor()
    p = build_from_options("advface", shadow=shadow_ckpt, steps=2, extractor=e, bn="sample")
    dst = tmp_path / "out.safetensors"
    protect_file(src, dst, p, batch_size=2)
    tensors, meta = _read(dst)
    assert torch.allclose(tensors["z"], p.protect(z), atol=1e-5)  # "sample": batching-proof
    record = json.loads(meta["protection"])
    assert record["name"] == "advface" and record["bn"] == "sample"
    assert record["shadow_config"]["arch"] == "resrec"


def test_protect_file_rejects_bad_inputs(tmp_path, features) -> None:
    src, _ = features
    p = build_from_options("none")
    with pytest.raises(ValueError, match="does not exist"):
        protect_file(tmp_path / "missing.safetensors", tmp_path / "o.safetensors", p)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        protect_file(tmp_path / "junk.safetensors", tmp_path / "o.safetensors", p)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "nokey.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'z'"):
        protect_file(tmp_path / "nokey.safetensors", tmp_path / "o.safetensors", p)
    bad = torch.zeros(3, 64, 77, 77)
    bad[2, 0, 0, 0] = float("nan")
    save_file({"z": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"faces 2\.\.2: .*NaN"):
        protect_file(tmp_path / "nan.safetensors", tmp_path / "o.safetensors", p, batch_size=2)
    save_file({"z": torch.zeros(2, 64, 76, 77)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        protect_file(tmp_path / "shape.safetensors", tmp_path / "o.safetensors", p)
    assert not (tmp_path / "o.safetensors").exists()
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="exists"):
        protect_file(src, tmp_path / "exists.safetensors", p)
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="batch_size"):
        protect_file(src, tmp_path / "o.safetensors", p, batch_size=0)


def test_build_from_options_rejects_foreign_flags() -> None:
    with pytest.raises(ValueError, match="--shadow"):
        build_from_options("random", shadow="x")
    with pytest.raises(ValueError, match="--reading"):
        build_from_options("dp", reading="projected")
    with pytest.raises(ValueError, match="needs --shadow"):
        build_from_options("advface")
    with pytest.raises(ValueError, match="unknown method"):
        build_from_options("blur")
    assert build_from_options("dp", epsilon=0.4, epsilon_dp=2.0).scale == pytest.approx(0.2)
    with pytest.raises(ValueError, match="--keep-best"):
        build_from_options("random", keep_best=True)


def test_keep_best_option_reaches_advface(shadow_ckpt) -> None:
    e = _extractor()
    on = build_from_options("advface", shadow=shadow_ckpt, steps=1, extractor=e, keep_best=True)
    off = build_from_options("advface", shadow=shadow_ckpt, steps=1, extractor=e)
    assert on.keep_best and on.params()["keep_best"] is True
    assert not off.keep_best and "keep_best" not in off.params()


def test_cli_protect_random_json(tmp_path, features) -> None:
    src, z = features
    dst = tmp_path / "out.safetensors"
    args = ["protect", str(src), str(dst), "--method", "dp", "--seed", "1", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_faces"] == 5 and summary["protection"]["name"] == "dp"
    # Existing output without --overwrite: exit 2 and a clear message.
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "exists" in res.output
    res = CliRunner().invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["protect", str(src), str(dst), "--method", "advface"])
    assert res.exit_code == 2 and "--shadow" in res.output


def test_specs_and_adaptive_feature_fn(shadow_ckpt) -> None:
    assert parse_spec("advface:/a/b,reading=projected,epsilon=0.1,clamp-min=0") == (
        "advface",
        {"shadow": "/a/b", "reading": "projected", "epsilon": 0.1, "clamp_min": 0},
    )
    assert parse_spec("random,steps=5") == ("random", {"steps": 5})
    for bad in ("", "advface", "random:/x", "dp,oops", "advface:"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    with pytest.raises(ValueError, match="does not exist"):
        protection_from_spec("advface:/no/such/ckpt", extractor=_extractor())
    assert feature_fn_from_spec(None) is None and feature_fn_from_spec("clean") is None
    fn = feature_fn_from_spec(f"advface:{shadow_ckpt},steps=2", extractor=_extractor())
    assert isinstance(fn.__self__, AdvFace) and fn.__self__.steps == 2
    z = torch.relu(torch.randn(2, 64, 77, 77))
    with torch.no_grad():  # how train_recon calls it
        out = fn(z)
    assert out.shape == z.shape and not torch.equal(out, z)
