"""Feature payload codec: round trips, compression, and strict validation."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advface.service import payload
from advface.service.payload import PayloadError, decode, encode

from .conftest import feature_map


def test_roundtrip_fp16_and_fp32() -> None:
    z = feature_map(1, noise=0.3)
    out16 = decode(encode(z))
    assert out16.dtype == np.float32 and out16.shape == payload.FEATURE_SHAPE
    np.testing.assert_allclose(out16, z, rtol=1e-3, atol=1e-3)
    out32 = decode(encode(z, dtype="float32"))
    np.testing.assert_array_equal(out32, z)
    # A leading batch axis of 1 is accepted and dropped.
    np.testing.assert_array_equal(decode(encode(z[None], dtype="float32")), z)


def test_codecs_compress_relu_maps() -> None:
    z = feature_map(2, noise=0.3)
    raw = z.size * 2
    for codec in (payload.CODEC_ZLIB, payload.CODEC_SHUFFLE_ZLIB):
        data = encode(z, codec=codec)
        assert len(data) < raw
        np.testing.assert_allclose(decode(data), z, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize(
    "bad, code",
    [
        (np.zeros((64, 77, 76), np.float32), "invalid_shape"),
        (np.zeros((2, 64, 77, 77), np.float32), "invalid_shape"),
        (np.zeros((3, 160, 160), np.float32), "invalid_shape"),
    ],
)
def test_wrong_shape(bad: np.ndarray, code: str) -> None:
    with pytest.raises(PayloadError) as e:
        decode(encode(bad))
    assert e.value.code == code


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(value: float) -> None:
    z = feature_map(3)
    head = encode(z, dtype="float32", codec=payload.CODEC_RAW)
    arr = np.frombuffer(head[20:], np.float32).copy()
    arr[123] = value
    with pytest.raises(PayloadError) as e:
        decode(head[:20] + arr.tobytes())
    assert e.value.code == "non_finite"
    with pytest.raises(ValueError):
        encode(np.full((2, 2), value, np.float32))


def test_header_and_body_corruption() -> None:
    good = encode(feature_map(4))
    cases = {
        "short": good[:5],
        "magic": b"XXXX" + good[4:],
        "dtype": good[:4] + b"\x09" + good[5:],
        "codec": good[:5] + b"\x07" + good[6:],
        "ndim": good[:6] + b"\x09" + good[7:],
        "truncated": good[:-10],
        "trailing": good + b"\x00" * 3,
        "corrupt": good[:30] + bytes(b ^ 0xFF for b in good[30:60]) + good[60:],
    }
    for name, data in cases.items():
        with pytest.raises(PayloadError):
            decode(data)
        assert name


def test_zip_bomb_is_cut_off() -> None:
    # Declares (64,77,77) fp16 but inflates to 100x that: must stop at the declared size.
    head = struct.pack("<4sBBBB", payload.MAGIC, 1, payload.CODEC_ZLIB, 3, 0)
    head += struct.pack("<3I", 64, 77, 77)
    bomb = zlib.compress(b"\x00" * (64 * 77 * 77 * 2 * 100), 9)
    with pytest.raises(PayloadError, match="does not match"):
        decode(head + bomb)


def test_huge_declared_shape_rejected_before_allocation() -> None:
    head = struct.pack("<4sBBBB", payload.MAGIC, 2, payload.CODEC_RAW, 4, 0)
    head += struct.pack("<4I", 2**31, 2**31, 2**31, 2**31)
    with pytest.raises(PayloadError) as e:
        decode(head)
    assert e.value.code == "invalid_shape"


def test_encode_rejects_fp16_overflow_and_ints() -> None:
    with pytest.raises(ValueError, match="overflow"):
        encode(np.full((4,), 1e6, np.float32))
    with pytest.raises(ValueError, match="floating"):
        encode(np.zeros((4,), np.int32))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(data)


_GOOD = encode(feature_map(5), codec=payload.CODEC_ZLIB)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(_GOOD) - 1), st.integers(1, 255))
def test_single_byte_flips_never_crash(pos: int, xor: int) -> None:
    data = bytearray(_GOOD)
    data[pos] ^= xor
    try:
        out = decode(bytes(data))
    except PayloadError:
        return
    assert out.shape == payload.FEATURE_SHAPE and np.isfinite(out).all()
