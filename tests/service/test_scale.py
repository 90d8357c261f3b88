"""Stored embeddings (migration, resumable backfill, reembed); several workers, one database."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.protection import build_protection
from advface.service import payload
from advface.service.app import create_app
from advface.service.backend import Backend, _ToyPsi, toy_backend
from advface.service.core import embed_missing
from advface.service.process import ServerProcess
from advface.service.settings import ServiceSettings
from advface.service.store import Store

from .conftest import cli_key, feature_map


class CountingPsi(torch.nn.Module):
    """Wraps Psi and counts the feature maps it embeds."""

    def __init__(self, psi: Any) -> None:
        super().__init__()
        self.psi, self.maps = psi, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.maps += z.shape[0]
        return self.psi(z)


def counting(base: Backend, psi: Any = None, psi_version: str = "") -> Backend:
    return Backend(
        extractor=base.extractor,
        psi=CountingPsi(psi or base.psi),
        version=base.version,
        psi_version=psi_version,
    )


def legacy_templates(url: str, n: int, tenant: str = "acme") -> tuple[str, int]:
    """Templates as an earlier version stored them: protected maps, no embeddings."""
    store = Store(url)
    key = store.create_key(tenant)
    tenant_id = store.authenticate(key)
    assert tenant_id is not None
    for i in range(n):
        store.create_subject(tenant_id, f"p{i}")
        store.add_template(
            tenant_id,
            f"p{i}",
            payload.encode(feature_map(i)),
            protection="none",
            protection_params={},
            model_version=toy_backend().version,
            request_sha256=f"{i:064d}",
        )
    store.close()
    return key, tenant_id


def start(url: str, backend: Backend, **settings: Any) -> tuple[TestClient, Any]:
    s = ServiceSettings(db_url=url, backend="toy", threshold=0.8, **settings)
    app = create_app(
        s, backend=backend, protection=build_protection("none"), rebuild_in_background=False
    )
    client = TestClient(app)
    client.__enter__()
    return client, app.state.service


def identify(c: TestClient, key: str, identity: int, k: int = 1) -> list[dict[str, Any]]:
    r = c.post(
        f"/v1/identify?top_k={k}",
        content=payload.encode(feature_map(identity, noise=0.2, sample=5)),
        headers={"X-API-Key": key},
    )
    assert r.status_code == 200, r.text
    return r.json()["candidates"]


def test_migration_embeds_once_and_startup_loads_without_psi(db_url: str) -> None:
    key, _ = legacy_templates(db_url, 5)
    first = counting(toy_backend())
    c, svc = start(db_url, first, rebuild_batch=2)
    try:
        assert c.get("/ready").status_code == 200
        assert svc.index.count() == 5 and svc.backfilled_templates == 5
        assert first.psi.maps == 5 + 1  # each stored map once, plus one probe for the dimension
        assert identify(c, key, 3)[0]["subject_id"] == "p3"
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
    again = counting(toy_backend())
    c, svc = start(db_url, again)
    try:
        assert c.get("/ready").status_code == 200
        assert svc.index.count() == 5 and svc.backfilled_templates == 0
        assert again.psi.maps == 1  # start-up read the stored embeddings, ran no Psi on them
        assert identify(c, key, 3)[0]["subject_id"] == "p3"
    finally:
        c.__exit__(None, None, None)
        svc.store.close()


def test_backfill_is_resumable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    legacy_templates(url, 7)
    store, net = Store(url), counting(toy_backend())
    calls = []

    def crash_after_two(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between batches

    with pytest.raises(KeyboardInterrupt):
        embed_missing(store, net, batch=2, on_batch=crash_after_two)
    assert store.count_missing_embeddings(net.embedding_version, net.version) == 3
    done, corrupt = embed_missing(store, net, batch=2)
    assert (done, corrupt) == (3, 0) and net.psi.maps == 7  # no map embedded twice
    assert store.count_missing_embeddings(net.embedding_version, net.version) == 0
    store.close()


def test_reembed_while_serving_then_switch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    key, tenant = legacy_templates(url, 4)
    old = toy_backend()
    c, svc = start(url, old)
    try:
        before = identify(c, key, 2, k=4)
        # Psi changes (new weights, same E): the new version's embeddings are computed while
        # the service keeps answering with its own.
        torch.manual_seed(7)
        new = counting(old, psi=_ToyPsi().eval(), psi_version="toy-psi-v2")
        store = Store(url)
        assert embed_missing(store, new, batch=3) == (4, 0)
        assert identify(c, key, 2, k=4) == before
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
    c, svc = start(url, new)
    try:
        assert c.get("/ready").status_code == 200 and svc.backfilled_templates == 0
        after = identify(c, key, 2, k=4)
        assert after[0]["subject_id"] == "p2"
        assert [x["score"] for x in after] != [x["score"] for x in before]  # new Psi's scores
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
    assert store.drop_other_embeddings("toy-psi-v2") == 4
    assert store.count_missing_embeddings("toy-psi-v2", old.version) == 0
    store.close()


def test_reembed_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    legacy_templates(url, 3)
    store = Store(url)
    store.add_template(  # a map from another extractor: not embedded, reported
        1,
        "p0",
        payload.encode(feature_map(9)),
        protection="none",
        protection_params={},
        model_version="another-E",
        request_sha256="f" * 64,
    )
    store.close()
    run = CliRunner().invoke
    r = run(cli_app, ["reembed", "--db-url", url, "--backend", "toy", "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert "reembed toy-v1" in r.stderr  # the progress bar
    out = json.loads(r.stdout)
    assert out["embedded"] == 3 and out["missing"] == 0 and out["skipped_other_models"] == 1
    r = run(cli_app, ["reembed", "--db-url", url, "--backend", "toy"])  # nothing left to do
    assert json.loads(r.stdout)["embedded"] == 0
    r = run(cli_app, ["reembed", "--db-url", url, "--backend", "nope"])
    assert r.exit_code == 2 and "backend" in r.output


def test_enroll_in_one_worker_identify_in_another(db_url: str) -> None:
    """Two app instances (workers) on one database: each sees the other's writes."""
    store = Store(db_url)
    key = store.create_key("acme")
    other = store.create_key("globex")
    store.close()
    a, svc_a = start(db_url, toy_backend())
    b, svc_b = start(db_url, toy_backend())
    h = {"X-API-Key": key}
    try:
        assert b.post("/v1/subjects", json={"subject_id": "ann"}, headers=h).status_code == 201
        for i in range(3):
            r = a.post(
                "/v1/subjects/ann/templates",
                content=payload.encode(feature_map(1, noise=0.2, sample=i)),
                headers=h,
            )
            assert r.status_code == 201, r.text
        hits = identify(b, key, 1)
        assert hits and hits[0]["subject_id"] == "ann" and hits[0]["match"]
        assert identify(b, other, 1) == []  # another tenant sees nothing of it
        v = b.post(
            "/v1/subjects/ann/verify", content=payload.encode(feature_map(1, 0.2, 9)), headers=h
        ).json()
        assert v["match"] and v["templates"] == 3
        assert a.delete("/v1/subjects/ann", headers=h).status_code == 200
        assert identify(b, key, 1) == []  # the deletion reached the other worker too
        assert svc_b.index.count() == 0
    finally:
        for c, svc in ((a, svc_a), (b, svc_b)):
            c.__exit__(None, None, None)
            svc.store.close()


