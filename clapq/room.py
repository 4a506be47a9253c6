"""What clapq's own files leave free on a disk it shares with the embedded Postgres and Redis. Apart from
clapq.blobs, so that a decoder child (worker.audio) imports no database library for it."""

from __future__ import annotations

import errno
from pathlib import Path

RESERVE_MB = 128  # CLAPQ_DISK_RESERVE_MB's auto where the embedded Postgres or Redis shares a disk clapq writes to
RESERVE_CHECK_BYTES = 4 << 20  # how often a file being written asks its disk how much room is left


def disk_reserve(folder: Path, data_dir: Path, configured_mb: int | None) -> int:
    """The bytes clapq's own files (uploads in the stored files' folder, a worker's decoded scratch files) leave free
    on the disk of `folder`: CLAPQ_DISK_RESERVE_MB where set; else (auto) RESERVE_MB where the embedded Postgres or
    Redis of `data_dir` lives on that disk too, as `clapq up` has them, and none elsewhere (a database on a disk of
    its own, Docker's volumes). Uploads filled that disk to its last byte, and then Postgres could not write ("could
    not write init file: No space left on device") and stopped, and `clapq up` with it (helper-88): an upload is
    refused (507), and a decoded file waits for room, first."""
    if configured_mb is not None:
        return configured_mb << 20
    here = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
    try:
        dev = here.stat().st_dev if here is not None else None
        shares = any((d := Path(data_dir) / name).is_dir() and d.stat().st_dev == dev for name in ("pg", "redis"))
    except OSError:
        return 0
    return RESERVE_MB << 20 if shares else 0


def kept_free(reserve: int) -> OSError:
    """The ENOSPC of a write that would take the disk's last `reserve` bytes (disk_reserve)."""
    exc = OSError(errno.ENOSPC, f"no space left on device but the last {reserve / 2**20:g} MB, kept free for the database "
                  "that shares it (CLAPQ_DISK_RESERVE_MB)")
    exc.reserved = reserve
    return exc
