"""Decode in child processes, so a file that crashes or hangs a codec fails alone, not the worker."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import psutil

import worker
from worker import CodeChanged
from worker.audio import AudioInfo, DecodeError, ScratchError, ScratchTooSmall, TooLong

log = logging.getLogger(__name__)

MAX_MESSAGES = 2000  # bytes of a decoder's stderr logged per file
# the signals that end a process for what it did itself (a codec reading past a buffer, an assertion, a division
# by zero): a decoder that dies of one twice on a file, in two children, dies of its bytes
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS})
STOP_POLL_S = 0.25  # how often a decode in progress asks whether its file is still wanted
CODE_ROOT = Path(worker.__file__).resolve().parent.parent  # where this process imports `worker` from
CODE_CHANGED_EXIT = 75  # a child's exit status where the code it loaded is not its parent's (EX_TEMPFAIL)


class Abandoned(Exception):
    """The file stopped being wanted while it decoded (deleted, or its job cancelled): its child was
    stopped, so a long file's decoding (a 3-hour MP3 took ~15 s on a 2-core machine) does not run on unseen."""


def _child(conn: Connection, code: str | None = None) -> None:
    """Child loop: decode one file at a time to a raw float32 file; EOF on the pipe means exit. `code`: the
    parent's worker.CODE, which the code on disk must still be once this has imported all it runs."""
    from clapq.pagecache import drop_cached
    from worker.audio import decode_to_file

    if code is not None and code != worker.code_on_disk():  # changed since the parent looked, or another copy
        print(f"this decoder runs the code in {Path(worker.__file__).parent.parent}, other than its parent's",
              file=sys.stderr)
        sys.exit(CODE_CHANGED_EXIT)

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        src, dst, max_duration_s, hint, reserve = job
        conn.send(("started",))  # its CPU time from now on is this file's (DecoderProcess._wait)
        try:
            info, n = decode_to_file(src, dst, max_duration_s=max_duration_s, hint=hint, reserve=reserve)
            reply = ("ok", dataclasses.asdict(info), n)
        except TooLong as exc:
            reply = ("too_long", str(exc), 0)
        except ScratchError as exc:  # not the file's fault: the parent raises it, and the task hands files back
            reply = ("scratch", (exc.errno, exc.strerror), 0)
        except ScratchTooSmall as exc:  # the file's, as any DecodeError; by its kind, so a search clip's is told
            reply = ("too_small", str(exc), 0)
        except Exception as exc:
            reply = _failed(src, exc)
        drop_cached(src)  # read once: its pages go back for the next file (clapq.pagecache)
        conn.send(reply)


def _failed(src: str, exc: Exception) -> tuple:
    """The child's answer for a file whose decoding raised `exc`: ("error", reason, in_file), where `in_file` says
    whether the reason is in the file's bytes. Not where the stored copy cannot be read whole now (an I/O error, too
    many open files, no memory or permission, a directory in its place: whatever the decoder made of that, the
    same bytes may decode once the machine is well), nor for an error the codec did not give (an OSError of the
    file's reading, a bug of ours or of a library, which the next run's decoder may not have)."""
    import av

    from worker.audio import not_read, unreadable

    if isinstance(exc, OSError) and not isinstance(exc, av.error.FFmpegError):
        exc = not_read(exc)
    if isinstance(exc, DecodeError):
        reason, in_file = str(exc), exc.in_file
    elif isinstance(exc, MemoryError):
        reason, in_file = "the file needs more memory to decode than the decoder may use", True
    else:  # an unexpected error: the codec's (FFmpeg refused the bytes) is the file's
        reason = f"decoder error: {type(exc).__name__}: {str(exc)[:200]}"
        in_file = isinstance(exc, av.error.FFmpegError)
    if in_file and (why := unreadable(src)) is not None:
        reason, in_file = str(not_read(why)), False
    return ("error", reason, in_file)


