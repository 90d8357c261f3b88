import json
import tarfile

import numpy as np
import pytest

from advface.pipelines import staging


@pytest.mark.parametrize(
    "kw",
    [
        {"datasets": ("imagenet",)},
        {"datasets": ()},
        {"quality": 0},
        {"part_mib": 30.0},
        {"part_mib": 64.0},
    ],
)
def test_stage_rejects_bad_settings_and_writes_nothing(tmp_path, kw):
    with pytest.raises(ValueError):
        staging.stage(tmp_path / "s", data_root=tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []


def test_stage_refuses_an_existing_folder(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(FileExistsError):
        staging.stage(tmp_path / "s", data_root=tmp_path)


def test_verify_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="part-00"):
        staging.verify(tmp_path)
    (tmp_path / "part-00").mkdir()
    manifest = {"format": staging.STAGE_FORMAT, "parts": {"part-00": {}, "part-01": {}}}
    (tmp_path / "part-00" / staging.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="part-01"):
        staging.verify(tmp_path)
    assert staging.verify(tmp_path, ["part-00"])["format"] == staging.STAGE_FORMAT
    with pytest.raises(ValueError, match="not a part"):
        (tmp_path / "part-07").mkdir()
        staging.verify(tmp_path, ["part-07"])


@pytest.mark.data
def test_stage_unstage_round_trip_celeba(data_root, tmp_path):
    """Stage CelebA, check the parts, unstage and rebuild the aligned cache from the crops."""
    from advface.data.prepare import load_aligned, prepare
    from advface.data.protocols import celeba_keys
    from advface.pipelines.data import aligned_images

    stage_dir = tmp_path / "stage"
    manifest = staging.stage(stage_dir, datasets=("celeba",), part_mib=47.0, progress=False)
    info = manifest["datasets"]["celeba"]
    assert info["images"] == len(celeba_keys(data_root)[0]) and info["jpeg_psnr_db"] > 40
    assert manifest["weights"]["min_cosine"] > 0.9999
    parts = sorted(p.name for p in stage_dir.iterdir())
    assert parts == list(manifest["parts"]) and len(parts) >= 3  # weights + two image parts
    for p in stage_dir.iterdir():
        assert sum(f.stat().st_size for f in p.iterdir()) <= 47 * 2**20
    with tarfile.open(stage_dir / "part-01" / "images.tar") as tar:
        assert tar.getnames()[0].startswith("celeba/img_mtcnn160/")

    root = staging.unstage(stage_dir, tmp_path / "root")
    assert staging.unstage(stage_dir, tmp_path / "root") == root  # same stage: reused
    keys, ids = celeba_keys(root)
    orig_keys, orig_ids = celeba_keys(data_root)
    assert keys == orig_keys and np.array_equal(ids, orig_ids)
    cache = tmp_path / "cache"
    prepare("celeba", data_root=root, cache=cache, progress=False)
    staged = load_aligned("celeba", cache=cache)
    original, _ = aligned_images("celeba", keys[:200], progress=False)
    diff = np.abs(staged.take(keys[:200]).astype(np.int16) - original).mean()
    assert diff < 2.0  # only the JPEG re-encoding separates them

    # A damaged or missing part is named, and unstaging writes nothing.
    blob = stage_dir / "part-01" / "images.tar"
    data = bytearray(blob.read_bytes())
    data[-5000] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="part-01"):
        staging.unstage(stage_dir, tmp_path / "root2")
    (stage_dir / "part-02" / "images.tar").unlink()
    with pytest.raises(ValueError, match="part-02"):
        staging.verify(stage_dir, ["part-02"])
    assert not (tmp_path / "root2").exists()
