"""E for devices without PyTorch: exported once to ONNX, run with OpenCV's dnn module.

A client needs only numpy, OpenCV and httpx to enroll: MTCNN (``advface.data.align``) and E
both run through ``cv2.dnn``. ``export_extractor`` writes a folder holding ``extractor.onnx``
and ``config.json`` (the model version the service records with each template, the ONNX file's
sha256, input and output conventions); :class:`OnnxExtractor` loads it, checks the file against
its digest, and maps aligned uint8 faces to feature maps. Importing this module imports no torch.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from advface.fileio import atomic_folder, sha256_file

ONNX_FILE = "extractor.onnx"
CONFIG_FILE = "config.json"
FORMAT = "advface-extractor-onnx/1"
FACE_SHAPE = (160, 160, 3)
OPSET = 17


def export_extractor(
    extractor: Any, out: str | Path, *, model_version: str, overwrite: bool = False
) -> dict[str, Any]:
    """Write E (a torch module mapping (N,3,160,160) FaceNet input to (N,64,77,77)) to the
    folder ``out``, whole or not at all; returns its config. Needs the ``onnx`` package
    (``advface[export]``)."""
    import shutil
    import warnings

    import torch

    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} exists (overwrite replaces an earlier export)")
        _check_is_export(out)  # never delete a folder that is not ours
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ValueError(
            "exporting to ONNX needs the onnx package: pip install 'advface[export]'"
        ) from None
    with atomic_folder(out) as tmp:
        onnx_path = tmp / ONNX_FILE
        was_training = extractor.training
        extractor.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # The TorchScript exporter is chosen on purpose (deprecated, but it needs
                # only the onnx package); its warning would only alarm the user.
                warnings.simplefilter("ignore", DeprecationWarning)
                # The TorchScript exporter: no onnxscript needed (torch >= 2.5 defaults to
                # the dynamo one and takes ``dynamo``; older versions have only this one).
                legacy = {"dynamo": False} if "dynamo" in _parameters(torch.onnx.export) else {}
                torch.onnx.export(
                    extractor,
                    (torch.zeros(1, 3, *FACE_SHAPE[:2]),),
                    str(onnx_path),
                    **legacy,
                    input_names=["x"],
                    output_names=["z"],
                    dynamic_axes={"x": {0: "n"}, "z": {0: "n"}},
                    opset_version=OPSET,
                )
        finally:
            extractor.train(was_training)
        config = {
            "format": FORMAT,
            "model_version": model_version,
            "onnx_sha256": sha256_file(onnx_path),
            "input": "aligned uint8 RGB faces (N,160,160,3), fed as (x - 127.5) / 128, NCHW",
            "output": "E(x) float32 (N,64,77,77)",
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if out.exists():
            # Set aside, not deleted, until the new export is in place.
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
    if out.with_name(f".{out.name}.old").exists():
        shutil.rmtree(out.with_name(f".{out.name}.old"))
    return config


def _parameters(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def _check_is_export(out: Path) -> None:
    """Refuse to replace ``out`` unless it is an earlier export (its two files, nothing else)."""
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"{out} is not a folder written by advface export-extractor")
    names = {p.name for p in out.iterdir()}
    config = out / CONFIG_FILE
    try:
        ours = (
            names == {CONFIG_FILE, ONNX_FILE}
            and json.loads(config.read_text()).get("format") == FORMAT
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"{out} is not a folder written by advface export-extractor: not replaced "
            "(choose another --out)"
        )


class OnnxExtractor:
    """E from an exported folder, run by ``cv2.dnn``: ``extractor(faces)`` maps aligned uint8
    RGB faces (N,160,160,3) to float32 feature maps (N,64,77,77).

    ``model_version`` is the version of E the service stores templates under; a client whose E
    differs from the server's gets templates that match nothing.
    """

    takes_uint8_faces = True  # the SDK hands it aligned faces, not a torch tensor

    def __init__(self, folder: str | Path) -> None:
        import cv2

        folder = Path(folder)
        config_path, onnx_path = folder / CONFIG_FILE, folder / ONNX_FILE
        for path in (config_path, onnx_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: {folder} is not an exported extractor "
                    "(advface export-extractor)"
                )
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_path} cannot be read as JSON: {exc}") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: not an advface extractor config ({FORMAT})")
        if not isinstance(config.get("model_version"), str):
            raise ValueError(f"{config_path}: no model_version")
        if sha256_file(onnx_path) != config.get("onnx_sha256"):
            raise ValueError(f"{onnx_path} does not match the sha256 in {config_path}")
        self.config = config
        self.model_version: str = config["model_version"]
        try:
            self._net = cv2.dnn.readNetFromONNX(str(onnx_path))
        except cv2.error as exc:
            raise ValueError(f"{onnx_path}: OpenCV cannot load it ({exc})") from None
        # One network, setInput then forward: threads sharing a client take turns.
        self._lock = threading.Lock()

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        faces = np.asarray(faces)
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != FACE_SHAPE:
            raise ValueError(
                f"expected aligned uint8 faces (N,160,160,3), got {faces.dtype} {faces.shape}"
            )
        # FaceNet's input convention (advface.models.facenet.preprocess), without torch.
        x = ((faces.astype(np.float32) - 127.5) / 128.0).transpose(0, 3, 1, 2)
        with self._lock:
            self._net.setInput(np.ascontiguousarray(x))
            return np.asarray(self._net.forward(), np.float32)
