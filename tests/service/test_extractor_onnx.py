"""E exported to ONNX and run by OpenCV: the same feature maps as torch's E, a client that
imports no torch, a whole-or-absent export, and a damaged export refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.service import payload
from advface.service.backend import Backend
from advface.service.extractor_onnx import ONNX_FILE, OnnxExtractor, export_extractor

from .conftest import Harness, feature_map, sdk_client

FACES = np.random.default_rng(0).integers(0, 256, (3, 160, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def facenet_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Backend]:
    from advface.service.backend import facenet_backend

    net = facenet_backend()
    out = tmp_path_factory.mktemp("export") / "e"
    export_extractor(net.extractor, out, model_version=net.version)
    return out, net


def test_onnx_e_matches_torch_e(facenet_export: tuple[Path, Backend]) -> None:
    from advface.models.facenet import preprocess

    out, net = facenet_export
    e = OnnxExtractor(out)
    with torch.no_grad():
        want = net.extractor(preprocess(FACES)).numpy()
    got = e(FACES)
    assert got.shape == (3, 64, 77, 77) and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))
    assert e.model_version == net.version
    assert (out / ONNX_FILE).stat().st_size < 300_000  # three convolutions


def test_a_client_without_torch(facenet_export: tuple[Path, Backend], tmp_path: Path) -> None:
    """The SDK, MTCNN's aligner and the ONNX E import and run with torch unimportable."""
    out, net = facenet_export
    np.save(tmp_path / "faces.npy", FACES[:1])
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch on this device")
sys.meta_path.insert(0, NoTorch())
import numpy as np
from advface.data.align import Aligner
from advface.service.extractor_onnx import OnnxExtractor
from advface.service.sdk import AdvFaceClient
c = AdvFaceClient("http://127.0.0.1:9", "afk_x", extractor=OnnxExtractor({str(out)!r}))
z = c.features(np.load({str(tmp_path / "faces.npy")!r})[0], aligned=True)
np.save({str(tmp_path / "z.npy")!r}, z)
try:  # the default E needs torch: a clear error naming the way out
    AdvFaceClient("http://127.0.0.1:9", "afk_x").features(np.zeros((160, 160, 3), np.uint8),
                                                           aligned=True)
except ValueError as exc:
    assert "advface export-extractor" in str(exc), exc
else:
    raise SystemExit("the default E ran without torch?")
print("torch" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    from advface.models.facenet import preprocess

    with torch.no_grad():
        want = net.extractor(preprocess(FACES[:1]))[0].numpy()
    assert np.abs(np.load(tmp_path / "z.npy") - want).max() < 1e-3


def test_cli_export_and_enroll_with_the_onnx_e(
    harness: Harness, toy: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exported from the toy backend, the ONNX E gives the maps the toy E gives, so a client
    using it enrolls and verifies like one using torch."""
    from advface.cli import client as cli_client

    out = tmp_path / "toy-e"
    run = CliRunner().invoke
    r = run(cli_app, ["export-extractor", "--out", str(out), "--backend", "toy"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model_version"] == toy.version
    r = run(cli_app, ["export-extractor", "--out", str(out), "--backend", "toy"])
    assert r.exit_code == 2 and "exists" in r.output  # no silent replacement
    made = []

    def client(url: str, key: str, backend: str = "facenet", extractor_dir=None):
        c = sdk_client(harness)
        c._extractor = OnnxExtractor(extractor_dir)
        made.append(c._extractor)
        return c

    monkeypatch.setattr(cli_client, "_client", client)
    import cv2

    face = tmp_path / "face.png"
    cv2.imwrite(str(face), cv2.cvtColor(FACES[0], cv2.COLOR_RGB2BGR))
    harness.subject("ann")
    z_torch = sdk_client(harness, toy).features(FACES[0], aligned=True)
    z_onnx = OnnxExtractor(out)(FACES[:1])[0]
    assert np.abs(z_onnx - z_torch).max() < 1e-4
    r = run(cli_app, ["client", "enroll", "ann", str(face), "--aligned", "--api-key", "k",
                      "--extractor", str(out)])  # fmt: skip
    assert r.exit_code == 0 and made, r.output
    assert harness.state() == (1, 1)
    r = run(cli_app, ["client", "verify", "ann", str(face), "--aligned", "--api-key", "k",
                      "--extractor", str(out)])  # fmt: skip
    assert r.exit_code == 0 and json.loads(r.output)["match"], r.output  # the same face


def test_a_damaged_or_missing_export_is_refused(
    facenet_export: tuple[Path, Backend], tmp_path: Path
) -> None:
    copy = tmp_path / "e"
    shutil.copytree(facenet_export[0], copy)
    with (copy / ONNX_FILE).open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="does not match the sha256"):
        OnnxExtractor(copy)
    with pytest.raises(FileNotFoundError, match="advface export-extractor"):
        OnnxExtractor(tmp_path / "nothing")
    r = CliRunner().invoke(cli_app, ["client", "verify", "ann", "x.jpg", "--api-key", "k",
                                     "--extractor", str(tmp_path / "nothing")])  # fmt: skip
    assert r.exit_code == 2 and "not an exported extractor" in r.output, r.output


def test_overwrite_replaces_only_an_earlier_export(tmp_path: Path, toy: Backend) -> None:
    out = tmp_path / "e"
    export_extractor(toy.extractor, out, model_version=toy.version)
    first = (out / "config.json").read_text()
    export_extractor(toy.extractor, out, model_version="toy-v2", overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_version"] == "toy-v2" != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no old copy left behind
    victim = tmp_path / "notes"
    (victim / "sub").mkdir(parents=True)
    (victim / "todo.txt").write_text("keep me")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too")
    for target in (victim, a_file):
        with pytest.raises(ValueError, match="not a folder written by advface export-extractor"):
            export_extractor(toy.extractor, target, model_version="x", overwrite=True)
    assert (victim / "todo.txt").read_text() == "keep me" and (victim / "sub").is_dir()
    assert a_file.read_text() == "keep me too"
    bad = tmp_path / "no-version"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["model_version"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no model_version"):
        OnnxExtractor(bad)


def test_a_map_of_another_e_is_refused(harness: Harness, toy: Backend, tmp_path: Path) -> None:
    """The client names its E (X-Advface-Model); the service refuses maps of another E and
    stores nothing, and accepts its own."""
    from advface.service.sdk import InvalidRequestError

    harness.subject("ann")
    before = harness.state()
    for version, accepted in (("facenet-other/conv2d_2b", False), (toy.version, True)):
        out = tmp_path / version.replace("/", "_")
        export_extractor(toy.extractor, out, model_version=version)
        c = sdk_client(harness)
        c._extractor = OnnxExtractor(out)
        assert c.model_version == version
        if accepted:
            assert c.enroll("ann", FACES[0], aligned=True).model_version == toy.version
        else:
            with pytest.raises(InvalidRequestError) as e:
                c.enroll("ann", FACES[0], aligned=True)
            assert e.value.code == "model_mismatch" and harness.state() == before
    assert harness.state() == (before[0] + 1, before[1] + 1)
    r = harness.client.post(  # no header: accepted as before (clients that do not say)
        "/v1/subjects/ann/verify", content=payload.encode(feature_map(1)), headers=harness.h()
    )
    assert r.status_code == 200
