"""Property: no malformed enroll request changes the database or causes a 5xx."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advface.service import payload
from advface.service.backend import Backend

from .conftest import Harness, feature_map, make_harness

_GOOD = payload.encode(feature_map(1, noise=0.1), dtype="float16")
_HEAD = 8 + 3 * 4


def _header(dtype: int, codec: int, dims: list[int]) -> bytes:
    return struct.pack("<4sBBBB", payload.MAGIC, dtype, codec, len(dims), 0) + struct.pack(
        f"<{len(dims)}I", *dims
    )


random_bytes = st.binary(max_size=4096)
# Valid header, random body.
bad_body = st.builds(lambda b: _GOOD[:_HEAD] + b, st.binary(max_size=2048))
# A valid payload with one header byte changed (magic, dtype, codec, ndim, pad, dims).
header_flip = st.builds(
    lambda pos, val: _GOOD[:pos] + bytes([val]) + _GOOD[pos + 1 :],
    st.integers(0, _HEAD - 1),
    st.integers(0, 255),
).filter(lambda b: b != _GOOD)
# Any declared shape other than the feature shape, with a plausible raw body.
wrong_shape = (
    st.lists(st.integers(0, 80), min_size=1, max_size=4)
    .filter(lambda d: tuple(d[-3:]) != payload.FEATURE_SHAPE or len(d) == 4 and d[0] != 1)
    .map(lambda d: _header(2, payload.CODEC_RAW, d) + b"\x00" * 64)
)
# The right shape with NaN/Inf/huge values in an otherwise valid float32 map.
non_finite = st.builds(
    lambda idx, v: _poke(idx, v),
    st.integers(0, 64 * 77 * 77 - 1),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 3.0e38]),
)
truncated = st.integers(0, len(_GOOD) - 1).map(lambda n: _GOOD[:n])

_RAW32 = bytearray(payload.encode(feature_map(2), dtype="float32", codec=payload.CODEC_RAW))


def _poke(index: int, value: float) -> bytes:
    data = bytearray(_RAW32)
    off = _HEAD + 4 * index
    data[off : off + 4] = np.float32(value).tobytes()
    if value == 3.0e38:  # one huge value alone is finite: make the whole map huge
        arr = np.frombuffer(bytes(data[_HEAD:]), np.float32).copy()
        arr[:] = 3.0e38
        data[_HEAD:] = arr.tobytes()
    return bytes(data)


malformed = st.one_of(random_bytes, bad_body, header_flip, wrong_shape, non_finite, truncated)


@pytest.fixture(scope="module")
def prop_harness(tmp_path_factory: pytest.TempPathFactory, toy: Backend) -> Iterator[Harness]:
    url = f"sqlite:///{tmp_path_factory.mktemp('prop') / 'service.db'}"
    h, cm = make_harness(url, toy)
    h.subject("victim")
    assert h.enroll("victim", feature_map(1)).status_code == 201
    yield h
    cm.__exit__(None, None, None)
    h.store.close()


def _snapshot(h: Harness) -> tuple[object, ...]:
    with h.store.engine.connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(text("SELECT id, request_sha256 FROM templates ORDER BY id")).all()
    h.service.refresh()
    return tuple(map(tuple, rows)), h.service.index.count()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=malformed,
    idem=st.one_of(
        st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8)
    ),
    content_type=st.sampled_from(["application/octet-stream", None]),
)
def test_malformed_enroll_leaves_db_unchanged(
    prop_harness: Harness, body: bytes, idem: str | None, content_type: str | None
) -> None:
    h = prop_harness
    before = _snapshot(h)
    headers = h.h()
    if content_type:
        headers["Content-Type"] = content_type
    if idem is not None:
        headers["Idempotency-Key"] = idem
    r = h.client.post("/v1/subjects/victim/templates", content=body, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["status"] == r.status_code and err["code"]
    assert _snapshot(h) == before
