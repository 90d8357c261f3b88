"""Stored forms of the protected maps: float16, float32, uint8 (per-channel affine), none."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.service import payload
from advface.service.backend import Backend
from advface.service.settings import ServiceSettings

from .conftest import feature_map, make_harness

# The harness's master key (conftest.MASTER), for the command-line tools.
MASTER_B64 = base64.b64encode(bytes(range(32))).decode()


def _maps() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    signed = rng.standard_normal((64, 77, 77)).astype(np.float32) * 3  # protected: signed
    relu = np.maximum(signed, 0)
    relu[5] = 0.0  # a dead channel
    relu[6] = 2.5  # a constant one
    return [signed, relu, feature_map(3)]


def test_uint8_round_trip_error_bound_and_size() -> None:
    for z in _maps():
        blob = payload.encode(z, dtype="uint8")
        assert payload.stored_dtype(blob) == "uint8"
        back = payload.decode(blob)
        planes, got = z.reshape(64, -1), back.reshape(64, -1)
        # Per channel: at most half a quantisation step, (max - min) / 255 / 2.
        step = (planes.max(1) - planes.min(1)) / 255
        err = np.abs(got - planes).max(1)
        assert (err <= step / 2 * (1 + 1e-4) + 1e-6).all()
        # Zeros of a ReLU plane (minimum 0) stay exact zeros.
        relu = planes.min(1) == 0
        assert (got[relu][planes[relu] == 0] == 0).all()
        assert len(blob) < len(payload.encode(z, dtype="float16"))
    const = _maps()[1]
    assert np.array_equal(payload.decode(payload.encode(const, dtype="uint8"))[5:7], const[5:7])


def test_uint8_payloads_are_validated() -> None:
    z = _maps()[0]
    blob = bytearray(payload.encode(z, dtype="uint8", codec=payload.CODEC_RAW))
    head = 8 + 4 * 3
    bad_scale = bytearray(blob)
    bad_scale[head + 4 * 64 : head + 4 * 65] = np.float32(np.nan).tobytes()
    with pytest.raises(payload.PayloadError, match="quantisation"):
        payload.decode(bytes(bad_scale))
    with pytest.raises(payload.PayloadError):
        payload.decode(bytes(blob[:-10]))
    with pytest.raises(ValueError, match="dtype"):
        payload.encode(z, dtype="int8")
    with pytest.raises(ValueError, match="storage_codec"):
        ServiceSettings(backend="toy", storage_codec="int4")


def _stored(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT map_codec, length(blob) FROM templates ORDER BY rowid"
        ).fetchall()


def test_service_with_uint8_storage_and_older_rows(tmp_path: Path, toy: Backend) -> None:
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    h, cm = make_harness(url, toy)  # float16, the default: an existing deployment
    try:
        h.subject("old")
        assert h.enroll("old", feature_map(1)).status_code == 201
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
    # A database of an earlier version had no map_codec column (nor the metadata indexes over
    # it): it is added, rows decode.
    with sqlite3.connect(db) as conn:
        conn.execute("DROP INDEX ix_templates_meta")
        conn.execute("ALTER TABLE templates DROP COLUMN map_codec")
    h, cm = make_harness(url, toy, storage_codec="uint8")
    try:
        for i in range(2, 5):
            h.subject(f"s{i}")
            assert h.enroll(f"s{i}", feature_map(i)).status_code == 201
        r = h.verify("s3", feature_map(3, noise=0.05, sample=1)).json()
        assert r["match"] and r["score"] > 0.95
        assert not h.verify("s3", feature_map(4, noise=0.05)).json()["match"]
        assert h.verify("old", feature_map(1, noise=0.05)).json()["match"]
        top = h.client.post(
            "/v1/identify", content=payload.encode(feature_map(2, noise=0.05)), headers=h.h()
        ).json()
        assert top["candidates"][0]["subject_id"] == "s2"
        rows = list(h.store.iter_templates())
        assert [payload.stored_dtype(r.blob) for r in rows] == ["float16"] + ["uint8"] * 3
        zs = [payload.decode(r.blob) for r in rows[1:]]
        for i, z in zip(range(2, 5), zs, strict=True):
            assert np.abs(z - feature_map(i)).max() <= np.ptp(feature_map(i)) / 510 + 1e-5
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
    codecs = _stored(db)
    assert [c for c, _ in codecs] == [None, "uint8", "uint8", "uint8"]


def test_embeddings_only_storage_and_reembed_refusal(tmp_path: Path, toy: Backend) -> None:
    db = tmp_path / "e.db"
    url = f"sqlite:///{db}"
    h, cm = make_harness(url, toy, storage_codec="embeddings-only")
    try:
        for i in range(3):
            h.subject(f"s{i}")
            assert h.enroll(f"s{i}", feature_map(i)).status_code == 201
        assert h.verify("s1", feature_map(1, noise=0.05)).json()["match"]
        top = h.client.post(
            "/v1/identify", content=payload.encode(feature_map(2, noise=0.05)), headers=h.h()
        ).json()
        assert top["candidates"][0]["subject_id"] == "s2"
        ids = [r.template_id for r in h.store.iter_templates()]
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
    assert {c for c, _ in _stored(db)} == {"none"}
    env = {"ADVFACE_MASTER_KEY": MASTER_B64}
    run = CliRunner().invoke
    # Nothing to recompute: reembed has no work and says so.
    r = run(cli_app, ["reembed", "--db-url", url, "--backend", "toy"], env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["embedded"] == 0
    # Psi changed (its embeddings are gone): the maps were not kept, so reembed refuses.
    h, cm = make_harness(url, toy, storage_codec="embeddings-only")
    cm.__exit__(None, None, None)
    h.store.delete_embeddings(toy.embedding_version, ids)
    h.store.close()
    r = run(cli_app, ["reembed", "--db-url", url, "--backend", "toy"], env=env)
    assert r.exit_code == 2 and "embeddings only" in r.output and "3 templates" in r.output
    r = run(
        cli_app,
        ["migrate", "--protection", "random", "--db-url", url, "--backend", "toy"],
        env=env,
    )
    assert r.exit_code == 2 and "embeddings only" in r.output
