"""Encryption at rest: nothing of a map in the database files, rows bound to their tenant,
subject and template, crypto-shredding, start-up without the key, master key rotation."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.cli._server import ensure_master_key
from advface.service import crypto, payload
from advface.service.app import create_app
from advface.service.backend import Backend
from advface.service.settings import ServiceSettings
from advface.service.store import Store

from .conftest import MASTER, Harness, assert_error, feature_map, make_harness


def _chunks(data: bytes, n: int = 12, size: int = 32) -> list[bytes]:
    """``n`` spread-out pieces of ``data`` that are not runs of a few byte values (zeros of
    ReLU maps occur everywhere)."""
    step = max(1, (len(data) - size) // (4 * n))
    out = []
    for off in range(0, len(data) - size, step):
        piece = data[off : off + size]
        if len(set(piece)) >= 12:
            out.append(piece)
        if len(out) == n:
            break
    assert len(out) == n
    return out


def _raw(db: Path) -> bytes:
    return b"".join(
        p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()
    )


def _enroll_two(h: Harness) -> tuple[list[bytes], list[bytes]]:
    """Enroll two maps; return pieces of every encoding of them (fp16/zlib body, fp16, fp32,
    embedding), and the pieces of those the service stores (body and embedding)."""
    pieces, stored = [], []
    for i in range(2):
        h.subject(f"s{i}")
        z = feature_map(i, noise=0.3, sample=i)
        r = h.enroll(f"s{i}", z)
        assert r.status_code == 201, r.text
        z16 = z.astype("<f2")
        emb = h.service.backend.embed(torch.from_numpy(z16.astype(np.float32))[None])[0]
        for enc in (
            payload.encode(z),  # the fp16/zlib body, which is also the stored blob here
            z16.tobytes(),
            z16.astype("<f4").tobytes(),
            emb.numpy().astype("<f4").tobytes(),
        ):
            pieces += _chunks(enc)
        stored += _chunks(payload.encode(z)) + _chunks(emb.numpy().astype("<f4").tobytes())
    return pieces, stored


@pytest.mark.parametrize("encrypted", [True, False])
def test_database_files_hold_no_bytes_of_the_maps(
    tmp_path: Path, toy: Backend, encrypted: bool
) -> None:
    db = tmp_path / "scan.db"
    h, cm = make_harness(f"sqlite:///{db}", toy, keys=MASTER if encrypted else None)
    try:
        pieces, stored = _enroll_two(h)
        raw = _raw(db)
        found = [p for p in pieces if p in raw]
        if not encrypted:  # the scan itself works: in clear, the stored encodings are there
            # (but for a piece that straddles the boundary of two of SQLite's overflow pages,
            # where it is cut by the next page's pointer: which ones depends on the row layout)
            assert sum(p in raw for p in stored) >= len(stored) - 2
            return
        assert found == []
        with h.store.engine.connect() as conn:
            wrapped = [w for (w,) in conn.execute(text("SELECT wrapped FROM subject_keys"))]
        assert len(wrapped) == 2 and all(w in raw for w in wrapped)
        # Without a snapshot of the index: it would hold every embedding outside the keys.
        assert not (tmp_path / "scan.db.index").exists()
        assert h.client.delete("/v1/subjects/s0", headers=h.h()).status_code == 200
        raw = _raw(db)
        assert [p for p in pieces if p in raw] == []
        # Crypto-shredding: the deleted subject's wrapped key is gone from the file and WAL.
        assert wrapped[0] not in raw and wrapped[1] in raw
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_rows_copied_to_another_tenant_subject_or_template_do_not_decrypt(
    db_url: str, toy: Backend
) -> None:
    h, cm = make_harness(db_url, toy)
    try:
        h.subject("a")
        h.subject("b")
        h.subject("a", key=h.other_key)
        z = feature_map(1, noise=0.1)
        ta = h.enroll("a", z).json()["template_id"]
        tb = h.enroll("b", feature_map(2)).json()["template_id"]
        to = h.enroll("a", feature_map(3), key=h.other_key).json()["template_id"]
        acme, globex = h.store.authenticate(h.key), h.store.authenticate(h.other_key)
        assert acme is not None and globex is not None
        with h.store.engine.begin() as conn:
            blob, vec = conn.execute(
                text(
                    "SELECT t.blob, e.vector FROM templates t JOIN template_embeddings e "
                    "ON e.template_id = t.id WHERE t.id = :t"
                ),
                {"t": ta},
            ).one()
            # Subject a's rows pasted over another tenant's and another subject's rows.
            for victim in (to, tb):
                conn.execute(
                    text("UPDATE templates SET blob = :b WHERE id = :t"), {"b": blob, "t": victim}
                )
                conn.execute(
                    text("UPDATE template_embeddings SET vector = :v WHERE template_id = :t"),
                    {"v": vec, "t": victim},
                )
        for tenant, victim in ((globex, to), (acme, tb)):
            with pytest.raises(crypto.DecryptionError):
                h.store.get_template(tenant, victim)
        assert_error(h.verify("a", z, key=h.other_key), 500, "decryption_failed")
        assert_error(h.verify("b", z), 500, "decryption_failed")
        # The untouched row still decrypts and matches.
        assert payload.decode(h.store.get_template(acme, ta).blob).shape == (64, 77, 77)
        assert h.verify("a", z).json()["match"] is True
        # A row moved to another template id of the same subject fails too.
        with h.store.engine.begin() as conn:
            conn.execute(text("UPDATE templates SET blob = :b WHERE id = :t"), {"b": blob, "t": tb})
            conn.execute(
                text(
                    "UPDATE templates SET subject_pk = (SELECT subject_pk FROM "
                    "templates WHERE id = :a) WHERE id = :t"
                ),
                {"a": ta, "t": tb},
            )
        with pytest.raises(crypto.DecryptionError):
            h.store.get_template(acme, tb)
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_a_deleted_subjects_rows_never_decrypt_again(tmp_path: Path, toy: Backend) -> None:
    """Rows of a deleted subject restored from a backup or WAL copy, even under a subject of
    the same name, do not decrypt: their data key is gone."""
    h, cm = make_harness(f"sqlite:///{tmp_path / 'd.db'}", toy)
    try:
        h.subject("gone")
        tid = h.enroll("gone", feature_map(5)).json()["template_id"]
        with h.store.engine.connect() as conn:
            row = conn.execute(text("SELECT * FROM templates WHERE id = :t"), {"t": tid}).mappings()
            saved = dict(row.one())
        assert h.client.delete("/v1/subjects/gone", headers=h.h()).status_code == 200
        h.subject("gone")
        with h.store.engine.begin() as conn:
            saved["subject_pk"] = conn.execute(text("SELECT max(id) FROM subjects")).scalar()
            conn.execute(
                text(
                    f"INSERT INTO templates ({', '.join(saved)}) VALUES "
                    f"({', '.join(':' + k for k in saved)})"
                ),
                saved,
            )
        with pytest.raises(crypto.DecryptionError):
            h.store.get_template(h.store.authenticate(h.key) or 0, tid)
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def _encrypted_db(url: str, toy: Backend) -> str:
    h, cm = make_harness(url, toy)
    try:
        h.subject("x")
        assert h.enroll("x", feature_map(7)).status_code == 201
        return h.key
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_start_up_without_or_with_another_master_key_fails_clearly(
    tmp_path: Path, toy: Backend
) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    _encrypted_db(url, toy)
    settings = ServiceSettings(db_url=url, backend="toy")
    with pytest.raises(crypto.MasterKeyError, match="no master key is configured"):
        create_app(settings, backend=toy)
    other = crypto.LocalKeyProvider(bytes(32))
    with pytest.raises(crypto.MasterKeyError, match="not by the configured key"):
        create_app(settings, backend=toy, keys=other)
    # `advface serve` says so and exits 2; it does not generate a key for such a database.
    r = CliRunner().invoke(cli_app, ["serve", "--db-url", url, "--backend", "toy"])
    assert r.exit_code == 2 and "no master key is configured" in r.output
    assert not (tmp_path / "cache" / "master.key").exists()


def test_serve_generates_a_private_master_key_once(tmp_path: Path, toy: Backend) -> None:
    settings = ServiceSettings(db_url=f"sqlite:///{tmp_path / 'new.db'}", backend="toy")
    made = ensure_master_key(settings)
    path = Path(made.master_key_file)
    assert path == tmp_path / "cache" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_bytes()
    assert ensure_master_key(settings).master_key_file == str(path)  # reused, not replaced
    assert path.read_bytes() == key
    # The service then encrypts with it: a subject gets a data key under that master key.
    app = create_app(made, backend=toy, rebuild_in_background=False)
    store = app.state.service.store
    assert store.keys is not None
    store.create_key("t")
    store.create_subject(1, "y")
    with store.engine.connect() as conn:
        master_id = conn.execute(text("SELECT master_id FROM subject_keys")).scalar()
    assert master_id == store.keys.key_id == crypto.key_id(crypto.read_key_file(path))
    store.close()


def test_rotate_master_rewraps_keys_only_and_resumes(tmp_path: Path, toy: Backend) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    h, cm = make_harness(url, toy)
    try:
        for i in range(3):
            h.subject(f"r{i}")
            assert h.enroll(f"r{i}", feature_map(i)).status_code == 201
    finally:
        cm.__exit__(None, None, None)
        h.store.close()

    def sealed() -> list[tuple[bytes, ...]]:
        store = Store(url)
        q = text(
            "SELECT t.blob, e.vector FROM templates t JOIN template_embeddings e "
            "ON e.template_id = t.id ORDER BY t.id"
        )
        with store.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(q)]
        store.close()
        return rows

    before = sealed()
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    old_file.write_text(base64.b64encode(bytes(range(32))).decode())
    store = Store(url, keys=MASTER)
    new = crypto.LocalKeyProvider(crypto.write_key_file(new_file))

    class Interrupted(Exception):
        pass

    def stop(_: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):  # killed after the first committed batch
        store.rotate_master(new, batch=1, on_batch=stop)
    store.close()
    with pytest.raises(crypto.MasterKeyError, match="unfinished rotation"):
        Store(url, keys=MASTER).check_master_key()
    run = CliRunner().invoke
    args = ["keys", "rotate-master", "--new-key-file", str(new_file), "--db-url", url]
    r = run(cli_app, [*args, "--master-key-file", str(old_file), "--batch", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # The two subject keys left, and the enrolling tenant's index transform seed.
    assert out == {"rewrapped": 3, "master_key_id": new.key_id, "master_key_file": str(new_file)}
    assert sealed() == before  # blobs and embeddings untouched
    r = run(cli_app, [*args, "--master-key-file", str(old_file)])  # nothing left: a no-op
    assert r.exit_code == 0 and json.loads(r.stdout.strip().splitlines()[-1])["rewrapped"] == 0
    settings = ServiceSettings(db_url=url, backend="toy", threshold=0.8)
    with pytest.raises(crypto.MasterKeyError):
        create_app(settings, backend=toy, keys=MASTER)
    app = create_app(settings.with_(master_key_file=str(new_file)), backend=toy)
    with TestClient(app) as c:
        # The gallery loads in a background thread: wait for it (at most 30 s).
        for _ in range(300):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        r = c.post("/v1/subjects/r1/verify", content=payload.encode(feature_map(1)), headers=h.h())
        assert r.status_code == 200 and r.json()["match"] is True, r.text
    app.state.service.store.close()


def test_master_key_parsing_errors_are_typed(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    for call in (
        lambda: crypto.read_key_file(bad),
        lambda: crypto.read_key_file(tmp_path / "missing.key"),
        lambda: crypto.provider_from_config(env={crypto.MASTER_KEY_ENV: "AAAA"}),
    ):
        with pytest.raises(crypto.MasterKeyError):
            call()
    with pytest.raises(FileExistsError):  # an existing key is never overwritten
        crypto.write_key_file(bad)
    # A failed write leaves no key file (nor its temporary) behind.
    target = tmp_path / "keys" / "new.key"

    def fail(_fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(crypto.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        crypto.write_key_file(target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    key = crypto.write_key_file(target)
    assert crypto.read_key_file(target) == key
    assert target.stat().st_mode & 0o777 == 0o600
    key = crypto.new_data_key()
    box = crypto.seal(key, b"map", crypto.aad("map", 1, 2, "t"))
    assert crypto.open_sealed(key, box, crypto.aad("map", 1, 2, "t")) == b"map"
    for ad in (crypto.aad("map", 9, 2, "t"), crypto.aad("emb", 1, 2, "t")):
        with pytest.raises(crypto.DecryptionError):
            crypto.open_sealed(key, box, ad)
