import json
import tarfile

import numpy as np
import pytest
import torch

from advface.pipelines import staging


@pytest.mark.parametrize(
    "kw",
    [
        {"datasets": ("imagenet",)},
        {"datasets": ()},
        {"quality": 0},
        {"part_mib": 7.0},
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


def _manifest(tmp_path, parts: dict, weights: list[str]) -> None:
    manifest = {"format": staging.STAGE_FORMAT, "parts": parts, "weights": {"files": weights}}
    (tmp_path / "part-00").mkdir(exist_ok=True)
    (tmp_path / "part-00" / staging.MANIFEST).write_text(json.dumps(manifest))


def test_verify_names_what_is_missing(tmp_path):
    from advface.fileio import sha256_file

    with pytest.raises(FileNotFoundError, match="part-00"):
        staging.verify(tmp_path)
    (tmp_path / "part-00").mkdir()
    shard = tmp_path / "part-00" / "facenet-fp16-00.safetensors"
    shard.write_bytes(b"weights")
    files = {shard.name: sha256_file(shard)}
    _manifest(tmp_path, {"part-00": files, "part-01": {}}, [f"part-00/{shard.name}"])
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
    manifest = staging.stage(stage_dir, datasets=("celeba",), part_mib=20.0, progress=False)
    info = manifest["datasets"]["celeba"]
    assert info["images"] == len(celeba_keys(data_root)[0]) and info["jpeg_psnr_db"] > 40
    assert manifest["weights"]["min_cosine"] > 0.9999
    parts = sorted(p.name for p in stage_dir.iterdir())
    n_weights = len(manifest["weights"]["files"])
    assert n_weights == 3  # 47 MB of fp16 weights in parts of 20 MiB
    assert parts == list(manifest["parts"]) and len(parts) >= n_weights + 2  # two image parts
    for p in stage_dir.iterdir():
        assert sum(f.stat().st_size for f in p.iterdir()) <= 20 * 2**20
    # The faces start in the room the last weight shard leaves.
    first_images = stage_dir / f"part-{n_weights - 1:02d}" / "images.tar"
    with tarfile.open(first_images) as tar:
        assert tar.getnames()[0].startswith("celeba/img_mtcnn160/")

    root = staging.unstage(stage_dir, tmp_path / "root")
    from safetensors.torch import load_file

    merged = load_file(str(root / staging.WEIGHTS_FILE))
    _, state = staging._facenet_fp16(None)
    assert sorted(merged) == sorted(state) and all(torch.equal(merged[k], state[k]) for k in state)
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
    data = bytearray(first_images.read_bytes())
    data[-5000] ^= 0xFF
    first_images.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"part-{n_weights - 1:02d}"):
        staging.unstage(stage_dir, tmp_path / "root2")
    second = f"part-{n_weights:02d}"
    (stage_dir / second / "images.tar").unlink()
    with pytest.raises(ValueError, match=second):
        staging.verify(stage_dir, [second])
    assert not (tmp_path / "root2").exists()


def test_manifest_must_name_weight_shards_of_its_parts(tmp_path):
    _manifest(tmp_path, {"part-00": {}}, [])
    with pytest.raises(ValueError, match="weights.files"):
        staging.read_manifest(tmp_path)
    _manifest(tmp_path, {"part-00": {}}, ["part-00/../../etc/passwd"])
    with pytest.raises(ValueError, match="not a file of the stage"):
        staging.read_manifest(tmp_path)


def test_weights_split_into_shards_merge_back(tmp_path):
    from safetensors.torch import load_file

    state = {f"w{i}": torch.full((1000,), float(i), dtype=torch.float16) for i in range(10)}
    shards = staging._shards(state, 4 * (2000 + staging._TENSOR_HEADER))
    assert [len(x) for x in shards] == [4, 4, 2]
    folders = [tmp_path / f"part-{i:02d}" for i in range(3)]
    for f in folders:
        f.mkdir()
    names = staging._write_shards(shards, folders)
    assert names[1] == "part-01/facenet-fp16-01.safetensors"
    staging._merge_shards([tmp_path / n for n in names], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert sorted(merged) == sorted(state)
    assert all(torch.equal(merged[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="does not fit"):
        staging._shards(state, 100)
    (tmp_path / names[2]).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="not a readable weights shard"):
        staging._merge_shards([tmp_path / n for n in names], tmp_path / "again.safetensors")
