"""Run ``advface serve`` as a child process on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(db_url=..., backend="toy") as srv: srv.url`` - started and ready."""

    def __init__(
        self,
        *,
        db_url: str,
        backend: str = "facenet",
        protection: str | None = None,
        protection_params: str | None = None,
        allow_unprotected: bool = False,
        threshold: float | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        ready_timeout: float = 300.0,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        log_level: str = "warning",
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-c",
            "from advface.cli import main; main()",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db-url",
            db_url,
            "--backend",
            backend,
            *(["--protection", protection] if protection else []),
            *(["--allow-unprotected"] if allow_unprotected else []),
            "--log-level",
            log_level,
            *(["--protection-params", protection_params] if protection_params else []),
            *(["--threshold", str(threshold)] if threshold is not None else []),
            *(extra_args or []),
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_info: dict[str, object] = {}
        self.startup_seconds = 0.0

    def start(self) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=out, env=self.env)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}: {self.log()}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2.0)
                if r.status_code == 200:
                    self.ready_info = r.json()
                    self.startup_seconds = time.perf_counter() - t0
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout}s: {self.log()}")

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-2000:]
        return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful uvicorn shutdown), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
