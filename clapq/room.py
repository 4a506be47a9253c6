"""What clapq's own files leave free on a disk it shares with the embedded Postgres and Redis. Apart from
clapq.blobs, so that a decoder child (worker.audio) imports no database library for it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

RESERVE_MB = 128  # CLAPQ_DISK_RESERVE_MB's auto where the embedded Postgres or Redis shares a disk clapq writes to
RESERVE_CHECK_BYTES = 4 << 20  # how often a file being written asks its disk how much room is left


def disk_reserve(folder: Path, data_dir: Path, configured_mb: int | None) -> int:
    """The bytes clapq's own files (uploads in the stored files' folder, a worker's decoded scratch files) leave free
    on the disk of `folder`: CLAPQ_DISK_RESERVE_MB where set; else (auto) RESERVE_MB where the embedded Postgres or
    Redis of `data_dir` runs on that disk too, as `clapq up` has them, and none elsewhere (a database on a disk of
    its own, Docker's volumes). Uploads filled that disk to its last byte, and then Postgres could not write ("could
    not write init file: No space left on device") and stopped, and `clapq up` with it (helper-88): an upload is
    refused (507), and a decoded file waits for room, first. Runs, not is there: the pg/ and redis/ an earlier `clapq
    up` left in the data directory, where DATABASE_URL and REDIS_URL now name servers elsewhere, kept the last 128 MB
    of a disk no database writes to from uploads, "for the database that shares it"."""
    if configured_mb is not None:
        return configured_mb << 20
    here = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
    try:
        dev = here.stat().st_dev if here is not None else None
        servers = (Path(data_dir) / "pg" / "postmaster.pid", Path(data_dir) / "redis" / "redis.pid")
        shares = any(_runs(pidfile) and pidfile.parent.stat().st_dev == dev for pidfile in servers)
    except OSError:
        return 0
    return RESERVE_MB << 20 if shares else 0


def _runs(pidfile: Path) -> bool:
    """Whether the process a server's pid file names runs: one that stopped removed it (a crash leaves it; its pid
    is then gone, or another process's, which is taken for it)."""
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
    except PermissionError:  # another user's: the embedded Postgres runs as `pgserver` under root
        return True
    except (OSError, ValueError, IndexError):
        return False
    return True


def kept_free(reserve: int) -> OSError:
    """The ENOSPC of a write that would take the disk's last `reserve` bytes (disk_reserve)."""
    exc = OSError(errno.ENOSPC, f"no space left on device but the last {reserve / 2**20:g} MB, kept free for the database "
                  "that shares it (CLAPQ_DISK_RESERVE_MB)")
    exc.reserved = reserve
    return exc
