"""The outside tester's probe, replayed against a real server on loopback (toy networks).

Each block is one finding of that probe; together they must keep holding."""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from advface.service import payload
from advface.service.process import ServerProcess
from advface.service.sdk import AdvFaceClient, InvalidRequestError, NotFoundError

from .conftest import cli_key, feature_map


def _db_files(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.iterdir() if p.name.startswith("probe.db")]


def test_probe_findings_hold_on_a_live_server(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'probe.db'}"
    key = cli_key(db_url)
    log = tmp_path / "server.log"
    with (
        ServerProcess(
            db_url=db_url, backend="toy", log_path=log, log_level="info", ready_timeout=120
        ) as srv,
        AdvFaceClient(srv.url, key, retries=0) as c,
    ):
        victim = feature_map(1, noise=0.1)
        c.create_subject("victim")
        c.enroll("victim", victim)
        c.create_subject("nobody")
        # Ids cannot walk to another subject through the SDK, and dot ids are refused.
        with pytest.raises(NotFoundError):
            c.verify("nobody/../victim", feature_map(1, noise=0.1, sample=2))
        with pytest.raises((NotFoundError, InvalidRequestError)):
            c.delete_subject("ghost/../victim")
        assert "victim" in {s.subject_id for s in c.list_subjects()}
        for bad in (".", ".."):
            r = httpx.post(
                f"{srv.url}/v1/subjects", json={"subject_id": bad}, headers={"X-API-Key": key}
            )
            assert r.status_code == 422, r.text
        # A stalled unauthenticated upload is refused at once, before its body is read.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/subjects/victim/templates HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/octet-stream\r\n"
                b"Content-Length: 10000000\r\n\r\n"
            )
            t0 = time.monotonic()
            head = s.recv(1024)
            assert head.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 5
        # The docs page works offline (no CDN).
        docs = httpx.get(f"{srv.url}/docs").text
        assert "cdn" not in docs.lower() and '<script src="http' not in docs
        # Deleting the subject leaves no readable copy of its map behind (WAL included).
        assert c.delete_subject("victim") == 1
    raw = b"".join(p.read_bytes() for p in _db_files(tmp_path))
    enc = payload.encode(victim)
    for needle in (
        victim.astype(np.float32).tobytes()[:64],
        victim.astype(np.float16).tobytes()[:64],
        enc[-64:],
    ):
        assert needle not in raw
    for p in _db_files(tmp_path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
