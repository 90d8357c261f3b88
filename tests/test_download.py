"""Tests for advface.data.download against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from advface.data.download import ChecksumError, ensure_lfw
from advface.data.protocols import load_protocol

PAIRS = "1\t1\nAnn\t1\t2\nAnn\t1\tBob\t1\n"


class QuietHandler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        QuietHandler.requests.append(self.path)


def make_tgz(path: Path, top: str = "lfw-deepfunneled") -> None:
    with tarfile.open(path, "w:gz") as tar:
        for key in ("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg"):
            data = f"fake image {key}".encode()
            info = tarfile.TarInfo(f"{top}/{key}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()
    make_tgz(served / "lfw-deepfunneled.tgz")
    (served / "pairs.txt").write_text(PAIRS)
    QuietHandler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def sums(served: Path) -> dict[str, str]:
    return {n: md5(served / n) for n in ("lfw-deepfunneled.tgz", "pairs.txt")}


def test_download_verify_extract(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    root = tmp_path / "data"
    lfw = ensure_lfw(root, base_url=url, checksums=sums(served), progress=False)
    assert lfw == root / "lfw"
    assert sorted(p.name for p in lfw.iterdir()) == ["lfw-deepfunneled", "pairs.txt"]
    assert (lfw / "lfw-deepfunneled" / "Bob" / "Bob_0001.jpg").read_bytes() == (
        b"fake image Bob/Bob_0001.jpg"
    )
    p = load_protocol("lfw", root)
    assert p.keys_b == ["Ann/Ann_0002.jpg", "Bob/Bob_0001.jpg"]
    # a second call finds the local copy and fetches nothing
    QuietHandler.requests = []
    ensure_lfw(root, base_url=url, checksums=sums(served), progress=False)
    assert QuietHandler.requests == []


def test_checksum_mismatch_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    root = tmp_path / "data"
    bad = sums(served)
    bad["lfw-deepfunneled.tgz"] = "0" * 32
    with pytest.raises(ChecksumError, match="lfw-deepfunneled.tgz"):
        ensure_lfw(root, base_url=url, checksums=bad, progress=False)
    # the verified pairs.txt stays; no archive, partial file or extraction folder does
    assert sorted(p.name for p in (root / "lfw").iterdir()) == ["pairs.txt"]
    bad["pairs.txt"] = "f" * 32
    (root / "lfw" / "pairs.txt").unlink()
    with pytest.raises(ChecksumError, match="pairs.txt"):
        ensure_lfw(root, base_url=url, checksums=bad, progress=False)
    assert list((root / "lfw").iterdir()) == []


def test_archive_without_expected_folder(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    make_tgz(served / "lfw-deepfunneled.tgz", top="something-else")
    with pytest.raises(ValueError, match="lfw-deepfunneled/"):
        ensure_lfw(tmp_path, base_url=url, checksums=sums(served), progress=False)
    assert sorted(p.name for p in (tmp_path / "lfw").iterdir()) == ["pairs.txt"]


def test_missing_remote_file(server: tuple[str, Path], tmp_path: Path) -> None:
    url, served = server
    checks = sums(served)
    (served / "pairs.txt").unlink()
    with pytest.raises(ValueError, match="download of .*pairs.txt failed: HTTP Error 404"):
        ensure_lfw(tmp_path, base_url=url, checksums=checks, progress=False)
    assert not (tmp_path / "lfw").exists()  # the folder this call made is gone again


def test_checksums_must_cover_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pairs.txt"):
        ensure_lfw(tmp_path, base_url="http://127.0.0.1:9/", checksums={"lfw-deepfunneled.tgz": ""})


def test_cli_download_reports_checksum_error(server: tuple[str, Path], tmp_path: Path) -> None:
    """The CLI verifies against the official MD5s, which the tiny test files do not match."""
    from advface.cli import app

    url, _ = server
    res = CliRunner().invoke(
        app,
        [
            "prepare",
            "lfw",
            "--download",
            "--download-url",
            url,
            "--data-root",
            str(tmp_path / "data"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 1
    assert "checksum mismatch" in res.output
    assert not (tmp_path / "data").exists()
