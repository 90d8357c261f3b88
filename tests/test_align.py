"""Tests for advface.data.align: crop convention, face choice, fallback, unreadable files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advface.data.align import (
    Aligner,
    UnreadableImageError,
    crop_resize,
    decode_rgb,
    grow_box,
    read_rgb,
)

DATA_ROOT = os.environ.get("ADVFACE_DATA_ROOT")
needs_data = pytest.mark.skipif(not DATA_ROOT, reason="ADVFACE_DATA_ROOT is not set")


class StubAligner(Aligner):
    """An Aligner whose detector returns preset detections (no MTCNN)."""

    def __init__(self, detections: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detections = detections

    def detect(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        return list(self.detections)


def face(x: int, y: int, w: int, h: int, conf: float) -> dict[str, Any]:
    return {"box": [x, y, w, h], "confidence": conf, "keypoints": {}}


def gradient_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


def test_grow_box_adds_margin_of_mean_side() -> None:
    # mean side (40 + 60) / 2 = 50, 16% of it = 8 on each side
    assert grow_box((10, 20, 40, 60), 0.16, 200, 200) == (2, 12, 58, 88)


def test_grow_box_clips_to_image() -> None:
    assert grow_box((0, 0, 50, 50), 0.16, 55, 52) == (0, 0, 55, 52)
    with pytest.raises(ValueError, match="outside"):
        grow_box((300, 300, 10, 10), 0.16, 100, 100)


def test_most_confident_face_is_chosen_and_cropped() -> None:
    img = gradient_image(120, 100)
    al = StubAligner([face(5, 5, 20, 20, 0.95), face(40, 50, 40, 50, 0.99)])
    res = al(img)
    assert res.found and res.box == (40, 50, 40, 50)
    m = 0.16 * 45  # 7.2 -> rounds to 7 on each side, clipped at the right/bottom edge
    assert res.crop == (33, 43, min(100, round(80 + m)), min(120, round(100 + m)))
    assert res.image.shape == (160, 160, 3) and res.image.dtype == np.uint8
    expected = cv2.resize(img[43:107, 33:87], (160, 160), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(res.image, expected)


def test_prefer_center_picks_face_nearest_centre() -> None:
    img = gradient_image(100, 100)
    dets = [face(0, 0, 30, 30, 0.999), face(35, 35, 30, 30, 0.95), face(40, 40, 20, 20, 0.5)]
    assert StubAligner(dets)(img).box == (0, 0, 30, 30)
    # the 0.5 face is exactly centred but below the confidence threshold
    assert StubAligner(dets, prefer_center=True)(img).box == (35, 35, 30, 30)


def test_fallback_is_centred_square_and_flagged() -> None:
    img = gradient_image(100, 200)
    al = StubAligner([face(10, 10, 30, 30, 0.89)])
    res = al(img)
    assert not res.found and res.box is None and res.confidence == 0.0
    assert res.crop == (67, 17, 132, 82)  # 65 = 0.65 * 100 px, centred
    assert res.image.shape == (160, 160, 3)
    assert StubAligner([])(img).found is False
    whole = StubAligner([], fallback="image")(img)
    assert not whole.found and whole.crop == (0, 0, 200, 100)
    # 200x100 -> 160x160 enlarges vertically, so "auto" interpolation is bilinear
    expected = cv2.resize(img, (160, 160), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(whole.image, expected)
    assert StubAligner([], fallback="image").settings()["fallback"] == "whole image"


def test_interpolation_auto_uses_area_when_shrinking() -> None:
    img = gradient_image(400, 300)
    out = crop_resize(img, (0, 0, 300, 400), 160, "auto")
    np.testing.assert_array_equal(out, cv2.resize(img, (160, 160), interpolation=cv2.INTER_AREA))
    same = crop_resize(img, (10, 10, 170, 170), 160, "auto")
    np.testing.assert_array_equal(same, img[10:170, 10:170])


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(20, 300),
    w=st.integers(20, 300),
    box=st.tuples(
        st.integers(0, 250), st.integers(0, 250), st.integers(1, 200), st.integers(1, 200)
    ),
)
def test_crop_always_inside_image(h: int, w: int, box: tuple[int, int, int, int]) -> None:
    x, y, bw, bh = box
    if x >= w or y >= h:
        return
    res = StubAligner([face(x, y, bw, bh, 1.0)], size=32)(np.zeros((h, w, 3), np.uint8))
    x0, y0, x1, y1 = res.crop
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert res.image.shape == (32, 32, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 4},
        {"margin": -0.1},
        {"min_confidence": 1.5},
        {"fallback_fraction": 0.0},
        {"fallback": "black"},
        {"interpolation": "lanczos9"},
        {"min_face_size": 5},
    ],
)
def test_invalid_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Aligner(**kwargs)


def test_rejects_non_rgb_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        StubAligner([])(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        StubAligner([])(np.zeros((10, 10, 4), np.uint8))


def test_read_rgb_colour_order_and_grayscale(tmp_path: Path) -> None:
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    assert read_rgb(tmp_path / "red.png")[0, 0].tolist() == [255, 0, 0]
    cv2.imwrite(str(tmp_path / "gray.png"), np.full((8, 9), 7, np.uint8))
    assert read_rgb(tmp_path / "gray.png").shape == (8, 9, 3)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage"])
def test_corrupt_file_error_names_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken_0001.jpg"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match="broken_0001.jpg"):
        Aligner().align_file(path)


def test_missing_file_error_names_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match="nope.jpg"):
        read_rgb(tmp_path / "nope.jpg")


def test_real_mtcnn_finds_no_face_in_flat_image() -> None:
    al = Aligner()
    res = al(np.full((120, 90, 3), 128, np.uint8))
    assert not res.found
    assert res.image.shape == (160, 160, 3)
    assert al.settings()["interpolation"] == "auto"


@pytest.mark.data
@needs_data
def test_align_real_lfw_images() -> None:
    folder = Path(DATA_ROOT or "") / "lfw" / "lfw-deepfunneled"
    files = sorted(folder.glob("A*/*.jpg"))[:20]
    al = Aligner(prefer_center=True)
    results = [al.align_file(f) for f in files]
    assert sum(r.found for r in results) >= 19
    for r in results:
        assert r.image.shape == (160, 160, 3) and r.image.dtype == np.uint8
        if r.found:
            # LFW faces are centred: the chosen crop's centre is near the image centre
            x0, y0, x1, y1 = r.crop
            assert abs((x0 + x1) / 2 - 112) < 40 and abs((y0 + y1) / 2 - 112) < 40


@pytest.mark.data
@needs_data
def test_celeba_crops_follow_same_convention() -> None:
    """Re-detecting a face in a CelebA crop and growing it by the convention's margin should
    give back (nearly) the whole crop, if the crops and our aligner share the convention."""
    folder = Path(DATA_ROOT or "") / "celeba" / "img_mtcnn160"
    files = sorted(folder.glob("*.jpg"))[:10]
    al = Aligner()
    ious = []
    for f in files:
        rgb = read_rgb(f)
        face_ = al.choose(al.detect(rgb), rgb.shape[1], rgb.shape[0])
        if face_ is None:
            continue
        x, y, w, h = face_["box"]
        m = 0.16 * (w + h) / 2
        gx0, gy0, gx1, gy1 = x - m, y - m, x + w + m, y + h + m  # unclipped grown box
        ix = max(0.0, min(gx1, 160) - max(gx0, 0))
        iy = max(0.0, min(gy1, 160) - max(gy0, 0))
        inter = ix * iy
        union = (gx1 - gx0) * (gy1 - gy0) + 160 * 160 - inter
        ious.append(inter / union)
    assert len(ious) >= 8
    assert float(np.median(ious)) > 0.7


def test_decode_rgb_reads_encoded_bytes_and_names_bad_ones() -> None:
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    ok, png = cv2.imencode(".png", bgr)
    assert ok and decode_rgb(png.tobytes())[0, 0].tolist() == [0, 0, 255]
    assert decode_rgb(png)[0, 0].tolist() == [0, 0, 255]  # a uint8 buffer too
    for bad in (b"", b"garbage"):
        with pytest.raises(UnreadableImageError, match="upload.jpg"):
            decode_rgb(bad, "upload.jpg")
