"""Per-tenant secret transforms of the index vectors: same results, nothing clear in the
index, rekeying without re-enrollment, rotation of the master key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.service import crypto, payload
from advface.service.backend import Backend
from advface.service.index import ExactIndex, VectorIndexError
from advface.service.store import NotFound, Store
from advface.service.transform import TenantTransforms, TransformedIndex, orthogonal, rekey_tenant

from .conftest import MASTER, Harness, feature_map, make_harness


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_orthogonal_is_orthogonal_seeded_and_checked() -> None:
    q = orthogonal(b"s" * 32, 64)
    assert np.allclose(q @ q.T, np.eye(64), atol=1e-5)
    assert np.array_equal(q, orthogonal(b"s" * 32, 64))
    assert not np.allclose(q, orthogonal(b"t" * 32, 64), atol=0.1)
    with pytest.raises(ValueError, match="16 bytes"):
        orthogonal(b"short", 64)
    with pytest.raises(ValueError, match="dim"):
        orthogonal(b"s" * 32, 0)


def test_transformed_index_gives_the_plain_hits_and_holds_no_plain_vector(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db'}", keys=MASTER)
    store.create_key("acme")
    tenant = store.tenant_id("acme")
    vecs = _unit_rows(200, 32, 0)
    items = [(f"t{i}", f"s{i % 50}", v) for i, v in enumerate(vecs)]
    plain, inner = ExactIndex(32), ExactIndex(32)
    moved = TransformedIndex(inner, TenantTransforms(store, 32))
    plain.add(tenant, items)
    moved.add(tenant, items)
    q = moved.transforms.matrix(tenant)
    for probe in _unit_rows(20, 32, 1):
        a, b = plain.search(tenant, probe, 10), moved.search(tenant, probe, 10)
        assert [h.template_id for h in a] == [h.template_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    # The wrapped index holds Q e: found by Q e with score 1, not by e.
    assert inner.search(tenant, q @ vecs[7], 1)[0].score == pytest.approx(1.0, abs=1e-5)
    assert inner.search(tenant, vecs[7], 1)[0].score < 0.9
    # Bad input is refused before anything is added.
    with pytest.raises(VectorIndexError):
        moved.add(tenant, [("x", "s", np.ones(32)), ("y", "s", np.zeros(32))])
    assert moved.count(tenant) == 200 and moved.remove(["t0"]) == 1
    with pytest.raises(VectorIndexError):
        moved.search(tenant, np.ones(31), 1)
    store.close()


def _enroll(h: Harness, n: int = 6) -> None:
    for i in range(n):
        for key in (h.key, h.other_key):
            h.subject(f"p{i}", key)
            assert h.enroll(f"p{i}", feature_map(i, 0.2, 1), key).status_code == 201


def _results(h: Harness, n: int = 6) -> list[tuple[str, float]]:
    """Identify (top 3) and verify scores of fresh probes of the ``n`` enrolled people."""
    out = []
    for i in range(n):
        z = feature_map(i, 0.2, 2)
        body = h.client.post(
            "/v1/identify?top_k=3", content=payload.encode(z), headers=h.h()
        ).json()
        out += [(c["subject_id"], c["score"]) for c in body["candidates"]]
        out.append(("verify", h.verify(f"p{i}", z).json()["score"]))
    return out


def _same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    assert [x for x, _ in a] == [x for x, _ in b]
    assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


def _harness(tmp_path: Path, toy: Backend, name: str, keys: object) -> tuple[Harness, object]:
    return make_harness(f"sqlite:///{tmp_path / name}", toy, keys=keys)


def test_service_results_equal_with_and_without_the_transform(tmp_path: Path, toy: Backend) -> None:
    (clear, c1), (moved, c2) = (
        _harness(tmp_path, toy, n, k) for n, k in (("a", None), ("b", MASTER))
    )
    try:
        _enroll(clear)
        _enroll(moved)
        assert isinstance(moved.service.index, TransformedIndex)
        assert not isinstance(clear.service.index, TransformedIndex)
        _same(_results(clear), _results(moved))
        # The two tenants hold their vectors under different secret transforms.
        tr = moved.service.index.transforms
        acme, globex = moved.store.tenant_id("acme"), moved.store.tenant_id("globex")
        assert not np.allclose(tr.matrix(acme), tr.matrix(globex), atol=0.1)
    finally:
        for cm, h in ((c1, clear), (c2, moved)):
            cm.__exit__(None, None, None)
            h.store.close()


def test_rekey_moves_one_tenants_index_vectors_without_reenrollment(
    tmp_path: Path, toy: Backend
) -> None:
    h, cm = _harness(tmp_path, toy, "db", MASTER)
    try:
        _enroll(h)
        before = _results(h)
        index = h.service.index
        assert isinstance(index, TransformedIndex)
        acme, globex = h.store.tenant_id("acme"), h.store.tenant_id("globex")
        q_old, q_globex = index.transforms.matrix(acme), index.transforms.matrix(globex)
        assert rekey_tenant(h.store, "acme") == {"tenant": "acme", "retransformed_vectors": 0}
        # What the service does at its next start: fresh transforms, index rebuilt.
        index.transforms.forget()
        assert h.service.sync is not None
        h.service.sync.reload()
        q_new = index.transforms.matrix(acme)
        assert not np.allclose(q_new, q_old, atol=0.1)
        assert np.array_equal(index.transforms.matrix(globex), q_globex)
        _same(before, _results(h))
        e = h.store.subject_embeddings(acme, "p3", toy.embedding_version)[0]
        assert index.inner.search(acme, q_new @ e, 1)[0].score == pytest.approx(1.0, abs=1e-5)
        assert index.inner.search(acme, q_old @ e, 1)[0].score < 0.9
        with pytest.raises(NotFound):
            rekey_tenant(h.store, "nobody")
    finally:
        cm.__exit__(None, None, None)
        h.store.close()


def test_rekey_cli_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    url = f"sqlite:///{tmp_path / 'db'}"
    key = bytes(range(32))
    store = Store(url, keys=crypto.LocalKeyProvider(key))
    store.create_key("acme")
    tenant = store.tenant_id("acme")
    seed = store.transform_seed(tenant)
    monkeypatch.setenv("ADVFACE_MASTER_KEY", base64.b64encode(key).decode())
    run = CliRunner().invoke
    r = run(cli_app, ["keys", "rekey-tenant", "nobody", "--db-url", url])
    assert r.exit_code == 2 and "no tenant 'nobody'" in r.output
    assert store.transform_seed(tenant) == seed  # nothing changed
    r = run(cli_app, ["keys", "rekey-tenant", "acme", "--db-url", url])
    assert r.exit_code == 0, r.output
    assert '"retransformed_vectors": 0' in r.output
    assert store.transform_seed(tenant) != seed
    monkeypatch.setenv("ADVFACE_MASTER_KEY", base64.b64encode(bytes(32)).decode())
    r = run(cli_app, ["keys", "rekey-tenant", "acme", "--db-url", url])
    assert r.exit_code == 2 and "not by the configured key" in r.output
    store.close()


def test_transform_seeds_need_the_master_key_and_follow_its_rotation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db'}"
    store = Store(url, keys=MASTER)
    store.create_key("acme")
    tenant = store.tenant_id("acme")
    seed = store.transform_seed(tenant)
    assert store.transform_seed(tenant) == seed  # created once
    new = crypto.LocalKeyProvider(bytes(range(1, 33)))
    assert store.rotate_master(new) == 1  # no subject keys: only the tenant's seed
    store.close()
    with pytest.raises(crypto.MasterKeyError, match="not by the configured key"):
        Store(url, keys=MASTER).check_master_key()
    with pytest.raises(crypto.MasterKeyError, match="no master key"):
        Store(url).check_master_key()
    with pytest.raises(crypto.MasterKeyError):
        TenantTransforms(Store(url), 8)
    rotated = Store(url, keys=new)
    rotated.check_master_key()
    assert rotated.transform_seed(tenant) == seed
    rotated.close()


def test_pgvector_column_holds_transformed_vectors(pgvector_url: str, toy: Backend) -> None:
    from sqlalchemy import text

    from .conftest import empty_schema

    empty_schema(pgvector_url)
    h, cm = make_harness(pgvector_url, toy)
    try:
        _enroll(h, 2)
        acme = h.store.tenant_id("acme")
        e = h.store.subject_embeddings(acme, "p1", toy.embedding_version)[0]

        def column() -> np.ndarray:
            with h.store.engine.connect() as c:
                v = c.execute(
                    text(
                        "SELECT x.embedding::text FROM template_vectors x JOIN templates t "
                        "ON t.id = x.template_id JOIN subjects s ON s.id = t.subject_pk "
                        "WHERE s.subject_id = 'p1' AND x.tenant_id = :n"
                    ),
                    {"n": acme},
                ).scalar()
            return np.array(v.strip("[]").split(","), np.float32)

        q_old = h.service.index.transforms.matrix(acme)
        assert np.allclose(column(), q_old @ e, atol=1e-5)
        before = _results(h, 2)
        out = rekey_tenant(h.store, "acme")
        assert out["retransformed_vectors"] == 2
        h.service.index.transforms.forget()
        q_new = h.service.index.transforms.matrix(acme)
        assert np.allclose(column(), q_new @ e, atol=1e-5)
        _same(before, _results(h, 2))
    finally:
        cm.__exit__(None, None, None)
        h.store.close()
