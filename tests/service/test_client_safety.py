"""Client side: ids cannot escape their URL path segment, and images without a face are
refused before anything is sent."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from advface.cli import app as cli_app
from advface.service.backend import Backend
from advface.service.sdk import InvalidRequestError, NotFoundError

from .conftest import Harness, assert_error, feature_map, sdk_client


def test_sdk_encodes_ids_so_paths_cannot_reach_another_subject(harness: Harness) -> None:
    harness.subject("victim")
    assert harness.enroll("victim", feature_map(1)).status_code == 201
    before = harness.state()
    c = sdk_client(harness)
    with pytest.raises((NotFoundError, InvalidRequestError)):
        c.verify("nobody/../victim", feature_map(1))
    with pytest.raises((NotFoundError, InvalidRequestError)):
        c.enroll("nobody/../victim", feature_map(2))
    with pytest.raises((NotFoundError, InvalidRequestError)):
        c.delete_subject("ghost/../victim")
    for dots in (".", ".."):
        with pytest.raises(InvalidRequestError) as e:
            c.delete_subject(dots)
        assert e.value.code == "invalid_subject_id"
    assert harness.state() == before
    assert [s.templates for s in c.list_subjects()] == [1]


def test_subject_ids_are_nfc_normalised(harness: Harness) -> None:
    composed, decomposed = "zo\u00eb", "zoe\u0308"
    harness.subject(composed)
    assert_error(
        harness.client.post("/v1/subjects", json={"subject_id": decomposed}, headers=harness.h()),
        409,
        "subject_exists",
    )
    c = sdk_client(harness)
    assert c.enroll(decomposed, feature_map(3)).subject_id == composed
    assert c.verify(decomposed, feature_map(3)).match
    assert [(s.subject_id, s.templates) for s in c.list_subjects()] == [(composed, 1)]
    assert c.delete_subject(decomposed) == 1
    assert harness.state() == (0, 0)


def _no_face_images(tmp_path: Path) -> dict[str, Path]:
    text = np.full((250, 250, 3), 255, np.uint8)
    cv2.putText(text, "no face here", (10, 125), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (0, 0, 0), 2)
    images = {
        "grey": np.full((250, 250, 3), 128, np.uint8),
        "noise": np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8),
        "text": text,
    }
    out = {}
    for name, img in images.items():
        out[name] = tmp_path / f"{name}.png"
        cv2.imwrite(str(out[name]), img)
    return out


def test_cli_refuses_images_without_a_face(
    harness: Harness, toy: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advface.cli import client as cli_client

    monkeypatch.setattr(cli_client, "_client", lambda *a, **k: sdk_client(harness, toy))
    harness.subject("victim")
    assert harness.enroll("victim", feature_map(1)).status_code == 201
    before = harness.state()
    run = CliRunner().invoke
    for name, path in _no_face_images(tmp_path).items():
        for args in (
            ["enroll", "newcomer", str(path)],
            ["verify", "victim", str(path)],
            ["identify", str(path)],
        ):
            r = run(cli_app, ["client", *args, "--api-key", harness.key])
            assert r.exit_code == 2 and "no face found" in r.output, (name, args, r.output)
    assert harness.state() == before
    subjects = harness.client.get("/v1/subjects", headers=harness.h()).json()["items"]
    assert [s["subject_id"] for s in subjects] == ["victim"]  # enroll did not create it either
    grey = str(tmp_path / "grey.png")
    r = run(cli_app, ["client", "enroll", "newcomer", grey, "--allow-no-face", "--api-key", "k"])
    assert r.exit_code == 0, r.output
    assert harness.state() == (before[0] + 1, before[1] + 1)


def test_client_checks_its_url_and_key_and_names_an_unreachable_service() -> None:
    """A malformed URL or a missing key is refused before any request (exit 2); a service
    that does not answer is named with the reason (exit 1), without an HTTP status."""
    import socket

    from advface.service.sdk import AdvFaceClient, ServiceUnavailableError

    for bad in ("notaurl", "ftp://host", "http://", "http://user:pw@host"):
        with pytest.raises(ValueError, match="service URL"):
            AdvFaceClient(bad, "afk_x")
    # A key httpx cannot send, or a timeout that would only fail at the first request.
    for key in ("", "afk_x\r\nX-Evil: 1", "afk_é", "afk x"):
        with pytest.raises(ValueError, match="api_key"):
            AdvFaceClient("http://127.0.0.1:9", key)
    for kw in (
        {"timeout": 0},
        {"timeout": float("nan")},
        {"backoff": float("inf")},
        {"retries": 1.5},
    ):
        with pytest.raises(ValueError):
            AdvFaceClient("http://127.0.0.1:9", "afk_x", **kw)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with AdvFaceClient(url, "afk_x", retries=0) as c, pytest.raises(ServiceUnavailableError) as e:
        c.health()
    assert str(e.value).startswith(f"unreachable: cannot reach {url}"), str(e.value)
    run = CliRunner().invoke
    r = run(cli_app, ["client", "subjects", "--url", url, "--api-key", "afk_x"])
    assert r.exit_code == 1 and f"error: unreachable: cannot reach {url}" in r.output, r.output
    r = run(cli_app, ["client", "subjects", "--url", "notaurl", "--api-key", "afk_x"])
    assert r.exit_code == 2 and "error: the service URL must be" in r.output, r.output
    r = run(cli_app, ["client", "subjects", "--url", url], env={"ADVFACE_API_KEY": ""})
    assert r.exit_code == 2 and "error: no API key" in r.output, r.output


def test_cli_template_delete_template_and_stats(
    harness: Harness, toy: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from advface.cli import client as cli_client

    monkeypatch.setattr(cli_client, "_client", lambda *a, **k: sdk_client(harness, toy))
    harness.subject("ann")
    ids = [harness.enroll("ann", feature_map(3, 0.1, i)).json()["template_id"] for i in range(2)]
    run = CliRunner().invoke
    r = run(cli_app, ["client", "stats", "--api-key", "k"])
    assert r.exit_code == 0 and json.loads(r.output)["templates"] == 2, r.output
    r = run(cli_app, ["client", "template", ids[0], "--api-key", "k"])
    shown = json.loads(r.output)
    assert r.exit_code == 0 and shown["template_id"] == ids[0] and shown["subject_id"] == "ann"
    r = run(cli_app, ["client", "delete-template", ids[0], "--api-key", "k"])
    assert r.exit_code == 0 and json.loads(r.output) == {"template_id": ids[0], "deleted": True}
    r = run(cli_app, ["client", "template", ids[0], "--api-key", "k"])
    assert r.exit_code == 1 and "404" in r.output, r.output
    assert json.loads(run(cli_app, ["client", "stats", "--api-key", "k"]).output)["templates"] == 1


def test_cli_verify_exit_status_says_match_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from advface.cli import client as cli_client
    from advface.service.sdk import Verification

    class Answers:  # the service's verdict, whatever the image
        def __init__(self, match: bool) -> None:
            self.match = match

        def __enter__(self) -> Answers:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def verify(self, subject: str, image: Path, **_: object) -> Verification:
            return Verification(subject, 0.9 if self.match else 0.1, self.match, 0.4, 2)

    run = CliRunner().invoke
    for match, status in ((True, 0), (False, 3)):
        monkeypatch.setattr(cli_client, "_client", lambda *a, m=match, **k: Answers(m))
        r = run(cli_app, ["client", "verify", "zoe", "probe.png", "--api-key", "k"])
        assert r.exit_code == status and json.loads(r.output)["match"] is match, r.output


@pytest.mark.data
def test_enroll_folder_is_resumable_and_names_what_it_skips(
    harness: Harness, toy: Backend, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from advface.cli import client as cli_client

    lfw = data_root / "lfw" / "lfw-deepfunneled"
    gallery = tmp_path / "gallery"
    for person in ("Aaron_Peirsol", "Abdullah_Gul"):
        (gallery / person).mkdir(parents=True)
        for i in (1, 2):
            shutil.copy(lfw / person / f"{person}_{i:04d}.jpg", gallery / person)
    cv2.imwrite(str(gallery / "Abdullah_Gul" / "blank.png"), np.full((250, 250, 3), 128, np.uint8))
    (gallery / "Abdullah_Gul" / "broken.jpg").write_bytes(b"not an image")
    c = sdk_client(harness, toy)
    first = c.enroll_folder(gallery)
    counts = tuple(first[k] for k in ("images", "subjects", "enrolled", "replayed"))
    assert counts == (6, 2, 4, 0)
    assert first["skipped"] == {
        "no_face": ["Abdullah_Gul/blank.png"],
        "unreadable": ["Abdullah_Gul/broken.jpg"],
        "rejected": [],
        "conflict": [],
    }
    assert harness.state() == (4, 4)
    monkeypatch.setattr(cli_client, "_client", lambda *a, **k: sdk_client(harness, toy))
    r = CliRunner().invoke(cli_app, ["client", "enroll-folder", str(gallery), "--api-key", "k"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert (again["enrolled"], again["replayed"]) == (0, 4), r.output
    assert harness.state() == (4, 4)  # nothing stored twice


def test_enroll_folder_skips_rejected_images_and_goes_on(
    harness: Harness, toy: Backend, tmp_path: Path
) -> None:
    """Without real faces: aligned crops, one of the wrong size (rejected, named), one that
    is no image (unreadable); the others are stored, and a rerun stores nothing twice."""
    rng = np.random.default_rng(3)
    gallery = tmp_path / "g"
    for subject in ("s1", "s2"):
        (gallery / subject).mkdir(parents=True)
        for i in range(2):
            face = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
            cv2.imwrite(str(gallery / subject / f"{i}.png"), face)
    cv2.imwrite(str(gallery / "s2" / "small.png"), np.zeros((80, 80, 3), np.uint8))
    (gallery / "s2" / "broken.jpg").write_bytes(b"\x00")
    c = sdk_client(harness, toy)
    seen: list[tuple[str, str]] = []
    out = c.enroll_folder(gallery, aligned=True, on_image=lambda k, o: seen.append((k, o)))
    assert (out["images"], out["enrolled"], out["rejected"], out["unreadable"]) == (6, 4, 1, 1)
    assert out["skipped"]["rejected"] == ["s2/small.png"]
    assert out["skipped"]["unreadable"] == ["s2/broken.jpg"]
    assert len(seen) == 6 and harness.state() == (4, 4)
    again = c.enroll_folder(gallery, aligned=True)
    assert (again["enrolled"], again["replayed"]) == (0, 4) and harness.state() == (4, 4)


def test_sdk_takes_encoded_image_bytes_like_the_file(tmp_path: Path) -> None:
    """Bytes as a web app receives them give the same E(x) as the file; bad bytes are named."""
    import cv2
    import numpy as np

    from advface.data.align import UnreadableImageError
    from advface.service.sdk import AdvFaceClient

    class MeanE:  # a stand-in E that sees uint8 faces (no torch, no MTCNN needed)
        takes_uint8_faces = True

        def __call__(self, faces: np.ndarray) -> np.ndarray:
            return np.full((len(faces), 64, 77, 77), faces.mean(), np.float32)

    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), face[..., ::-1])
    c = AdvFaceClient("http://127.0.0.1:9", "afk_x", extractor=MeanE())
    from_file = c.features(path, aligned=True)
    assert np.array_equal(c.features(path.read_bytes(), aligned=True), from_file)
    assert np.array_equal(c.features(face, aligned=True), from_file)
    with pytest.raises(UnreadableImageError, match="the image bytes"):
        c.features(b"not an image", aligned=True)
    with pytest.raises(ValueError, match="encoded image bytes"):
        c.features(["a list"], aligned=True)  # type: ignore[arg-type]