class DecoderProcess:
    """One long-lived child; restarted after a crash or a timeout."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None  # the child, for its CPU time
        self.conn: Connection | None = None
        self.messages: int | None = None  # the child's stderr: a file of ours, read after each file

    def _start(self) -> None:
        # A fresh interpreter (no torch, no threads, no inherited state), started with subprocess
        # because Celery's pool children are daemonic and multiprocessing refuses them children.
        # What codec libraries print on stderr (libmpg123: "error: big_values too large!" for each damaged
        # frame of an MP3 it decodes anyway) goes to an unlinked file opened for appending, not to the
        # worker's JSON log: after each file it is logged as one line naming the item (_report). A file,
        # not a pipe: a codec that writes megabytes cannot block on a full pipe.
        if self.messages is None:
            try:
                fd, name = tempfile.mkstemp(prefix="clapq-decoder-")
            except OSError as exc:  # no usable temp directory: the child writes to the worker's stderr
                log.warning("the decoder's messages go to stderr: %s", exc)
            else:
                os.unlink(name)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
                self.messages = fd
                self._closes_messages = weakref.finalize(self, os.close, fd)  # also if dropped unclosed
        # the code on disk now against this process's: where it changed, no child runs it (CodeChanged); the child
        # compares the same once it has imported what it runs, for a change meanwhile (CODE_CHANGED_EXIT)
        started = worker.CODE
        if worker.code_on_disk() != started:
            raise CodeChanged()
        ours, theirs = socket.socketpair()
        # started in the folder that holds this process's own `worker` package: `python -m` looks in its working
        # directory first, and a worker started in a checkout (a non-editable `pip install .` of it, Docker's /app)
        # had its children run the checkout's code, edited or not, beside its installed own
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.decoder", str(theirs.fileno()), started],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=self.messages,
                                     cwd=CODE_ROOT)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ps = psutil.Process(self.proc.pid)

    def _report(self, src: Path, log_extra: dict | None, died: bool = False) -> None:
        """Log what the child wrote to stderr since the last file, if anything, with the item's ids: its
        first and last MAX_MESSAGES / 2 bytes (a traceback's last line is the one that says what
        happened). A warning where the child died or hung on the file."""
        if self.messages is None or not (size := os.fstat(self.messages).st_size):
            return
        half = MAX_MESSAGES // 2
        head = os.pread(self.messages, MAX_MESSAGES if size <= MAX_MESSAGES else half, 0)
        tail = os.pread(self.messages, half, size - half) if size > MAX_MESSAGES else b""
        os.ftruncate(self.messages, 0)
        text = head.decode(errors="replace")
        if tail:
            text += f"\n... ({size - 2 * half:,} bytes left out) ...\n" + tail.decode(errors="replace")
        log.log(logging.WARNING if died else logging.INFO, "the decoder wrote messages about this file",
                extra={**(log_extra or {}), "file": src.name, "messages": text.strip()})

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = self.ps = None

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
        self.kill()
        if self.messages is not None:
            self._closes_messages()
            self.messages = None

    def _cpu_s(self) -> float | None:
        """The child's CPU time so far (all its threads, user and system), None where it cannot be read. Read from
        here, not limited in the child by RLIMIT_CPU: the child lives for many files, so its limit would be moved at
        each; SIGXCPU kills with a core dump unless handled, and a handler in Python never runs while a codec spins
        in C; and the reading says, when the clock's limit comes first, how much the decoder had worked."""
        try:
            t = self.ps.cpu_times()
        except (psutil.Error, OSError):
            return None
        return t.user + t.system

    def _wait(self, src: Path, timeout_s: float, cpu_s: float | None, log_extra: dict | None,
              stop: Callable[[], bool] | None) -> None:
        """Until the child answers: a DecodeError once its work on this file has taken more than `cpu_s` of its CPU
        time (the file's: a codec that spins on its bytes), or `timeout_s` has passed on the clock first (not the
        file's: a machine too busy to give the decoder its share, a stored copy whose read does not return, a
        stopped VM); Abandoned as soon as `stop()` says so (asked every STOP_POLL_S); in each case the child is
        killed, and the next file starts a new one. The CPU time is counted from the child's taking the file, so
        neither its start nor the files it decoded before count."""
        deadline = time.monotonic() + timeout_s
        started, began = False, None  # whether the child took the file yet; its CPU time then
        while True:
            if self.conn.poll(max(0.0, min(STOP_POLL_S, deadline - time.monotonic()))):
                if started:
                    return  # its answer
                self.conn.recv()  # "started"; EOFError where it died: the caller's to handle
                started, began = True, self._cpu_s()
                continue
            if stop is not None and stop():
                self.kill()
                self._report(src, log_extra)
                raise Abandoned(str(src))
            used = None if began is None or (now := self._cpu_s()) is None else now - began
            if cpu_s is not None and used is not None and used > cpu_s:
                self.kill()
                self._report(src, log_extra, died=True)
                raise DecodeError(f"decoding took more than {cpu_s:g} s of the decoder's CPU time "
                                  "(CLAPQ_DECODE_CPU_S); gave up")
            if time.monotonic() >= deadline:
                self.kill()
                self._report(src, log_extra, died=True)
                worked = (f", in which the decoder worked {used:.1f} s of CPU time" if used is not None
                          else "" if started else ", before its decoder had taken the file")
                raise DecodeError(f"decoding took longer than {timeout_s:g} s (CLAPQ_DECODE_TIMEOUT_S){worked}: "
                                  "the machine was too busy or the stored copy too slow to read, not the file at "
                                  "fault; gave up", in_file=False)

    def decode(self, src: Path, dst: Path, timeout_s: float, max_duration_s: float | None,
               log_extra: dict | None = None, stop: Callable[[], bool] | None = None,
               hint: str | None = None, cpu_s: float | None = None, reserve: int = 0) -> tuple[AudioInfo, int]:
        """Decode src into dst; raises DecodeError for bad files, crashed or hung decoders (past `cpu_s` of its
        CPU time, the file's; past `timeout_s` on the clock, not: see _wait; None: no CPU limit), ScratchError when
        dst cannot be written (the machine's fault, not the file's), Abandoned when `stop()` turns true
        first. A child that dies on a file is restarted and the file tried once more: a kill from outside
        (the OOM killer making room for something else, an operator) is not the file's fault; dying twice
        is. CodeChanged, neither the file's nor counted against it, where a new child would run other code than
        this process (upgraded in place, or another copy found first). `log_extra`: the ids that the log lines about this file carry;
        `hint`: the demuxer the upload's name gives (worker.audio.format_hint); `reserve`: the bytes of dst's disk left
        free, for a database on it (clapq.room.disk_reserve: past them, ScratchError as for a full disk)."""
        for attempt in (1, 2):
            if not self.alive():
                self._start()
            try:
                self.conn.send((os.path.abspath(src), os.path.abspath(dst), max_duration_s, hint, reserve))  # cwd: CODE_ROOT
                self._wait(src, timeout_s, cpu_s, log_extra, stop)
                status, payload, n = self.conn.recv()
            except (EOFError, OSError):  # the child died: before the file reached it, or on it
                try:
                    code = self.proc.wait(5) if self.proc is not None else None
                except subprocess.TimeoutExpired:  # the pipe broke but the child lingers: killed below
                    code = None
                self.kill()
                self._report(src, log_extra, died=True)
                # a child of other code (it said so, or died of it: an import of the new code that fails) is not the
                # file's; nor, once the code changed, is a crash a new child would meet only in other code
                if worker.code_on_disk() != worker.CODE:
                    raise CodeChanged() from None
                if code == CODE_CHANGED_EXIT:
                    raise CodeChanged(upgraded=False) from None
                how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                if attempt == 1:
                    log.warning("decoder died (%s); trying the file again in a new one", how,
                                extra={**(log_extra or {}), "file": str(src)})
                    continue
                # a crash the bytes cause (a codec's SIGSEGV) happens again in a new child: the file's. A SIGKILL
                # (the OOM killer on a loaded machine, an operator), an exit or a pipe broken is the machine's
                raise DecodeError(f"the decoder crashed on this file, twice ({how})",
                                  in_file=code is not None and -code in CRASH_SIGNALS) from None
            self._report(src, log_extra)
            if status == "scratch":
                raise ScratchError(*payload)
            if status == "too_long":
                raise TooLong(payload)
            if status == "too_small":
                raise ScratchTooSmall(payload)
            if status != "ok":  # n: whether the reason is in the file's bytes (_failed)
                raise DecodeError(payload, in_file=n)
            return AudioInfo(**payload), n
        raise AssertionError("unreachable")