def test_change_log_pruned_past_a_worker_reloads(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    key, _ = legacy_templates(url, 3)
    a, svc_a = start(url, toy_backend())
    b, svc_b = start(url, toy_backend())
    try:
        assert svc_b.sync is not None
        svc_b.sync.keep = 1
        for i in range(3, 9):
            a.post("/v1/subjects", json={"subject_id": f"p{i}"}, headers={"X-API-Key": key})
            r = a.post(
                f"/v1/subjects/p{i}/templates",
                content=payload.encode(feature_map(i)),
                headers={"X-API-Key": key},
            )
            assert r.status_code == 201
        svc_a.store.prune_changes(1)  # b never read the pruned entries
        assert identify(b, key, 7)[0]["subject_id"] == "p7"
        assert svc_b.index.count() == 9
    finally:
        for c, svc in ((a, svc_a), (b, svc_b)):
            c.__exit__(None, None, None)
            svc.store.close()


def test_serve_with_two_workers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    key = cli_key(url)
    log = tmp_path / "server.log"
    with ServerProcess(
        db_url=url,
        backend="toy",
        threshold=0.8,
        log_path=log,
        log_level="info",
        ready_timeout=180,
        extra_args=["--workers", "2", "--rate-limit", "0", "--metrics"],
    ) as srv:
        h = {"X-API-Key": key}
        for i in range(4):
            assert httpx.post(f"{srv.url}/v1/subjects", json={"subject_id": f"w{i}"}, headers=h)
            r = httpx.post(
                f"{srv.url}/v1/subjects/w{i}/templates",
                content=payload.encode(feature_map(i)),
                headers=h,
                timeout=30,
            )
            assert r.status_code == 201, r.text
        # Each request lands on either worker; every one must see every enrollment.
        for _ in range(12):
            r = httpx.post(
                f"{srv.url}/v1/identify?top_k=4",
                content=payload.encode(feature_map(2, noise=0.2)),
                headers=h,
                timeout=30,
            )
            assert r.status_code == 200 and len(r.json()["candidates"]) == 4, r.text
            assert r.json()["candidates"][0]["subject_id"] == "w2"
        # Whichever worker answers the scrape, it sums both workers' counts.
        for _ in range(4):
            text = httpx.get(f"{srv.url}/metrics").text
            counts = {
                (s.labels["route"], s.labels["status"]): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "advface_http_requests_total" and s.labels["method"] == "POST"
            }
            assert counts[("/v1/identify", "200")] == 12, counts
            assert counts[("/v1/subjects/{subject_id}/templates", "201")] == 4, counts
    assert "workers=2" in log.read_text()


def test_workers_refuse_in_memory_sqlite() -> None:
    r = CliRunner().invoke(
        cli_app, ["serve", "--db-url", "sqlite://", "--workers", "2", "--backend", "toy"]
    )
    assert r.exit_code == 2 and "in-memory SQLite" in r.output


def test_index_snapshot_restores_and_replays_the_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    key, _ = legacy_templates(url, 4)
    snap = tmp_path / "s.db.index"
    c, svc = start(url, toy_backend())
    try:
        assert c.get("/ready").status_code == 200 and svc.sync.loaded_from == "database"
        assert (snap / "meta.json").exists()  # written after the rebuild
        assert oct(snap.stat().st_mode & 0o777) == "0o700"
        before = identify(c, key, 1, k=4)
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
    # While no service runs: a new template, and a deleted one - only the log knows.
    store = Store(url)
    tenant = store.authenticate(key)
    assert tenant is not None
    store.create_subject(tenant, "late")
    store.add_template(
        tenant,
        "late",
        payload.encode(feature_map(40)),
        protection="none",
        protection_params={},
        model_version=toy_backend().version,
        request_sha256="e" * 64,
        embedding=(
            toy_backend().embedding_version,
            toy_backend().embed(torch.from_numpy(feature_map(40))[None])[0].numpy(),
        ),
    )
    store.delete_subject(tenant, "p0")
    store.close()
    c, svc = start(url, toy_backend())
    try:
        assert c.get("/ready").status_code == 200
        assert svc.sync.loaded_from == "snapshot" and svc.index.count() == 4
        assert identify(c, key, 40)[0]["subject_id"] == "late"
        assert all(x["subject_id"] != "p0" for x in identify(c, key, 0, k=10))
        assert identify(c, key, 1, k=4)[0] == before[0]
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
    # A snapshot of another database (or a corrupt one) is never used.
    (snap / "meta.json").write_text("{not json")
    c, svc = start(url, toy_backend())
    try:
        assert c.get("/ready").status_code == 200 and svc.sync.loaded_from == "database"
        assert identify(c, key, 40)[0]["subject_id"] == "late"
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
    other = tmp_path / "other.db"
    legacy_templates(f"sqlite:///{other}", 2)
    shutil.copytree(snap, tmp_path / "other.db.index")
    c, svc = start(f"sqlite:///{other}", toy_backend())
    try:
        assert c.get("/ready").status_code == 200
        assert svc.sync.loaded_from == "database" and svc.index.count() == 2
    finally:
        c.__exit__(None, None, None)
        svc.store.close()
