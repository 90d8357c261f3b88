"""The service stores embedding-shadow templates built from its own E and Psi."""

import numpy as np
import torch
from fastapi.testclient import TestClient

from advface.models.recon import build_recon, save_checkpoint
from advface.service import payload
from advface.service.app import create_app, protection_for
from advface.service.settings import ServiceSettings
from advface.service.store import Store

from .conftest import feature_map


def test_embedding_shadow_templates_match_and_are_not_the_upload(tmp_path, toy):
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "gen",
        build_recon("embdec", width=2, dim=128),
        "embdec",
        {"width": 2, "dim": 128},
    )
    shadow = torch.nn.Sequential(  # (N,64,77,77) -> (N,3,160,160)
        torch.nn.ConvTranspose2d(64, 3, kernel_size=8, stride=2), torch.nn.Sigmoid()
    )
    settings = ServiceSettings(
        db_url=f"sqlite:///{tmp_path / 'es.db'}",
        backend="toy",
        threshold=0.5,
        protection="embedding-shadow",
        protection_params={"generator": str(tmp_path / "gen"), "shadow": shadow, "steps": 5},
    )
    prot = protection_for(settings, toy)
    assert prot.name == "embedding-shadow" and prot.head is not toy.psi  # a private copy
    store = Store(settings.db_url)
    key = store.create_key("acme")
    app = create_app(
        settings, store=store, backend=toy, protection=prot, rebuild_in_background=False
    )
    with TestClient(app) as c:
        h = {"X-API-Key": key}
        assert c.post("/v1/subjects", json={"subject_id": "a"}, headers=h).status_code == 201
        z = feature_map(5, noise=0.05)
        r = c.post("/v1/subjects/a/templates", content=payload.encode(z), headers=h)
        assert r.status_code == 201, r.text
        stored = payload.decode(store.get_template(1, r.json()["template_id"]).blob)
        assert stored.shape == z.shape and not np.allclose(stored, z, atol=0.05)
        same = c.post(
            "/v1/subjects/a/verify",
            content=payload.encode(feature_map(5, noise=0.05, sample=1)),
            headers=h,
        ).json()
        other = c.post(
            "/v1/subjects/a/verify", content=payload.encode(feature_map(9)), headers=h
        ).json()
        assert same["score"] > other["score"]
    store.close()