class DecoderPool:
    """A fixed set of decoder children shared by the threads of this worker process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: queue.Queue[DecoderProcess] = queue.Queue()
        for _ in range(size):
            self._free.put(DecoderProcess())

    @contextlib.contextmanager
    def checkout(self) -> Iterator[DecoderProcess]:
        d = self._free.get()
        try:
            yield d
        finally:
            self._free.put(d)

    def warm(self) -> None:
        """Start every child now (interpreter + codec imports take a second), not on the first file."""
        for d in list(self._free.queue):
            if not d.alive():
                d._start()

    def close(self) -> None:
        while not self._free.empty():
            self._free.get_nowait().close()


def pool_size(configured: int, device_type: str, worker_processes: int = 1, cpu_count: int | None = None) -> int:
    """Decoder children per worker process: CLAPQ_DECODERS if set; else 2 beside a CPU model, which
    already uses every core (more only steal from it, BENCHMARKS.md); beside a GPU model, the cores
    this process's share of the machine has but one (one 10 s clip takes ~11 ms of a core to decode,
    so two children would cap a GPU at ~180 clips/s)."""
    if configured > 0:
        return configured
    if device_type != "cuda":
        return 2
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 2)
    return max(2, cores // max(1, worker_processes) - 1)


_pools: dict[int, DecoderPool] = {}
_lock = threading.Lock()


def get_pool(size: int) -> DecoderPool:
    """The process-wide pool (children are started lazily, on first use)."""
    with _lock:
        if size not in _pools:
            _pools[size] = DecoderPool(size)
            atexit.register(_pools[size].close)
        return _pools[size]


if __name__ == "__main__":
    from clapq.malloc import keep_freed_memory

    # a SIGTERM sent to every process of the worker at once (systemd's default KillMode) killed this child
    # mid-file, its parent's task starting the file again in a new one ("decoder died (signal 15)") while that
    # task was handing it back for the worker's stop. Its parent ends it (SIGKILL, or EOF on its socket), as it
    # already is left by Ctrl-C: SIGINT comes ignored from the pool child
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    keep_freed_memory()  # each file's sample buffers reuse the last one's pages
    _child(Connection(int(sys.argv[1])), sys.argv[2] if sys.argv[2:] else None)
