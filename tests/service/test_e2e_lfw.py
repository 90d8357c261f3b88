"""End to end on real LFW faces: uvicorn server process, SDK on the client side (MTCNN + E),
genuine and impostor verification, restart (persistence), identify, subject deletion."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from advface.service.process import ServerProcess
from advface.service.store import Store

pytestmark = pytest.mark.data

N_PEOPLE = 4
THRESHOLD = 0.4


def _pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """The first matched pairs of LFW View 2 fold 1: (name, image a, image b)."""
    lfw = root / "lfw"
    lines = (lfw / "pairs.txt").read_text().splitlines()[1:]
    out: list[tuple[str, Path, Path]] = []
    for line in lines[:300]:  # the matched half of fold 1
        name, i, j = line.split()
        if any(name == o[0] for o in out):
            continue  # one pair per person
        img = lfw / "lfw-deepfunneled" / name
        out.append((name, img / f"{name}_{int(i):04d}.jpg", img / f"{name}_{int(j):04d}.jpg"))
        if len(out) == N_PEOPLE:
            break
    return out


def test_lfw_end_to_end(data_root: Path, tmp_path: Path) -> None:
    from advface.data.align import Aligner
    from advface.pipelines.default_weights import train_default_protection
    from advface.protection.embedding_shadow import default_weights_dir
    from advface.service.sdk import AdvFaceClient, NotFoundError

    if not (default_weights_dir() / "manifest.json").is_file():
        # A fresh cache: build the default protection's networks as an operator would (smaller).
        train_default_protection(epochs=3, limit=300, check_faces=4, progress=False)
    pairs = _pairs(data_root)
    db_url = f"sqlite:///{tmp_path / 'lfw.db'}"
    store = Store(db_url)
    key = store.create_key("lfw-e2e")
    store.close()
    # The default protection: embedding-shadow with the networks `train-protection` built.
    srv = dict(db_url=db_url, backend="facenet", threshold=THRESHOLD)
    srv_kw = dict(srv, log_path=tmp_path / "server.log", ready_timeout=600)
    aligner = Aligner(prefer_center=True)  # LFW images are centred on the labelled person

    def scores(c: AdvFaceClient) -> dict[tuple[str, str], tuple[float, bool]]:
        out = {}
        for k, (name, _, probe) in enumerate(pairs):
            other = pairs[(k + 1) % len(pairs)][0]
            for subject in (name, other):  # genuine, then impostor
                v = c.verify(subject, probe)
                out[(subject, name)] = (v.score, v.match)
        return out

    with ServerProcess(**srv_kw) as server, AdvFaceClient(server.url, key, aligner=aligner) as c:
        for name, enroll_img, _ in pairs:
            c.create_subject(name)
            t = c.enroll(name, enroll_img)
            assert t.protection == "embedding-shadow" and t.model_version.startswith("facenet")
            assert not any(k.endswith("_path") for k in t.protection_params)
        first = scores(c)
        top = c.identify(pairs[0][2], top_k=2)
        assert top[0].subject_id == pairs[0][0]
    genuine = [first[(n, n)] for n, _, _ in pairs]
    impostor = [v for k, v in first.items() if k[0] != k[1]]
    assert all(m for _, m in genuine), first
    assert not any(m for _, m in impostor), first
    assert min(s for s, _ in genuine) > max(s for s, _ in impostor)

    with ServerProcess(**srv_kw) as server:  # restart: the gallery is rebuilt from the DB
        stats = httpx.get(f"{server.url}/v1/stats", headers={"X-API-Key": key}).json()
        assert stats["templates"] == N_PEOPLE
        with AdvFaceClient(server.url, key, aligner=aligner) as c:
            second = scores(c)
            assert second.keys() == first.keys()
            for k, (s, m) in first.items():
                assert second[k][0] == pytest.approx(s, abs=1e-5) and second[k][1] == m
            gone = pairs[0][0]
            assert c.delete_subject(gone) == 1
            with pytest.raises(NotFoundError):
                c.verify(gone, pairs[0][2])
            assert gone not in {s.subject_id for s in c.list_subjects()}
