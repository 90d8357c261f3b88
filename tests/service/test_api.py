"""HTTP API of the template service on SQLite and PostgreSQL, with tiny stand-in networks."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from sqlalchemy import inspect, text

from advface.service import payload
from advface.service.backend import Backend
from advface.service.store import Store

from .conftest import MASTER, Harness, feature_map, make_harness


def _err(r, status: int, code: str) -> None:  # noqa: ANN001
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["status"] == status and body["error"]["message"]


def test_health_ready_openapi(harness: Harness) -> None:
    c = harness.client
    assert c.get("/health").json() == {"status": "ok"}
    # Unauthenticated: ready or not, no counts or versions of any tenant.
    assert c.get("/ready").json() == {"status": "ready"}
    spec = c.get("/openapi.json").json()
    for path in ("/v1/subjects", "/v1/subjects/{subject_id}/templates", "/v1/identify"):
        assert path in spec["paths"]
    assert "APIKeyHeader" in json.dumps(spec["components"])


def test_auth_missing_bad_revoked(harness: Harness) -> None:
    c = harness.client
    _err(c.get("/v1/subjects"), 401, "missing_api_key")
    _err(c.get("/v1/subjects", headers={"X-API-Key": "nope"}), 401, "invalid_api_key")
    # Well-formed id of a real key with a wrong secret.
    forged = harness.key[:17] + ("A" if harness.key[17] != "A" else "B") + harness.key[18:]
    _err(c.get("/v1/subjects", headers={"X-API-Key": forged}), 401, "invalid_api_key")
    key_id = harness.key.split("_")[1]
    assert harness.store.revoke_key(key_id)
    _err(c.get("/v1/subjects", headers=harness.h()), 401, "invalid_api_key")


def test_keys_are_stored_hashed(harness: Harness) -> None:
    with harness.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT key_id, digest FROM api_keys")).all()
    assert len(rows) == 2
    for key_id, digest in rows:
        assert len(digest) == 64 and key_id not in digest
        assert harness.key not in digest and harness.other_key not in digest


def test_subject_crud_and_paging(harness: Harness) -> None:
    c = harness.client
    ids = [f"s{i:02d}" for i in range(7)]
    for sid in reversed(ids):
        harness.subject(sid)
    _err(
        c.post("/v1/subjects", json={"subject_id": "s00"}, headers=harness.h()),
        409,
        "subject_exists",
    )
    _err(
        c.post("/v1/subjects", json={"subject_id": "a/b"}, headers=harness.h()),
        422,
        "validation_error",
    )
    _err(c.post("/v1/subjects", json={}, headers=harness.h()), 422, "validation_error")
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = c.get("/v1/subjects", params=params, headers=harness.h()).json()
        seen += [s["subject_id"] for s in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3
    _err(c.get("/v1/subjects", params={"limit": 0}, headers=harness.h()), 422, "validation_error")
    r = c.delete("/v1/subjects/s03", headers=harness.h())
    assert r.json() == {"subject_id": "s03", "deleted_templates": 0}
    _err(c.delete("/v1/subjects/s03", headers=harness.h()), 404, "unknown_subject")


def test_enroll_verify_identify_delete(harness: Harness) -> None:
    c = harness.client
    for i in range(4):
        harness.subject(f"p{i}")
        r = harness.enroll(f"p{i}", feature_map(i, noise=0.2))
        assert r.status_code == 201, r.text
        t = r.json()
        assert t["protection"] == "none" and t["model_version"] == "toy-v1" and not t["replayed"]
    assert harness.state() == (4, 4)
    genuine = harness.verify("p1", feature_map(1, noise=0.2, sample=1)).json()
    impostor = harness.verify("p1", feature_map(2, noise=0.2, sample=1)).json()
    assert genuine["match"] and not impostor["match"]
    assert genuine["score"] > impostor["score"] and genuine["threshold"] == 0.8
    r = c.post(
        "/v1/identify",
        params={"top_k": 2},
        content=payload.encode(feature_map(3, noise=0.2, sample=2)),
        headers=harness.h(),
    )
    cands = r.json()["candidates"]
    assert [x["subject_id"] for x in cands][:1] == ["p3"] and len(cands) == 2
    assert cands[0]["score"] >= cands[1]["score"]
    _err(
        c.post("/v1/identify", params={"top_k": 0}, content=b"x", headers=harness.h()),
        422,
        "validation_error",
    )
    # Delete the only template of p1: verify then has nothing to compare against.
    tid = c.get("/v1/subjects", headers=harness.h()).json()["items"][1]
    assert tid["subject_id"] == "p1" and tid["templates"] == 1
    enrolled = harness.enroll("p1", feature_map(1, noise=0.2, sample=5)).json()["template_id"]
    assert c.get(f"/v1/templates/{enrolled}", headers=harness.h()).json()["subject_id"] == "p1"
    assert c.delete(f"/v1/templates/{enrolled}", headers=harness.h()).json()["deleted"]
    _err(c.delete(f"/v1/templates/{enrolled}", headers=harness.h()), 404, "unknown_template")
    _err(c.get(f"/v1/templates/{enrolled}", headers=harness.h()), 404, "unknown_template")
    assert harness.state() == (4, 4)
    assert c.delete("/v1/subjects/p1", headers=harness.h()).json()["deleted_templates"] == 1
    assert harness.state() == (3, 3)
    _err(harness.verify("p1", feature_map(1)), 404, "unknown_subject")
    harness.subject("empty")
    _err(harness.verify("empty", feature_map(1)), 409, "no_templates")


def test_idempotent_enrollment(harness: Harness) -> None:
    harness.subject("alice")
    z = feature_map(7, noise=0.1)
    first = harness.enroll("alice", z, **{"Idempotency-Key": "req-1"})
    again = harness.enroll("alice", z, **{"Idempotency-Key": "req-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["replayed"] and again.json()["template_id"] == first.json()["template_id"]
    assert harness.state() == (1, 1)
    other = feature_map(8)
    _err(
        harness.enroll("alice", other, **{"Idempotency-Key": "req-1"}), 409, "idempotency_conflict"
    )
    harness.subject("bob")
    _err(harness.enroll("bob", z, **{"Idempotency-Key": "req-1"}), 409, "idempotency_conflict")
    _err(
        harness.enroll("alice", z, **{"Idempotency-Key": "bad key"}), 400, "invalid_idempotency_key"
    )
    # The same key in another tenant is independent.
    harness.subject("alice", key=harness.other_key)
    assert (
        harness.enroll(
            "alice", z, key=harness.other_key, **{"Idempotency-Key": "req-1"}
        ).status_code
        == 201
    )
    assert harness.state() == (2, 2)


def test_concurrent_retries_store_once(harness: Harness) -> None:
    harness.subject("carol")
    z = feature_map(9, noise=0.1)
    codes: list[int] = []

    def send() -> None:
        codes.append(harness.enroll("carol", z, **{"Idempotency-Key": "race"}).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 200, 200, 201]
    assert harness.state() == (1, 1)


def test_tenants_are_isolated(harness: Harness) -> None:
    c, other = harness.client, harness.other_key
    harness.subject("shared-name")
    tid = harness.enroll("shared-name", feature_map(1)).json()["template_id"]
    assert c.get("/v1/subjects", headers=harness.h(other)).json()["items"] == []
    _err(harness.verify("shared-name", feature_map(1), key=other), 404, "unknown_subject")
    _err(harness.enroll("shared-name", feature_map(1), key=other), 404, "unknown_subject")
    _err(c.delete(f"/v1/templates/{tid}", headers=harness.h(other)), 404, "unknown_template")
    _err(c.get(f"/v1/templates/{tid}", headers=harness.h(other)), 404, "unknown_template")
    _err(c.delete("/v1/subjects/shared-name", headers=harness.h(other)), 404, "unknown_subject")
    r = c.post("/v1/identify", content=payload.encode(feature_map(1)), headers=harness.h(other))
    assert r.json()["candidates"] == []
    harness.subject("shared-name", key=other)  # same id, other tenant: fine
    assert harness.state() == (1, 1)


def _chunks(data: bytes, size: int = 65536):  # noqa: ANN202
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _raw_f32(z: np.ndarray) -> bytes:
    return payload.encode(z, dtype="float32", codec=payload.CODEC_RAW)


def _with_value(value: float) -> bytes:
    raw = bytearray(_raw_f32(feature_map(1)))
    raw[20 + 4 * 50 : 20 + 4 * 51] = np.float32(value).tobytes()
    return bytes(raw)


BAD_BODIES = {
    "wrong_shape": (payload.encode(np.zeros((64, 77, 70), np.float32)), 422, "invalid_shape"),
    "wrong_rank": (payload.encode(np.zeros((64 * 77 * 77,), np.float32)), 422, "invalid_shape"),
    "image_not_features": (
        payload.encode(np.zeros((3, 160, 160), np.float32)),
        422,
        "invalid_shape",
    ),
    "wrong_dtype": (lambda b: b[:4] + b"\x05" + b[5:], 422, "invalid_dtype"),
    "nan": (_with_value(float("nan")), 422, "non_finite"),
    "inf": (_with_value(float("inf")), 422, "non_finite"),
    "garbage": (b"hello world, not a payload", 422, "invalid_payload"),
    "truncated": (lambda b: b[: len(b) // 2], 422, "invalid_payload"),
    "empty": (b"", 422, "invalid_payload"),
    "json": (b'{"features": [1, 2, 3]}', 422, "invalid_payload"),
    "too_big_values": (_raw_f32(np.full((64, 77, 77), 3e38, np.float32)), 422, "invalid_features"),
    "implausible_values": (
        payload.encode(np.full((64, 77, 77), 5e3, np.float32)),
        422,
        "invalid_features",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_payloads_are_typed_4xx_and_store_nothing(harness: Harness, case: str) -> None:
    harness.subject("dave")
    good = payload.encode(feature_map(1))
    body, status, code = BAD_BODIES[case]
    data = body(good) if callable(body) else body
    before = harness.state()
    for url in ("/v1/subjects/dave/templates", "/v1/subjects/dave/verify", "/v1/identify"):
        if url.endswith("verify"):
            harness.enroll("dave", feature_map(1))  # verify needs a template to reach decoding
            before = harness.state()
        r = harness.client.post(url, content=data, headers=harness.h())
        _err(r, status, code)
        assert harness.state() == before


def test_oversize_and_media_type(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy, max_body_bytes=64 * 1024)
    try:
        h.subject("erin")
        big = payload.encode(feature_map(3, noise=1.0))
        assert len(big) > 64 * 1024
        url = "/v1/subjects/erin/templates"
        _err(h.client.post(url, content=big, headers=h.h()), 413, "payload_too_large")
        # Chunked upload without Content-Length is cut off as well.
        _err(h.client.post(url, content=_chunks(big), headers=h.h()), 413, "payload_too_large")
        _err(
            h.client.post(
                url, content=b"x" * 10, headers=h.h(**{"Content-Type": "application/json"})
            ),
            415,
            "unsupported_media_type",
        )
        _err(
            h.client.post("/v1/subjects", content=b"{" * 70_000, headers=h.h()),
            413,
            "payload_too_large",
        )
        assert h.state() == (0, 0)
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_unknown_routes_and_methods_are_json(harness: Harness) -> None:
    _err(harness.client.get("/v2/nothing"), 404, "not_found")
    _err(harness.client.put("/health"), 405, "method_not_allowed")
    _err(harness.verify("nobody", feature_map(1)), 404, "unknown_subject")
    _err(harness.client.get("/v1/templates/nope", headers=harness.h()), 404, "unknown_template")
    bad_json = harness.h(**{"Content-Type": "application/json"})
    _err(
        harness.client.post("/v1/subjects", content=b"{oops", headers=bad_json),
        422,
        "validation_error",
    )
    _err(
        harness.client.post("/v1/subjects", json=[1], headers=harness.h()), 422, "validation_error"
    )


def test_persistence_and_rebuild(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy, protection="random", protection_params={"steps": 4})
    try:
        for i in range(3):
            h.subject(f"q{i}")
            for j in range(2):
                assert h.enroll(f"q{i}", feature_map(i, noise=0.2, sample=j)).status_code == 201
        probe = feature_map(1, noise=0.2, sample=9)
        before = h.verify("q1", probe).json()
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
    # A new process on the same database: embeddings are recomputed from the stored blobs.
    store = Store(db_url, keys=MASTER)
    from fastapi.testclient import TestClient

    from advface.protection import build_protection
    from advface.service.app import create_app

    prot = build_protection("random", steps=4)
    app = create_app(h.settings, store=store, backend=toy, protection=prot)
    with TestClient(app) as c:
        assert app.state.service.ready.wait(30)
        assert c.get("/ready").status_code == 200
        svc = app.state.service
        assert svc.index.count() == 6 and svc.skipped_templates == 0
        after = c.post(
            "/v1/subjects/q1/verify", content=payload.encode(probe), headers=h.h()
        ).json()
    store.close()
    assert after["score"] == pytest.approx(before["score"], abs=1e-5)
    assert after["match"] == before["match"]


def test_stored_rows_hold_protected_maps_only(db_url: str, toy: Backend) -> None:
    h, cm = make_harness(db_url, toy, protection="random", protection_params={"steps": 4})
    try:
        h.subject("frank")
        z = feature_map(4, noise=0.1)
        t = h.enroll("frank", z).json()
        assert t["protection"] == "random" and t["protection_params"]["bound"] == 0.2
        row = h.store.get_template(*_tenant_and(h, t["template_id"]))
        stored = payload.decode(row.blob)
        assert stored.shape == (64, 77, 77)  # a feature map, not a 512-d embedding
        assert np.abs(stored - z).max() > 0.05  # the server protected it before storing
        cols = {c["name"] for c in inspect(h.store.engine).get_columns("templates")}
        assert not any("emb" in c for c in cols)
        # Beside it: Psi's embedding of exactly the stored (protected) map, with Psi's version.
        backend = h.service.backend
        emb = h.store.subject_embeddings(row.tenant_id, "frank", backend.embedding_version)
        want = backend.embed(torch.from_numpy(stored)[None]).numpy()
        assert emb.shape == want.shape and np.allclose(emb, want, atol=1e-5)
        assert not len(h.store.subject_embeddings(row.tenant_id, "frank", "other-psi"))
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def _tenant_and(h: Harness, template_id: str) -> tuple[int, str]:
    return h.store.authenticate(h.key), template_id


def test_other_model_versions_are_skipped(db_url: str, toy: Backend) -> None:
    store = Store(db_url)
    store.create_key("acme")
    store.create_subject(1, "old")
    store.add_template(
        1,
        "old",
        payload.encode(feature_map(1)),
        protection="none",
        protection_params={},
        model_version="some-older-model",
        request_sha256="0" * 64,
    )
    store.close()
    h, cm = make_harness(db_url, toy)
    try:
        assert h.client.get("/ready").status_code == 200
        assert h.service.index.count() == 0 and h.service.skipped_templates == 1
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_sqlite_pragmas(tmp_path) -> None:  # noqa: ANN001
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    store.close()


def test_advface_protection_plugs_in(tmp_path, toy: Backend) -> None:  # noqa: ANN001
    """The real AdvFace class (tiny shadow S, toy E) protects every enrollment, one at a time."""
    import torch
    from fastapi.testclient import TestClient

    from advface.protection import build_protection
    from advface.service.app import create_app
    from advface.service.settings import ServiceSettings

    torch.manual_seed(0)
    # (N,64,77,77) -> (N,3,160,160): (77 - 1) * 2 + 8 = 160; BN exercises batch-of-one statistics.
    shadow = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(64, 3, kernel_size=8, stride=2),
        torch.nn.BatchNorm2d(3),
        torch.nn.Sigmoid(),
    )
    prot = build_protection("advface", shadow=shadow, extractor=toy.extractor, steps=2)
    url = f"sqlite:///{tmp_path / 'adv.db'}"
    store = Store(url)
    key = store.create_key("acme")
    app = create_app(
        ServiceSettings(db_url=url, backend="toy"),
        store=store,
        backend=toy,
        protection=prot,
        rebuild_in_background=False,
    )
    with TestClient(app) as c:
        h = {"X-API-Key": key}
        assert c.post("/v1/subjects", json={"subject_id": "g"}, headers=h).status_code == 201
        z = feature_map(3, noise=0.1)
        r = c.post("/v1/subjects/g/templates", content=payload.encode(z), headers=h)
        assert r.status_code == 201, r.text
        t = r.json()
        assert t["protection"] == "advface" and t["protection_params"]["steps"] == 2
        stored = payload.decode(store.get_template(1, t["template_id"]).blob)
        assert stored.shape == z.shape and np.isfinite(stored).all()
        assert not np.allclose(stored, z, atol=1e-2)
        v = c.post("/v1/subjects/g/verify", content=payload.encode(z), headers=h).json()
        assert -1.0 <= v["score"] <= 1.0
    store.close()
