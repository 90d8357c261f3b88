"""``advface migrate`` (re-protect stored templates, resumable) and the template statistics."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.protection import build_protection
from advface.service import payload
from advface.service.backend import Backend
from advface.service.core import reprotect
from advface.service.store import Store

from .conftest import MASTER, feature_map, make_harness


class Interrupted(Exception):
    pass


def _stop(_: int) -> None:
    raise Interrupted


def test_migrate_reprotects_stored_maps_resumably(tmp_path: Path, toy: Backend) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    h, cm = make_harness(url, toy)
    try:
        for i in range(3):
            h.subject(f"m{i}")
            assert h.enroll(f"m{i}", feature_map(i)).status_code == 201
        h.subject("o", key=h.other_key)
        assert h.enroll("o", feature_map(9), key=h.other_key).status_code == 201
        stats = h.client.get("/v1/stats", headers=h.h()).json()
        assert stats["templates"] == 3
        assert [(p["protection"], p["templates"]) for p in stats["by_protection"]] == [("none", 3)]
        tenant = h.store.authenticate(h.key)
        assert tenant is not None
        before = {
            r.template_id: payload.decode(r.blob)
            for r in h.store.iter_templates()
            if r.tenant_id == tenant
        }
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
    target = build_protection("random", steps=2, seed=3)
    store = Store(url, keys=MASTER)
    with pytest.raises(Interrupted):  # killed after the first committed batch
        reprotect(store, toy, target, batch=1, on_batch=_stop)
    assert store.count_to_reprotect("random", target.params(), toy.version) == 3
    store.close()

    key_file = tmp_path / "master.key"
    key_file.write_text(base64.b64encode(bytes(range(32))).decode())
    args = ["migrate", "--protection", "random", "--db-url", url, "--backend", "toy"]
    args += ["--protection-params", '{"steps": 2, "seed": 3}', "--master-key-file", str(key_file)]
    run = CliRunner().invoke
    r = run(cli_app, [*args, "--batch", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["migrated"], out["left"], out["corrupt"]) == (3, 0, 0)
    assert out["protection"] == target.params()
    r = run(cli_app, args)  # nothing left: a no-op
    assert json.loads(r.stdout.strip().splitlines()[-1])["migrated"] == 0

    h, cm = make_harness(url, toy, protection="random", protection_params={"steps": 2, "seed": 3})
    try:
        stats = h.client.get("/v1/stats", headers=h.h()).json()
        assert stats["templates"] == 3 and stats["by_model_version"] == {toy.version: 3}
        assert stats["by_protection"] == [
            {"protection": "random", "protection_params": target.params(), "templates": 3}
        ]
        every = h.store.template_stats()  # all tenants (operators; /ready shows no counts)
        assert {p["protection"] for p in every["by_protection"]} == {"random"}
        assert sum(p["templates"] for p in every["by_protection"]) == 4
        assert every["by_model_version"] == {toy.version: 4}
        for row in h.store.iter_templates():
            if row.template_id not in before:
                continue
            new = payload.decode(row.blob)
            # The new protection was applied on top of the stored map ...
            assert np.abs(new - before[row.template_id]).max() > 0.05
            # ... and the stored embedding is Psi of the new map (what verify scores against).
            emb = h.store.subject_embeddings(tenant, row.subject_id, toy.embedding_version)
            want = toy.embed(torch.from_numpy(new)[None]).numpy()
            assert np.allclose(emb, want, atol=1e-5)
        probe = feature_map(1, noise=0.05)
        emb = h.store.subject_embeddings(tenant, "m1", toy.embedding_version)
        want = float((emb @ toy.embed(torch.from_numpy(probe)[None])[0].numpy()).max())
        assert h.verify("m1", probe).json()["score"] == pytest.approx(want, abs=1e-4)
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_migrate_rejects_bad_input_and_changes_nothing(tmp_path: Path, toy: Backend) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    h, cm = make_harness(url, toy, keys=None)
    try:
        h.subject("b")
        assert h.enroll("b", feature_map(2)).status_code == 201
        before = h.client.get("/v1/stats", headers=h.h()).json()
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
    base = ["migrate", "--db-url", url, "--backend", "toy"]
    for extra, msg in (
        (["--protection", "nope"], "nope"),
        (["--protection", "random", "--protection-params", "[1]"], "JSON object"),
        (["--protection", "random", "--protection-params", "{"], "not JSON"),
        (["--protection", "random", "--protection-params", '{"bogus": 1}'], "bogus"),
    ):
        r = CliRunner().invoke(cli_app, [*base, *extra])
        assert r.exit_code == 2 and msg in r.output, r.output
    store = Store(url)
    assert store.template_stats(store.authenticate(h.key)) == before
    store.close()
