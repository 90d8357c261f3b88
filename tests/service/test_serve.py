"""``advface serve`` as a real uvicorn process on loopback, the CLI and the SDK (toy networks)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.service.process import ServerProcess
from advface.service.sdk import (
    AdvFaceClient,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)

from .conftest import feature_map


def _key(db_url: str, tenant: str = "acme") -> str:
    r = CliRunner().invoke(cli_app, ["keys", "create", tenant, "--db-url", db_url])
    assert r.exit_code == 0, r.output
    key = r.output.strip().splitlines()[-1]
    assert key.startswith("afk_")
    return key


def test_serve_sdk_restart_persistence(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'svc.db'}"
    key = _key(db_url)
    log = tmp_path / "server.log"
    srv_args = dict(db_url=db_url, backend="toy", threshold=0.8, log_path=log, ready_timeout=120)
    with ServerProcess(**srv_args) as srv, AdvFaceClient(srv.url, key, retries=0) as c:
        assert c.health() == {"status": "ok"}
        for i in range(3):
            c.create_subject(f"id{i}")
            t = c.enroll(f"id{i}", feature_map(i, noise=0.2), idempotency_key=f"k{i}")
            assert not t.replayed
        # Retrying with the same key returns the stored template instead of a second one.
        assert c.enroll("id0", feature_map(0, noise=0.2), idempotency_key="k0").replayed
        assert [s.templates for s in c.list_subjects(page_size=2)] == [1, 1, 1]
        g = c.verify("id1", feature_map(1, noise=0.2, sample=3))
        i = c.verify("id1", feature_map(2, noise=0.2, sample=3))
        assert g.match and not i.match
        assert c.identify(feature_map(2, noise=0.2, sample=4), top_k=1)[0].subject_id == "id2"
        with pytest.raises(ConflictError):
            c.create_subject("id0")
        with pytest.raises(NotFoundError):
            c.verify("ghost", feature_map(0))
        with pytest.raises(ValueError):
            c.enroll("id0", np.zeros((3, 3), np.float32))
    with ServerProcess(**srv_args) as srv, AdvFaceClient(srv.url, key, retries=0) as c:
        stats = httpx.get(f"{srv.url}/v1/stats", headers={"X-API-Key": key}).json()
        assert stats["templates"] == 3
        _cli_client_roundtrip(srv.url, key, tmp_path)
        g2 = c.verify("id1", feature_map(1, noise=0.2, sample=3))
        assert g2.score == pytest.approx(g.score, abs=1e-6) and g2.match
        assert c.delete_subject("id1") == 1
        with pytest.raises(NotFoundError):
            c.verify("id1", feature_map(1))
        assert [s.subject_id for s in c.list_subjects()] == ["id0", "id2", "img"]
    with (
        AdvFaceClient(srv.url, key, retries=1, backoff=0.01) as c,
        pytest.raises(ServiceUnavailableError),
    ):
        c.health()  # the server is gone


def _cli_client_roundtrip(url: str, key: str, tmp_path: Path) -> None:
    """``advface client ...`` against the live server: aligned 160x160 image files, toy E."""
    import cv2

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"face{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 255, (160, 160, 3), dtype=np.uint8))
        paths.append(str(p))
    common = ["--url", url, "--api-key", key, "--backend", "toy", "--aligned"]
    run = CliRunner().invoke
    r = run(cli_app, ["client", "enroll", "img", paths[0], *common])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["subject_id"] == "img"
    r = run(cli_app, ["client", "verify", "img", paths[0], *common])
    assert r.exit_code == 0 and json.loads(r.output)["match"], r.output
    r = run(cli_app, ["client", "identify", paths[0], "--top-k", "1", *common])
    assert r.exit_code == 0 and json.loads(r.output)[0]["subject_id"] == "img", r.output
    r = run(cli_app, ["client", "verify", "nobody", paths[1], *common])
    assert r.exit_code == 1 and "unknown_subject" in r.output
    r = run(cli_app, ["client", "verify", "img", str(tmp_path / "missing.png"), *common])
    assert r.exit_code == 2
    r = run(cli_app, ["client", "subjects", "--url", url, "--api-key", key])
    assert r.exit_code == 0 and "img" in r.output


def test_sdk_errors_in_process(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from advface.service.app import create_app
    from advface.service.settings import ServiceSettings

    db_url = f"sqlite:///{tmp_path / 'svc.db'}"
    key = _key(db_url)
    app = create_app(ServiceSettings(db_url=db_url, backend="toy"), rebuild_in_background=False)
    with TestClient(app) as tc:
        c = AdvFaceClient("http://testserver", key, transport=tc._transport, retries=0)
        bad = AdvFaceClient("http://testserver", "afk_wrong", transport=tc._transport)
        with pytest.raises(AuthenticationError):
            bad.create_subject("x")
        c.create_subject("x")
        assert c.create_subject("x", exist_ok=True).subject_id == "x"
        with pytest.raises(InvalidRequestError):
            c.create_subject("bad/id")
        z = feature_map(5)
        t = c.enroll("x", z, idempotency_key="same")
        with pytest.raises(ConflictError) as e:
            c.enroll("x", feature_map(6), idempotency_key="same")
        assert e.value.code == "idempotency_conflict"
        assert c.get_template(t.template_id).subject_id == "x"
        c.delete_template(t.template_id)
        with pytest.raises(NotFoundError):
            c.delete_template(t.template_id)


def test_serve_rejects_bad_config(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli_app,
        ["serve", "--db-url", f"sqlite:///{tmp_path}/x.db", "--threshold", "7", "--backend", "toy"],
    )
    assert r.exit_code != 0
    r = CliRunner().invoke(
        cli_app,
        ["serve", "--protection-params", "{not json", "--backend", "toy"],
    )
    assert r.exit_code != 0
    r = CliRunner().invoke(
        cli_app, ["keys", "create", "", "--db-url", f"sqlite:///{tmp_path}/k.db"]
    )
    assert r.exit_code != 0


def test_settings_from_env() -> None:
    from advface.service.settings import ServiceSettings

    s = ServiceSettings.from_env(
        {
            "ADVFACE_DB_URL": "sqlite:///x.db",
            "ADVFACE_THRESHOLD": "0.3",
            "ADVFACE_PROTECTION": "dp",
            "ADVFACE_PROTECTION_PARAMS": '{"epsilon_dp": 2.0}',
            "ADVFACE_MAX_BODY_BYTES": "2048",
        },
        threshold=0.5,
    )
    assert s.db_url == "sqlite:///x.db" and s.threshold == 0.5 and s.protection == "dp"
    assert s.protection_params == {"epsilon_dp": 2.0} and s.max_body_bytes == 2048
    with pytest.raises(ValueError, match="ADVFACE_THRESHOLD"):
        ServiceSettings.from_env({"ADVFACE_THRESHOLD": "high"})
    with pytest.raises(ValueError):
        ServiceSettings.from_env({"ADVFACE_PROTECTION_PARAMS": "[1]"})
    # NaN would pass every range check (rate limiting silently off); Inf most of them.
    for name, value in [("RATE_LIMIT", "nan"), ("DB_TIMEOUT", "inf"), ("MAX_FEATURE_ABS", "inf")]:
        with pytest.raises(ValueError, match="finite"):
            ServiceSettings.from_env({"ADVFACE_DB_URL": "sqlite:///x.db", f"ADVFACE_{name}": value})
