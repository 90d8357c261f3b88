"""Tests for advface.data.protocols on small generated trees and (marked) on the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from advface.data.protocols import (
    celeba_keys,
    cfp_keys,
    folder_identities,
    lfw_keys,
    lfw_nonpair_keys,
    load_protocol,
)

DATA_ROOT = os.environ.get("ADVFACE_DATA_ROOT")
needs_data = pytest.mark.skipif(not DATA_ROOT, reason="ADVFACE_DATA_ROOT is not set")


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def make_lfw(root: Path, pairs: str, images: list[str]) -> None:
    (root / "lfw").mkdir(parents=True, exist_ok=True)
    (root / "lfw" / "pairs.txt").write_text(pairs)
    for key in images:
        touch(root / "lfw" / "lfw-deepfunneled" / key)


LFW_PAIRS = """2\t1
Ann\t1\t2
Bob\t1\tCid\t1
Cid\t1\t2
Ann\t2\tBob\t1
"""
LFW_IMAGES = [
    "Ann/Ann_0001.jpg",
    "Ann/Ann_0002.jpg",
    "Bob/Bob_0001.jpg",
    "Cid/Cid_0001.jpg",
    "Cid/Cid_0002.jpg",
    "Dan/Dan_0001.jpg",
]


def test_lfw_protocol_parses_folds(tmp_path: Path) -> None:
    make_lfw(tmp_path, LFW_PAIRS, LFW_IMAGES)
    p = load_protocol("lfw", tmp_path)
    assert len(p) == 4 and p.n_folds == 2
    assert p.keys_a == [
        "Ann/Ann_0001.jpg",
        "Bob/Bob_0001.jpg",
        "Cid/Cid_0001.jpg",
        "Ann/Ann_0002.jpg",
    ]
    assert p.keys_b[1] == "Cid/Cid_0001.jpg"
    assert p.issame.tolist() == [True, False, True, False]
    assert p.fold.tolist() == [0, 0, 1, 1]
    assert p.issame.dtype == bool
    assert lfw_keys(tmp_path) == sorted(LFW_IMAGES)
    assert lfw_nonpair_keys(tmp_path) == ["Dan/Dan_0001.jpg"]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ("2 1\nAnn 1 2\nBob 1 Cid 1\nCid 1\nAnn 2 Bob 1\n", "line 4"),
        ("2 1\nAnn 1 2\nBob 1 Cid x\nCid 1 2\nAnn 2 Bob 1\n", "line 3"),
        ("2 1\nAnn 1 2\nBob 1 Cid 1\n", "found 2"),
        ("ten 1\n", "line 1"),
        ("", "line 1"),
    ],
)
def test_lfw_malformed_lines(tmp_path: Path, pairs: str, message: str) -> None:
    make_lfw(tmp_path, pairs, LFW_IMAGES)
    with pytest.raises(ValueError, match=message):
        load_protocol("lfw", tmp_path)


def test_lfw_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pairs"):
        load_protocol("lfw", tmp_path)
    make_lfw(tmp_path, LFW_PAIRS, LFW_IMAGES[:-2])
    with pytest.raises(FileNotFoundError, match="Cid/Cid_0002.jpg"):
        load_protocol("lfw", tmp_path)
    assert len(load_protocol("lfw", tmp_path, check_files=False)) == 4


def make_cfp(root: Path) -> None:
    proto = root / "cfp" / "Protocol"
    proto.mkdir(parents=True)
    f_list = [f"00{p}/frontal/0{i}.jpg" for p in (1, 2) for i in (1, 2)]
    p_list = [f"00{p}/profile/01.jpg" for p in (1, 2)]
    (proto / "Pair_list_F.txt").write_text(
        "".join(f"{i + 1} ../Data/Images/{k}\n" for i, k in enumerate(f_list))
    )
    (proto / "Pair_list_P.txt").write_text(
        "".join(f"{i + 1} ../Data/Images/{k}\r\n" for i, k in enumerate(p_list))
    )
    for k in f_list + p_list:
        touch(root / "cfp" / "Data" / "Images" / k)
    for which in ("FF", "FP"):
        for f in range(1, 11):
            d = proto / "Split" / which / f"{f:02d}"
            d.mkdir(parents=True)
            (d / "same.txt").write_text("1,2\n" if which == "FF" else "1,1\n")
            (d / "diff.txt").write_text("1,3\n3,2\n" if which == "FF" else "3,1\n")


def test_cfp_protocols(tmp_path: Path) -> None:
    make_cfp(tmp_path)
    ff = load_protocol("cfp-ff", tmp_path)
    assert ff.name == "cfp-ff" and len(ff) == 30
    assert ff.keys_a[:3] == ["001/frontal/01.jpg", "001/frontal/01.jpg", "002/frontal/01.jpg"]
    assert ff.keys_b[:3] == ["001/frontal/02.jpg", "002/frontal/01.jpg", "001/frontal/02.jpg"]
    assert ff.issame[:3].tolist() == [True, False, False]
    assert np.bincount(ff.fold).tolist() == [3] * 10
    fp = load_protocol("CFP-FP", tmp_path)
    assert fp.keys_b[:2] == ["001/profile/01.jpg", "001/profile/01.jpg"]
    assert fp.keys_a[1] == "002/frontal/01.jpg"
    assert fp.issame.sum() == 10
    assert len(cfp_keys(tmp_path)) == 6


def test_cfp_errors(tmp_path: Path) -> None:
    make_cfp(tmp_path)
    split = tmp_path / "cfp" / "Protocol" / "Split" / "FP" / "04" / "diff.txt"
    split.write_text("3,1\n3;1\n")
    with pytest.raises(ValueError, match=r"04[/\\]diff.txt, line 2"):
        load_protocol("cfp-fp", tmp_path)
    split.write_text("3,9\n")
    with pytest.raises(ValueError, match="index 9 not in Pair_list_P"):
        load_protocol("cfp-fp", tmp_path)
    (tmp_path / "cfp" / "Protocol" / "Pair_list_F.txt").write_text("1 /elsewhere/x.jpg\n")
    with pytest.raises(ValueError, match="Pair_list_F.txt, line 1"):
        load_protocol("cfp-ff", tmp_path)
    with pytest.raises(ValueError, match="unknown protocol"):
        load_protocol("agedb", tmp_path)


def test_celeba_keys_skip_header_and_no_face(tmp_path: Path) -> None:
    base = tmp_path / "celeba"
    for k in ("000001.jpg", "000002.jpg", "000003.jpg"):
        touch(base / "img_mtcnn160" / k)
    (base / "identity_CelebA.txt").write_text(
        "image identity\n000001.jpg 7\n000002.jpg 9\n000003.jpg 7\n000004.jpg 1\n"
    )
    (base / "no_face.txt").write_text("000002.jpg\n")
    keys, ids = celeba_keys(tmp_path)
    assert keys == ["000001.jpg", "000003.jpg"]
    assert ids.tolist() == [7, 7]
    (base / "identity_CelebA.txt").write_text("000001.jpg 7\n000003.jpg seven\n")
    with pytest.raises(ValueError, match="line 2"):
        celeba_keys(tmp_path)


def test_folder_identities(tmp_path: Path) -> None:
    for k in ("alice/1.jpg", "alice/2.png", "bob/x.jpeg", "bob/notes.txt", "loose.jpg"):
        touch(tmp_path / k)
    keys, ids = folder_identities(tmp_path)
    assert keys == ["alice/1.jpg", "alice/2.png", "bob/x.jpeg"]
    assert ids == ["alice", "alice", "bob"]
    with pytest.raises(ValueError, match="no images"):
        folder_identities(tmp_path / "alice")  # images directly inside, no identity folders


@pytest.mark.data
@needs_data
def test_real_lfw_protocol() -> None:
    p = load_protocol("lfw", DATA_ROOT or "")
    assert len(p) == 6000 and int(p.issame.sum()) == 3000
    assert np.bincount(p.fold).tolist() == [600] * 10
    assert len(p.unique_keys()) == 7701
    assert len(lfw_nonpair_keys(DATA_ROOT or "")) == 5532


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name", ["cfp-fp", "cfp-ff"])
def test_real_cfp_protocols(name: str) -> None:
    p = load_protocol(name, DATA_ROOT or "")
    assert len(p) == 7000 and int(p.issame.sum()) == 3500
    assert np.bincount(p.fold).tolist() == [700] * 10
    assert all("/frontal/" in k for k in p.keys_a)
    second = "/profile/" if name == "cfp-fp" else "/frontal/"
    assert all(second in k for k in p.keys_b)


@pytest.mark.data
@needs_data
def test_real_celeba_keys() -> None:
    keys, ids = celeba_keys(DATA_ROOT or "")
    assert len(keys) == 6264 and len(set(ids.tolist())) == 299
