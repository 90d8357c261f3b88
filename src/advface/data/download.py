"""Fetch LFW (deep-funneled images and View 2 pairs) from its public source, verified by MD5.

Every file is streamed to a temporary file beside its destination, its MD5 checked, and only then
renamed (``pairs.txt``) or extracted into a temporary folder that is renamed into place
(``lfw-deepfunneled/``). On a checksum mismatch or any other failure nothing is left behind (the
folders this call created included), and a network, file or archive failure is a ``ValueError``
naming the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["LFW_BASE_URL", "LFW_FILES", "ChecksumError", "download_file", "ensure_lfw"]

# The public LFW site; the same files and checksums as torchvision's LFW dataset uses.
LFW_BASE_URL = "http://vis-www.cs.umass.edu/lfw/"
LFW_FILES: dict[str, str] = {
    "lfw-deepfunneled.tgz": "68331da3eb755a505a502b5aacb3c201",
    "pairs.txt": "9f1ba174e4e1c508ff7cdf10ac338a7d",
}


class ChecksumError(ValueError):
    """A downloaded file does not have the expected MD5."""


# What a failed transfer or extraction raises: URLError and HTTPError are OSErrors; a connection
# cut mid-body is an HTTPException; a damaged archive a TarError.
_FETCH_ERRORS = (OSError, http.client.HTTPException, tarfile.TarError)


def _join(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + "/" + name


def download_file(
    url: str, dest: Path, md5: str, *, timeout: float = 60.0, progress: bool = False
) -> Path:
    """Download ``url`` to ``dest`` via a temporary file, verifying ``md5`` before the rename.

    A failed transfer raises ``ValueError("download of <url> failed: ...")``; a wrong MD5
    :class:`ChecksumError`. Either way no file is left behind.
    """
    try:
        request = urllib.request.Request(url)
    except ValueError as exc:  # no scheme
        raise ValueError(f"download of {url} failed: {exc}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as fh, urllib.request.urlopen(request, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from tqdm import tqdm

            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                while block := resp.read(1 << 20):
                    fh.write(block)
                    digest.update(block)
                    bar.update(len(block))
        got = digest.hexdigest()
        if got != md5.lower():
            raise ChecksumError(
                f"checksum mismatch for {url}: md5 {got}, expected {md5.lower()}; "
                "the file was discarded"
            )
        os.replace(tmp, dest)
    except _FETCH_ERRORS as exc:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"download of {url} failed: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _extract_tgz(archive: Path, dest_dir: Path, folder: str) -> Path:
    """Extract ``archive`` (which must hold ``folder/``) into ``dest_dir/folder`` atomically."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".extract", dir=dest_dir))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            tar.extractall(staging, filter="data")
        extracted = staging / folder
        if not extracted.is_dir():
            raise ValueError(f"{archive.name} does not contain a top-level {folder}/ folder")
        target = dest_dir / folder
        os.replace(extracted, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_lfw(
    root: str | Path,
    *,
    base_url: str = LFW_BASE_URL,
    checksums: dict[str, str] | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Ensure ``<root>/lfw`` holds ``lfw-deepfunneled/`` and ``pairs.txt``; return ``<root>/lfw``.

    Existing local copies are kept; missing pieces are downloaded from ``base_url`` and checked
    against ``checksums`` (default: the official MD5s in :data:`LFW_FILES`).
    """
    sums = dict(LFW_FILES if checksums is None else checksums)
    missing = set(LFW_FILES) - set(sums)
    if missing:
        raise ValueError(f"checksums lack entries for {', '.join(sorted(missing))}")
    lfw = Path(root).expanduser() / "lfw"
    created = [d for d in (lfw, *lfw.parents) if not d.exists()]  # innermost first
    try:
        lfw.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create {lfw}: {exc}") from exc
    try:
        _fetch_lfw(lfw, base_url, sums, timeout, progress)
    except BaseException:
        for d in created:  # a failed first download leaves no empty data root behind
            try:
                d.rmdir()
            except OSError:
                break  # not empty: something else lives there now
        raise
    return lfw


def _fetch_lfw(
    lfw: Path, base_url: str, sums: dict[str, str], timeout: float, progress: bool
) -> None:
    """Download into ``lfw`` whichever of ``pairs.txt`` and ``lfw-deepfunneled/`` it lacks."""
    pairs = lfw / "pairs.txt"
    if not pairs.is_file():
        download_file(
            _join(base_url, "pairs.txt"),
            pairs,
            sums["pairs.txt"],
            timeout=timeout,
            progress=progress,
        )
    images = lfw / "lfw-deepfunneled"
    if not images.is_dir():
        archive = lfw / "lfw-deepfunneled.tgz"
        url = _join(base_url, archive.name)
        download_file(url, archive, sums[archive.name], timeout=timeout, progress=progress)
        try:
            _extract_tgz(archive, lfw, "lfw-deepfunneled")
        except _FETCH_ERRORS as exc:
            raise ValueError(f"download of {url} failed: cannot extract it: {exc}") from exc
        finally:
            archive.unlink(missing_ok=True)  # the extracted tree is what is used
