"""Compact, validated wire/storage format for feature maps.

Layout (little endian)::

    magic   4s   b"AFZ1"
    dtype   u1   1 = float16, 2 = float32, 3 = uint8 affine per channel (see below)
    codec   u1   0 = raw, 1 = zlib, 2 = byte-shuffled zlib
    ndim    u1   1..4
    pad     u1   0
    dims    ndim x u4
    body    bytes (compressed as ``codec`` says)

``uint8`` (dtype 3): the body starts with one float32 offset and one float32 scale per channel
(each HxW plane: G = product of all dims but the last two), then the uint8 codes; a value is
``offset + code * scale``, with offset the plane's minimum and scale (max - min) / 255, so the
error is at most scale / 2 per value (zeros of a ReLU plane stay exact: its minimum is 0).

Default: fp16 + zlib level 1. On real E(x) maps of LFW faces (about 48% zeros after the ReLU)
that is about 424 KB of the 759 KB of raw fp16 (56%); level 6 saves only 5% more at about twice
the CPU time, and byte shuffling (codec 2, kept for other feature sources) gained nothing there.
Decoding never trusts the header: sizes are bounded before anything is allocated and the body is
inflated with a hard output limit (no zip bombs).
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import numpy as np

MAGIC: Final = b"AFZ1"
_HEAD = struct.Struct("<4sBBBB")
_DTYPES: Final = {1: np.dtype("<f2"), 2: np.dtype("<f4"), 3: np.dtype("u1")}
_DTYPE_CODES: Final = {np.dtype("<f2"): 1, np.dtype("<f4"): 2}
DTYPE_UINT8 = 3
#: Stored forms of a feature map (``encode``'s ``dtype``).
DTYPES: Final = ("float16", "float32", "uint8")
CODEC_RAW, CODEC_ZLIB, CODEC_SHUFFLE_ZLIB = 0, 1, 2
# Client feature maps E(x): (64, 77, 77) for one 160x160 face (paper Sec. 3.1, split at conv2d_2b).
FEATURE_SHAPE: Final = (64, 77, 77)
# Upper bound on decoded elements (one feature map and some slack); guards against huge headers.
MAX_ELEMENTS: Final = 4 * 64 * 77 * 77


class PayloadError(ValueError):
    """A payload that cannot be decoded or does not hold a valid feature map."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(
    z: np.ndarray, *, dtype: str = "float16", codec: int = CODEC_ZLIB, level: int = 1
) -> bytes:
    """Serialise a finite float array (e.g. one (64,77,77) feature map) to bytes."""
    arr = np.asarray(z)
    if arr.dtype.kind != "f":
        raise ValueError(f"feature map must be floating point, got {arr.dtype}")
    if not 1 <= arr.ndim <= 4:
        raise ValueError(f"feature map must have 1..4 dimensions, got {arr.ndim}")
    if not np.isfinite(arr).all():
        raise ValueError("feature map contains NaN or Inf")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "uint8":
        code, out, raw, itemsize = DTYPE_UINT8, arr, _quantise(arr), 1
    else:
        target = np.dtype("<f2") if dtype == "float16" else np.dtype("<f4")
        with np.errstate(over="ignore"):  # overflow is detected just below
            out = arr.astype(target)
        if not np.isfinite(out).all():
            raise ValueError("feature map values overflow float16; use dtype='float32'")
        code, raw = _DTYPE_CODES[target], np.ascontiguousarray(out).tobytes()
        itemsize = target.itemsize
    if codec == CODEC_SHUFFLE_ZLIB:
        raw = _shuffle(raw, itemsize)
    if codec in (CODEC_ZLIB, CODEC_SHUFFLE_ZLIB):
        raw = zlib.compress(raw, level)
    elif codec != CODEC_RAW:
        raise ValueError(f"unknown codec {codec}")
    head = _HEAD.pack(MAGIC, code, codec, out.ndim, 0)
    return head + struct.pack(f"<{out.ndim}I", *out.shape) + raw


