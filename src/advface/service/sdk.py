"""Python client of the template service.

On the device: image (path or array) -> MTCNN alignment -> E -> compact payload -> server.
The raw image and the full embedding never leave the client; only E(x) does, and the server
protects it before storing (paper Fig. 1/2).

    client = AdvFaceClient("http://127.0.0.1:8000", api_key)
    client.create_subject("alice")
    client.enroll("alice", "alice_1.jpg")
    client.verify("alice", "probe.jpg").match

Without PyTorch on the device, run E from an exported folder (``advface export-extractor``)
through OpenCV: ``AdvFaceClient(url, key, extractor=OnnxExtractor("e-onnx"))``
(:mod:`advface.service.extractor_onnx`); this module imports torch only for a torch E.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from advface.service import payload
from advface.service.auth import API_KEY_HEADER, MODEL_HEADER

ImageLike = str | Path | bytes | np.ndarray


def path_segment(value: str) -> str:
    """``value`` as exactly one URL path segment.

    Every reserved character is percent-encoded ("/" too), and so are dots: "." and ".." are
    dot-segments that HTTP clients resolve away, so an id like "x/../victim" or ".." would
    otherwise address another resource.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("an id must be a non-empty string")
    return quote(value, safe="").replace(".", "%2E")


def _check_base_url(base_url: str) -> None:
    """Refuse a base URL that is not http(s)://host[:port][/path] before any request."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"the service URL {base_url!r} is not a URL: {exc}") from None
    if url.userinfo:  # it would end up in error messages and logs
        raise ValueError("the service URL must not hold credentials (the API key is api_key)")
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"the service URL must be http://HOST[:PORT] or https://HOST[:PORT], got {base_url!r}"
        )


# -- exceptions -----------------------------------------------------------------------------
class AdvFaceServiceError(Exception):
    """An error answered by the service (or the failure to reach it)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        # status 0: no HTTP answer at all (the service could not be reached)
        super().__init__(f"{code}: {message}" if status == 0 else f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class AuthenticationError(AdvFaceServiceError):
    """Missing, malformed or revoked API key (401)."""


class NotFoundError(AdvFaceServiceError):
    """Unknown subject or template (404)."""


class ConflictError(AdvFaceServiceError):
    """Subject exists, idempotency key reused, or no templates to verify against (409)."""


class InvalidRequestError(AdvFaceServiceError):
    """The service rejected the input (400, 413, 415, 422)."""


class ServiceUnavailableError(AdvFaceServiceError):
    """Unreachable, not ready, or overloaded (connection errors, 502-504), after retries."""


class ServerError(AdvFaceServiceError):
    """An unexpected server-side failure (500)."""


class NoFaceError(ValueError):
    """MTCNN found no face in an image (blank, noise, text...): nothing is sent."""


def _error_class(status: int) -> type[AdvFaceServiceError]:
    if status == 401:
        return AuthenticationError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status in (502, 503, 504):
        return ServiceUnavailableError
    if 400 <= status < 500:
        return InvalidRequestError
    return ServerError


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    template_id: str
    subject_id: str
    protection: str
    protection_params: dict[str, Any]
    model_version: str
    created_at: str
    replayed: bool = False


@dataclass(frozen=True)
class Verification:
    subject_id: str
    score: float
    match: bool
    threshold: float
    templates: int


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    score: float
    template_id: str
    match: bool


@dataclass(frozen=True)
class Subject:
    subject_id: str
    created_at: str
    templates: int


class AdvFaceClient:
    """Client of one service for one tenant (API key).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: the tenant's key (``advface keys create``).
        extractor: E: a torch module, images (N,3,160,160) preprocessed -> (N,64,77,77), or
            an :class:`~advface.service.extractor_onnx.OnnxExtractor` (aligned uint8 faces in,
            no torch needed); default: the split FaceNet's E in torch, loaded on first use.
        aligner: callable uint8 RGB (H,W,3) -> object with ``.image`` (160,160,3); default
            :class:`advface.data.align.Aligner`, loaded on first use.
        retries: extra attempts after connection errors and 502/503/504. Enrollment is safe to
            retry because every attempt carries the same ``Idempotency-Key``.
        model_version: E's version, sent with uploads (the service refuses maps of another
            E); default: the extractor's ``model_version``, FaceNet's for the default E.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        extractor: Callable[[Any], Any] | None = None,
        aligner: Callable[[np.ndarray], Any] | None = None,
        transport: httpx.BaseTransport | None = None,
        model_version: str | None = None,
    ) -> None:
        if not (isinstance(retries, int) and retries >= 0) or not 0 <= backoff < math.inf:
            raise ValueError(f"retries (an int) and backoff must be >= 0 and finite, got "
                             f"{retries!r}, {backoff!r}")  # fmt: skip
        if not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        # A header value with a newline or a non-ASCII character would fail inside httpx on
        # every request (and read as "service unreachable" after the retries).
        if not (api_key and api_key.isascii() and api_key.isprintable() and " " not in api_key):
            raise ValueError("api_key must be the printable ASCII token `advface keys create` gave")
        _check_base_url(base_url)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={API_KEY_HEADER: api_key},
            timeout=timeout,
            transport=transport,
        )
        self.retries, self.backoff = retries, backoff
        self._extractor = extractor
        self._aligner = aligner
        self._model_version = model_version

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdvFaceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- device side ------------------------------------------------------------------------
    @property
    def extractor(self) -> Callable[[Any], Any]:
        if self._extractor is None:
            try:
                from advface.service.backend import facenet_backend
            except ImportError as exc:  # a device without PyTorch
                raise ValueError(
                    f"FaceNet's E needs PyTorch ({exc}); without it, run E from an ONNX "
                    "export: extractor=OnnxExtractor(DIR) / --extractor DIR "
                    "(advface export-extractor)"
                ) from None
            self._extractor = facenet_backend().extractor
            if self._model_version is None:
                from advface.service.backend import FACENET_VERSION

                self._model_version = FACENET_VERSION
        return self._extractor

    @property
    def model_version(self) -> str | None:
        """The version of this client's E, sent with every upload so that a service running
        another E refuses the map (``model_mismatch``); None when unknown (a custom E)."""
        if self._model_version is not None:
            return self._model_version
        return getattr(self._extractor, "model_version", None)

    @property
    def aligner(self) -> Callable[[np.ndarray], Any]:
        if self._aligner is None:
            from advface.data.align import Aligner

            self._aligner = Aligner()
        return self._aligner

    def features(
        self, image: ImageLike, *, aligned: bool = False, allow_no_face: bool = False
    ) -> np.ndarray:
        """E(x) (64,77,77) float32 for an image path, the bytes of an encoded image (JPEG,
        PNG, ... as uploaded to a web app), a uint8 RGB array, or a feature map.

        A float array of shape (64,77,77) or (1,64,77,77) is taken as E(x) already.
        ``aligned=True`` skips MTCNN for arrays/files that are already 160x160 crops. An image in
        which MTCNN finds no face raises :class:`NoFaceError` unless ``allow_no_face=True``
        (then the aligner's fallback crop is used): enrolling a blank or a text image would
        store a template that matches nobody - or, worse, other blank probes.
        """
        if isinstance(image, np.ndarray) and image.dtype.kind == "f":
            z = np.asarray(image, np.float32)
            if z.shape[-3:] != payload.FEATURE_SHAPE or z.size != np.prod(payload.FEATURE_SHAPE):
                raise ValueError(f"feature map must be (64,77,77), got {z.shape}")
            return z.reshape(payload.FEATURE_SHAPE)
        if isinstance(image, str | Path):
            from advface.data.align import read_rgb

            rgb = read_rgb(image)
        elif isinstance(image, bytes | bytearray):
            from advface.data.align import decode_rgb

            rgb = decode_rgb(bytes(image), "the image bytes")
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
            rgb = image
        else:
            raise ValueError(
                "image must be a path, encoded image bytes, a uint8 RGB (H,W,3) array or a "
                "float E(x)"
            )
        face = rgb if aligned else self._align(rgb, image, allow_no_face)
        if face.shape != (160, 160, 3):
            raise ValueError(f"aligned face must be (160,160,3), got {face.shape}")
        if getattr(self.extractor, "takes_uint8_faces", False):
            return np.asarray(self.extractor(face[None])[0], np.float32)
        import torch

        from advface.models.facenet import preprocess

        with torch.inference_mode():
            z = self.extractor(preprocess(face[None]))
        return z[0].float().cpu().numpy()

    def _align(self, rgb: np.ndarray, source: ImageLike, allow_no_face: bool) -> np.ndarray:
        result = self.aligner(rgb)
        # Aligners without a ``found`` flag (custom callables) are trusted to return a face.
        if not getattr(result, "found", True) and not allow_no_face:
            name = str(source) if isinstance(source, str | Path) else "the image"
            raise NoFaceError(
                f"no face found in {name}; use an image with a visible face "
                "(or allow_no_face / --allow-no-face to send the centre crop anyway)"
            )
        return result.image

    def payload(
        self, image: ImageLike, *, aligned: bool = False, allow_no_face: bool = False
    ) -> bytes:
        """The bytes uploaded for ``image`` (fp16, shape header, zlib)."""
        return payload.encode(self.features(image, aligned=aligned, allow_no_face=allow_no_face))

    # -- HTTP -------------------------------------------------------------------------------
    def _request(self, method: str, url: str, **kw: Any) -> Any:
        attempt = 0
        while True:
            try:
                r = self._http.request(method, url, **kw)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    reason = f"cannot reach {self._http.base_url}: {exc}"
                    raise ServiceUnavailableError(0, "unreachable", reason) from exc
            else:
                if r.status_code not in (502, 503, 504) or attempt >= self.retries:
                    return self._decode(r)
            time.sleep(self.backoff * 2**attempt)
            attempt += 1

    @staticmethod
    def _decode(r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.is_success:
            return body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        code = str(err.get("code", "http_error"))
        message = str(err.get("message", r.text[:200]))
        raise _error_class(r.status_code)(r.status_code, code, message)

    def _binary(
        self, url: str, data: bytes, headers: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        h = {"Content-Type": payload_content_type(), **(headers or {})}
        if self.model_version is not None:
            h[MODEL_HEADER] = self.model_version
        return self._request("POST", url, content=data, headers=h, **kw)

    # -- API --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def ready(self) -> dict[str, Any]:
        return self._request("GET", "/ready")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``/ready`` until the server answers 200 (raises after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._http_ready()
            except (AdvFaceServiceError, httpx.TransportError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _http_ready(self) -> dict[str, Any]:
        try:
            r = self._http.get("/ready")
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(0, "unreachable", str(exc)) from exc
        return self._decode(r)

    def create_subject(self, subject_id: str, *, exist_ok: bool = False) -> Subject:
        try:
            d = self._request("POST", "/v1/subjects", json={"subject_id": subject_id})
        except ConflictError:
            if not exist_ok:
                raise
            return Subject(subject_id=subject_id, created_at="", templates=-1)
        return Subject(**d)

    def list_subjects(self, page_size: int = 100) -> Iterator[Subject]:
        """All subjects of the tenant, fetched page by page."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor is not None:
                params["cursor"] = cursor
            page = self._request("GET", "/v1/subjects", params=params)
            for item in page["items"]:
                yield Subject(**item)
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def delete_subject(self, subject_id: str) -> int:
        """Delete a subject; returns how many templates went with it."""
        d = self._request("DELETE", f"/v1/subjects/{path_segment(subject_id)}")
        return int(d["deleted_templates"])

    def enroll(
        self,
        subject_id: str,
        image: ImageLike,
        *,
        idempotency_key: str | None = None,
        aligned: bool = False,
        allow_no_face: bool = False,
    ) -> Template:
        """Enroll one face; every retry reuses one idempotency key, so nothing is duplicated."""
        data = self.payload(image, aligned=aligned, allow_no_face=allow_no_face)
        key = idempotency_key or uuid.uuid4().hex
        url = f"/v1/subjects/{path_segment(subject_id)}/templates"
        d = self._binary(url, data, {"Idempotency-Key": key})
        return Template(**d)

    def enroll_folder(
        self,
        folder: str | Path,
        *,
        aligned: bool = False,
        allow_no_face: bool = False,
        on_image: Callable[[str, str], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Enroll every image of a ``<folder>/<subject>/<image>`` tree; subjects are created
        as needed. Resumable: each image's idempotency key is a digest of its subject and
        bytes, so a rerun (after an error or an interruption) skips what was stored
        (``replayed``). Skipped and named, the run going on: images without a face
        (``no_face``), that do not decode (``unreadable``), that the client or the service
        rejects as input (``rejected``: e.g. not 160x160 with ``aligned``), and images
        stored before from other features (``conflict``: E changed since). A service that
        fails or cannot be reached stops the run (rerun it to resume).

        ``on_start(n_images)`` is called once the folder is scanned, ``on_image(key,
        outcome)`` per image. Returns counts and the skipped keys.
        """
        from advface.data.protocols import folder_identities

        folder = Path(folder)
        keys, subjects = folder_identities(folder)
        if on_start is not None:
            on_start(len(keys))
        if not aligned:
            self.aligner  # noqa: B018 (loaded now: a missing MTCNN fails the run, not each image)
        self.extractor  # noqa: B018 (likewise E: without torch or an export, say so once)
        skipped: dict[str, list[str]] = {
            k: [] for k in ("no_face", "unreadable", "rejected", "conflict")
        }
        counts = dict.fromkeys(("enrolled", "replayed", *skipped), 0)
        created: set[str] = set()
        for key, subject in zip(keys, subjects, strict=True):
            outcome = self._enroll_file(
                folder / key, subject, created, aligned=aligned, allow_no_face=allow_no_face
            )
            counts[outcome] += 1
            if outcome in skipped:
                skipped[outcome].append(key)
            if on_image is not None:
                on_image(key, outcome)
        return {"images": len(keys), "subjects": len(set(subjects)), **counts, "skipped": skipped}

    def _enroll_file(
        self, path: Path, subject: str, created: set[str], *, aligned: bool, allow_no_face: bool
    ) -> str:
        """One image of :meth:`enroll_folder`: its outcome (the file is read once: its bytes
        give both the features and the idempotency key)."""
        from advface.data.align import UnreadableImageError

        try:
            data = path.read_bytes()
        except OSError:
            return "unreadable"
        try:
            z = self.features(data, aligned=aligned, allow_no_face=allow_no_face)
        except NoFaceError:
            return "no_face"
        except UnreadableImageError:
            return "unreadable"
        except ValueError:
            return "rejected"
        if subject not in created:
            self.create_subject(subject, exist_ok=True)
            created.add(subject)
        digest = hashlib.sha256(subject.encode() + b"\0" + data).hexdigest()
        try:
            t = self.enroll(subject, z, idempotency_key=f"folder-{digest[:48]}")
        except ConflictError as exc:
            if exc.code != "idempotency_conflict":
                raise
            return "conflict"
        except InvalidRequestError:
            return "rejected"
        return "replayed" if t.replayed else "enrolled"

    def verify(
        self,
        subject_id: str,
        image: ImageLike,
        *,
        aligned: bool = False,
        allow_no_face: bool = False,
    ) -> Verification:
        """1:1 verification of a fresh probe against the subject's templates."""
        url = f"/v1/subjects/{path_segment(subject_id)}/verify"
        d = self._binary(url, self.payload(image, aligned=aligned, allow_no_face=allow_no_face))
        return Verification(**d)

    def identify(
        self,
        image: ImageLike,
        top_k: int = 5,
        *,
        aligned: bool = False,
        allow_no_face: bool = False,
    ) -> list[Candidate]:
        """1:N identification: best ``top_k`` subjects."""
        data = self.payload(image, aligned=aligned, allow_no_face=allow_no_face)
        d = self._binary("/v1/identify", data, params={"top_k": top_k})
        return [Candidate(**c) for c in d["candidates"]]

    def get_template(self, template_id: str) -> Template:
        return Template(**self._request("GET", f"/v1/templates/{path_segment(template_id)}"))

    def delete_template(self, template_id: str) -> None:
        self._request("DELETE", f"/v1/templates/{path_segment(template_id)}")

    def stats(self) -> dict[str, Any]:
        """The tenant's stored templates: ``templates``, ``by_protection`` (with parameters)
        and ``by_model_version`` (E's version)."""
        return self._request("GET", "/v1/stats")


def payload_content_type() -> str:
    return "application/octet-stream"
