"""Serving with a distilled Psi' (offline mode): its own model version per stored embedding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.models.distill import save_student
from advface.pipelines.offline import DistillSettings, distill_head
from advface.protection import build_protection
from advface.service import payload
from advface.service.app import create_app
from advface.service.backend import TOY_VERSION, _ToyPsi, load_backend, toy_backend, with_head
from advface.service.settings import ServiceSettings
from advface.service.store import Store

from .conftest import feature_map


class Shift:
    """Stand-in protection: a fixed coarse perturbation of the feature map."""

    name = "shift"

    def protect(self, z: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        u = torch.rand((*z.shape[:2], 7, 7), generator=g)
        return z + u.repeat_interleave(11, 2).repeat_interleave(11, 3)

    def params(self) -> dict:
        return {"name": self.name}


def tiny_head(folder: Path, teacher: torch.nn.Module | None = None) -> dict:
    """A student of the toy Psi, distilled for a few steps on four maps."""
    z = torch.from_numpy(np.stack([feature_map(i) for i in range(4)]))
    settings = DistillSettings(epochs=4, lr=1e-4, batch_size=2, train_from="all")
    student, rec = distill_head(
        teacher or toy_backend().psi, Shift(), features=z, settings=settings, progress=False
    )
    assert rec["loss_after"]["protected"] < rec["loss_before"]["protected"]
    return save_student(
        folder,
        student,
        teacher_fingerprint=rec["teacher_fingerprint"],
        train_from="all",
        protection=rec["protection"],
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("heads") / "toy-student"
    return folder, tiny_head(folder)["model_version"]


def test_service_records_the_distilled_version(
    tmp_path: Path, head: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    folder, version = head
    url = f"sqlite:///{tmp_path / 's.db'}"
    settings = ServiceSettings(db_url=url, backend="toy", head=str(folder), threshold=0.8)
    backend = load_backend("toy", settings.head)
    assert backend.embedding_version == version and backend.version == TOY_VERSION
    with caplog.at_level(logging.WARNING, logger="advface"):
        app = create_app(settings, protection=build_protection("none"), rebuild_in_background=False)
    assert "distilled for protection 'shift'" in caplog.text  # served with another protection
    store = Store(url)
    key = store.create_key("acme")
    tenant = store.authenticate(key)
    with TestClient(app) as c:
        assert c.get("/ready").status_code == 200
        served = app.state.service.backend
        assert served.embedding_version == version and served.version == TOY_VERSION
        h = {"X-API-Key": key}
        assert c.post("/v1/subjects", json={"subject_id": "p1"}, headers=h).status_code == 201
        r = c.post("/v1/subjects/p1/templates", content=payload.encode(feature_map(1)), headers=h)
        assert r.status_code == 201, r.text
        assert r.json()["model_version"] == TOY_VERSION  # E did not change
        probe = payload.encode(feature_map(1, noise=0.2, sample=1))
        got = c.post("/v1/subjects/p1/verify", content=probe, headers=h).json()
    assert got["match"]
    emb = store.subject_embeddings(tenant, "p1", version)
    assert emb.shape == (1, 128)
    assert store.subject_embeddings(tenant, "p1", TOY_VERSION).shape[0] == 0
    with torch.no_grad():  # the stored embedding is the student's, not the teacher's
        z = torch.from_numpy(feature_map(1))[None]
        to_student = np.abs(emb[0] - backend.embed(z)[0].numpy()).max()
        to_teacher = np.abs(emb[0] - toy_backend().embed(z)[0].numpy()).max()
    # (the stored map is the encoded blob, so even the student's embedding differs slightly)
    assert to_student < 1e-3 and to_teacher > 10 * to_student
    store.close()


def test_reembed_migrates_to_the_distilled_head(tmp_path: Path, head: tuple[Path, str]) -> None:
    folder, version = head
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    key = store.create_key("acme")
    tenant = store.authenticate(key)
    for i in range(3):
        store.create_subject(tenant, f"p{i}")
        store.add_template(
            tenant,
            f"p{i}",
            payload.encode(feature_map(i)),
            protection="none",
            protection_params={},
            model_version=TOY_VERSION,
            request_sha256=f"{i:064d}",
            embedding=(
                TOY_VERSION,
                toy_backend().embed(torch.from_numpy(feature_map(i))[None])[0].numpy(),
            ),
        )
    assert store.count_missing_embeddings(version, TOY_VERSION) == 3
    store.close()
    args = ["reembed", "--db-url", url, "--backend", "toy", "--head", str(folder)]
    r = CliRunner().invoke(cli_app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["version"] == version and out["embedded"] == 3 and out["missing"] == 0
    store = Store(url)
    assert store.count_missing_embeddings(version, TOY_VERSION) == 0
    store.close()
    r = CliRunner().invoke(cli_app, [*args, "--drop-other-versions"])
    assert json.loads(r.stdout)["dropped_other_versions"] == 3


def test_head_setting_and_checks(tmp_path: Path, head: tuple[Path, str]) -> None:
    folder, version = head
    env = {"ADVFACE_BACKEND": "toy", "ADVFACE_HEAD": str(folder)}
    s = ServiceSettings.from_env(env, db_url="sqlite://")
    assert s.head == str(folder)
    assert load_backend(s.backend, s.head).embedding_version == version
    with pytest.raises(ValueError, match="not a folder"):
        ServiceSettings(db_url="sqlite://", backend="toy", head=str(tmp_path / "nope"))
    torch.manual_seed(1)  # a head distilled from another Psi does not load on this one
    other = tiny_head(tmp_path / "other", _ToyPsi().eval())
    assert other["model_version"] != version
    with pytest.raises(ValueError, match="another Psi"):
        with_head(toy_backend(), tmp_path / "other")