def decode(data: bytes, *, expected_shape: tuple[int, ...] | None = FEATURE_SHAPE) -> np.ndarray:
    """Parse and validate a payload; return float32 of ``expected_shape`` (leading 1s dropped).

    Raises ``PayloadError`` (never anything else) on any malformed input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError("invalid_payload", "payload must be bytes")
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise PayloadError("invalid_payload", f"payload too short ({len(data)} bytes)")
    magic, dtype_code, codec, ndim, pad = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError("invalid_payload", "bad magic: not an advface feature payload")
    if dtype_code not in _DTYPES:
        raise PayloadError("invalid_dtype", f"unsupported dtype code {dtype_code}")
    if codec not in (CODEC_RAW, CODEC_ZLIB, CODEC_SHUFFLE_ZLIB):
        raise PayloadError("invalid_payload", f"unknown codec {codec}")
    if not 1 <= ndim <= 4 or pad != 0:
        raise PayloadError("invalid_shape", f"bad header: ndim={ndim}")
    dims_end = _HEAD.size + 4 * ndim
    if len(data) < dims_end:
        raise PayloadError("invalid_payload", "truncated header")
    shape = struct.unpack_from(f"<{ndim}I", data, _HEAD.size)
    n = 1
    for d in shape:
        n *= d
    if n == 0 or n > MAX_ELEMENTS:
        raise PayloadError("invalid_shape", f"shape {tuple(shape)} has an invalid size")
    if expected_shape is not None:
        squeezed = tuple(shape)
        while len(squeezed) > len(expected_shape) and squeezed[0] == 1:
            squeezed = squeezed[1:]
        if squeezed != tuple(expected_shape):
            raise PayloadError(
                "invalid_shape",
                f"feature map shape {tuple(shape)} != expected {tuple(expected_shape)}",
            )
    dtype = _DTYPES[dtype_code]
    groups = _groups(shape) if dtype_code == DTYPE_UINT8 else 0
    nbytes = n * dtype.itemsize + 8 * groups
    body = data[dims_end:]
    raw = body if codec == CODEC_RAW else _inflate(body, nbytes)
    if len(raw) != nbytes:
        raise PayloadError("invalid_payload", f"body holds {len(raw)} bytes, header says {nbytes}")
    if codec == CODEC_SHUFFLE_ZLIB:
        raw = _unshuffle(raw, dtype.itemsize)
    if dtype_code == DTYPE_UINT8:
        arr = _dequantise(raw, tuple(shape), groups)
    else:
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if not np.isfinite(arr).all():
        raise PayloadError("non_finite", "feature map contains NaN or Inf")
    out = arr.astype(np.float32)
    if expected_shape is not None:
        out = out.reshape(expected_shape)
    return out


def stored_dtype(data: bytes) -> str:
    """``float16``, ``float32`` or ``uint8``: the form a payload holds (header only)."""
    if len(data) < _HEAD.size or data[:4] != MAGIC:
        raise PayloadError("invalid_payload", "bad magic: not an advface feature payload")
    code = data[4]
    names = {1: "float16", 2: "float32", DTYPE_UINT8: "uint8"}
    if code not in names:
        raise PayloadError("invalid_dtype", f"unsupported dtype code {code}")
    return names[code]


def _groups(shape: tuple[int, ...] | list[int]) -> int:
    """Quantisation groups of a shape: one per HxW plane (1 for a 1-D or 2-D array)."""
    g = 1
    for d in tuple(shape)[:-2]:
        g *= d
    return g


def _quantise(arr: np.ndarray) -> bytes:
    """Per-plane affine uint8: float32 offsets, float32 scales, then the codes."""
    a = np.asarray(arr, np.float64)
    g = _groups(a.shape)
    planes = a.reshape(g, -1)
    lo, hi = planes.min(axis=1), planes.max(axis=1)
    scale = (hi - lo) / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[:, None] > 0, (planes - lo[:, None]) / scale[:, None], 0.0)
    codes = np.clip(np.rint(q), 0, 255).astype(np.uint8)
    params = np.concatenate([lo, scale]).astype("<f4")
    if not np.isfinite(params).all():
        raise ValueError("feature map values overflow float32 quantisation parameters")
    return params.tobytes() + codes.tobytes()


def _dequantise(raw: bytes, shape: tuple[int, ...], groups: int) -> np.ndarray:
    params = np.frombuffer(raw, "<f4", count=2 * groups)
    lo, scale = params[:groups].astype(np.float32), params[groups:].astype(np.float32)
    if not (np.isfinite(params).all() and (scale >= 0).all()):
        raise PayloadError("invalid_payload", "bad quantisation parameters")
    codes = np.frombuffer(raw, np.uint8, offset=8 * groups).reshape(groups, -1)
    return (lo[:, None] + codes.astype(np.float32) * scale[:, None]).reshape(shape)


def _inflate(body: bytes, nbytes: int) -> bytes:
    d = zlib.decompressobj()
    try:
        # max_length caps the output: a bomb stops at nbytes + 1 and is rejected below.
        raw = d.decompress(body, nbytes + 1)
        if len(raw) <= nbytes:
            raw += d.flush()
    except zlib.error as exc:
        raise PayloadError("invalid_payload", f"corrupt compressed body: {exc}") from None
    if len(raw) > nbytes or d.unconsumed_tail or not d.eof:
        raise PayloadError("invalid_payload", "compressed body does not match the header size")
    if d.unused_data:
        raise PayloadError("invalid_payload", "trailing bytes after the compressed body")
    return raw


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    return np.ascontiguousarray(a.T).tobytes()


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(a.T).tobytes()
