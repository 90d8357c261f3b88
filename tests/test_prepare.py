"""Tests for advface.data.prepare: building, resuming and loading aligned caches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from advface.data.align import Aligner, UnreadableImageError
from advface.data.prepare import cache_name, load_aligned, prepare

DATA_ROOT = os.environ.get("ADVFACE_DATA_ROOT")
needs_data = pytest.mark.skipif(not DATA_ROOT, reason="ADVFACE_DATA_ROOT is not set")


class CountingAligner(Aligner):
    """Preset detection (a box in the middle) instead of MTCNN; counts calls, can fail."""

    def __init__(self, fail_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0
        self.fail_after = fail_after

    def detect(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # simulates the user stopping the build
        self.calls += 1
        h, w = rgb.shape[:2]
        if rgb[0, 0, 0] == 0:  # images whose first pixel is black have "no face"
            return []
        return [{"box": [w // 4, h // 4, w // 2, h // 2], "confidence": 0.99, "keypoints": {}}]


def write_image(path: Path, value: int, size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*size, 3), value, np.uint8)
    img[1:, :, 1] = 200
    cv2.imwrite(str(path), img)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    for i, key in enumerate(["ann/1.jpg", "ann/2.png", "bob/1.jpg", "bob/2.jpg", "cid/1.jpg"]):
        write_image(root / key, 0 if i == 2 else 50 + 10 * i)
    return root


def test_prepare_folder_and_load(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    al = CountingAligner()
    out = prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=al)
    assert out == cache / "aligned" / cache_name(folder)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "images.npy",
        "index.json",
    ]
    s = load_aligned(folder, cache=cache)
    assert s.images.shape == (5, 160, 160, 3) and s.images.dtype == np.uint8
    assert s.keys == ["ann/1.jpg", "ann/2.png", "bob/1.jpg", "bob/2.jpg", "cid/1.jpg"]
    assert s.found.tolist() == [True, True, False, True, True]
    assert s.n_fallback == 1
    assert s.labels == ["ann", "ann", "bob", "bob", "cid"]
    assert s.index_of("bob/2.jpg") == 3
    assert "bob/2.jpg" in s and "bob/9.jpg" not in s
    np.testing.assert_array_equal(s.take(["cid/1.jpg", "ann/1.jpg"]), s.images[[4, 0]])
    with pytest.raises(KeyError, match="nobody"):
        s.index_of("nobody/1.jpg")
    index = json.loads((out / "index.json").read_text())
    assert index["source_root"] == str(folder.resolve())
    assert index["settings"]["margin"] == 0.16 and index["n_fallback"] == 1
    assert index["boxes"][2] is None and index["boxes"][0] == [10, 12, 20, 24]
    # a complete cache with the same plan is reused without aligning again
    al2 = CountingAligner()
    prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=al2)
    assert al2.calls == 0


def test_resume_after_interruption(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=CountingAligner(3))
    out = cache / "aligned" / cache_name(folder)
    # nothing final was written; one complete chunk (2 images) survived
    assert not (out / "images.npy").exists() and not (out / "index.json").exists()
    assert sorted(p.name for p in (out / "partial").iterdir()) == ["chunk_00000.npz", "plan.json"]
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_aligned(folder, cache=cache)
    al = CountingAligner()
    prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=al)
    assert al.calls == 3  # only the images after the saved chunk
    assert not (out / "partial").exists()
    full = load_aligned(folder, cache=cache)
    ref = prepare(folder, cache=tmp_path / "ref", progress=False, aligner=CountingAligner())
    np.testing.assert_array_equal(full.images, np.load(ref / "images.npy"))


def test_changed_settings_restart_partial_build(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=CountingAligner(3))
    al = CountingAligner(margin=0.2)
    prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=al)
    assert al.calls == 5
    assert load_aligned(folder, cache=cache).meta["settings"]["margin"] == 0.2


def test_corrupt_image_names_file_and_keeps_progress(folder: Path, tmp_path: Path) -> None:
    (folder / "bob" / "2.jpg").write_bytes(b"\xff\xd8 truncated")
    cache = tmp_path / "cache"
    with pytest.raises(UnreadableImageError, match=r"bob[/\\]2.jpg"):
        prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=CountingAligner())
    write_image(folder / "bob" / "2.jpg", 90)
    al = CountingAligner()
    prepare(folder, cache=cache, progress=False, chunk_size=2, aligner=al)
    assert al.calls == 3


def test_truncated_images_are_rebuilt_not_loaded(folder: Path, tmp_path: Path) -> None:
    """A cut-off images.npy (valid header, missing bytes) is no finished cache: load_aligned
    names the file and the rebuild, and prepare builds it again."""
    from advface.data.prepare import _is_complete

    cache = tmp_path / "cache"
    out = prepare(folder, cache=cache, progress=False, aligner=CountingAligner())
    plan = {k: json.loads((out / "index.json").read_text())[k] for k in ("format", "n",
            "keys_sha1", "settings")}  # fmt: skip
    assert _is_complete(out, plan)
    images = out / "images.npy"
    whole = images.read_bytes()
    images.write_bytes(whole[:-1000])
    assert not _is_complete(out, plan)
    with pytest.raises(ValueError, match=r"images\.npy.*advface prepare .* --force"):
        load_aligned(folder, cache=cache)
    images.write_bytes(whole[:100])  # a header cut short
    assert not _is_complete(out, plan)
    images.write_bytes(whole + b"x")
    assert not _is_complete(out, plan)
    small = prepare(folder, cache=cache, limit=2, progress=False, aligner=CountingAligner())
    (small / "images.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"limit 2 --force"):
        load_aligned(folder, cache=cache, limit=2)
    al = CountingAligner()
    prepare(folder, cache=cache, progress=False, aligner=al)
    assert al.calls == 5 and images.read_bytes() == whole
    assert load_aligned(folder, cache=cache).images.shape == (5, 160, 160, 3)


def test_limit_and_keys_use_separate_caches(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = prepare(folder, cache=cache, limit=2, progress=False, aligner=CountingAligner())
    assert out.name.endswith("-limit2")
    assert load_aligned(folder, cache=cache, limit=2).keys == ["ann/1.jpg", "ann/2.png"]
    sub = ["cid/1.jpg", "ann/2.png"]
    out2 = prepare(folder, cache=cache, keys=sub, progress=False, aligner=CountingAligner())
    s = load_aligned(folder, cache=cache, keys=sub)
    assert s.keys == ["ann/2.png", "cid/1.jpg"] and s.labels == ["ann", "cid"]
    assert out2 != out
    with pytest.raises(FileNotFoundError, match="advface prepare"):
        load_aligned(folder, cache=cache)
    with pytest.raises(ValueError, match="not in dataset"):
        prepare(folder, cache=cache, keys=["zed/1.jpg"], progress=False)
    with pytest.raises(ValueError, match="limit"):
        prepare(folder, cache=cache, limit=0, progress=False)


def test_missing_cache_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="advface prepare lfw"):
        load_aligned("lfw", cache=tmp_path)


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("agedb", cache=tmp_path, data_root=tmp_path, progress=False)


def test_celeba_crops_are_loaded_and_resized(tmp_path: Path) -> None:
    base = tmp_path / "data" / "celeba"
    write_image(base / "img_mtcnn160" / "000001.jpg", 60, (160, 160))
    write_image(base / "img_mtcnn160" / "000002.jpg", 70, (100, 120))
    write_image(base / "img_mtcnn160" / "000003.jpg", 80, (160, 160))
    (base / "identity_CelebA.txt").write_text("000001.jpg 5\n000002.jpg 6\n000003.jpg 5\n")
    (base / "no_face.txt").write_text("000003.jpg\n")
    prepare("celeba", data_root=tmp_path / "data", cache=tmp_path / "c", progress=False)
    s = load_aligned("celeba", cache=tmp_path / "c")
    assert s.keys == ["000001.jpg", "000002.jpg"] and s.labels == [5, 6]
    assert s.images.shape == (2, 160, 160, 3) and s.found.all()
    assert s.meta["settings"]["mode"] == "crops"


def test_default_aligners_per_dataset(tmp_path: Path) -> None:
    from advface.data.prepare import dataset_spec

    write_image(tmp_path / "lfw" / "lfw-deepfunneled" / "Ann" / "Ann_0001.jpg", 90)
    proto = tmp_path / "cfp" / "Protocol"
    proto.mkdir(parents=True)
    (proto / "Pair_list_F.txt").write_text("1 ../Data/Images/001/frontal/01.jpg\n")
    (proto / "Pair_list_P.txt").write_text("1 ../Data/Images/001/profile/01.jpg\n")
    lfw = dataset_spec("lfw", data_root=tmp_path)
    assert lfw.prefer_center and lfw.fallback == "center-square"
    for k in ("001/frontal/01.jpg", "001/profile/01.jpg"):
        write_image(tmp_path / "cfp" / "Data" / "Images" / k, 90)
    cfp = dataset_spec("cfp", data_root=tmp_path)
    assert not cfp.prefer_center and cfp.fallback == "image"
    assert cfp.keys == ["001/frontal/01.jpg", "001/profile/01.jpg"]


def test_lfw_layout_with_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ["Ann/Ann_0001.jpg", "Bob/Bob_0001.jpg"]:
        write_image(tmp_path / "data" / "lfw" / "lfw-deepfunneled" / key, 90)
    monkeypatch.setenv("ADVFACE_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("ADVFACE_CACHE_DIR", str(tmp_path / "c"))
    prepare("lfw", progress=False, aligner=CountingAligner(prefer_center=True))
    s = load_aligned("lfw")
    assert s.keys == ["Ann/Ann_0001.jpg", "Bob/Bob_0001.jpg"]
    assert s.meta["settings"]["prefer_center"] is True


def test_cli_prepare_folder(folder: Path, tmp_path: Path) -> None:
    from advface.cli import app

    res = CliRunner().invoke(
        app,
        ["prepare", str(folder), "--cache-dir", str(tmp_path / "c"), "--limit", "2"],
    )
    assert res.exit_code == 0, res.output
    assert "2 images, 2 no-face fallbacks" in res.output  # flat images: MTCNN finds none
    assert "no face found in: ann/1.jpg, ann/2.png" in res.output
    bad = CliRunner().invoke(app, ["prepare", "agedb", "--cache-dir", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "unknown dataset" in bad.output
    res = CliRunner().invoke(app, ["prepare", "cfp", "--download", "--data-root", str(tmp_path)])
    assert res.exit_code == 2 and "only available for lfw" in res.output


@pytest.mark.data
@needs_data
def test_prepare_real_lfw_subset(tmp_path: Path) -> None:
    out = prepare("lfw", data_root=DATA_ROOT, cache=tmp_path, limit=12, progress=False)
    s = load_aligned("lfw", cache=tmp_path, limit=12)
    assert s.images.shape == (12, 160, 160, 3) and s.found.sum() >= 11
    assert json.loads((out / "index.json").read_text())["source_root"].endswith("lfw-deepfunneled")


@pytest.mark.data
@needs_data
@pytest.mark.parametrize(
    ("dataset", "protocols"), [("lfw", ["lfw"]), ("cfp", ["cfp-fp", "cfp-ff"])]
)
def test_shared_cache_covers_protocols(dataset: str, protocols: list[str]) -> None:
    """When the full cache was built (``advface prepare``), it holds every protocol image."""
    from advface.data.protocols import load_protocol

    try:
        s = load_aligned(dataset)
    except FileNotFoundError:
        pytest.skip(f"no aligned cache for {dataset}; run `advface prepare {dataset}`")
    assert s.images.shape[1:] == (160, 160, 3)
    for name in protocols:
        keys = load_protocol(name, DATA_ROOT or "", check_files=False).unique_keys()
        assert all(k in s for k in keys)
    assert s.take(s.keys[:3]).shape == (3, 160, 160, 3)


def test_source_fingerprint_follows_source_files_not_machines(tmp_path) -> None:
    import cv2

    from advface.data import prepare as prep

    folder = tmp_path / "people"
    for person, value in (("ann", 10), ("bob", 200)):
        (folder / person).mkdir(parents=True)
        cv2.imwrite(str(folder / person / "1.png"), np.full((40, 40, 3), value, np.uint8))
    keys = ["ann/1.png", "bob/1.png"]
    first = prep.source_fingerprint(folder, keys)
    assert len(first) == 16 and prep.source_fingerprint(folder, keys) == first
    assert prep.source_fingerprint(folder, keys[:1]) != first  # other faces
    cv2.imwrite(str(folder / "bob" / "1.png"), np.full((40, 40, 3), 201, np.uint8))
    prep._source_fingerprint.cache_clear()  # memoised per process
    assert prep.source_fingerprint(folder, keys) != first  # a source replaced under its name
    with pytest.raises(ValueError, match="cannot read the source image of 'cy/1.png'"):
        prep.source_fingerprint(folder, ["cy/1.png"])
