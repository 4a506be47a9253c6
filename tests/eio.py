"""Real read errors for the tests: an LD_PRELOAD library, compiled here with the system's C compiler, that makes
a process's reads of chosen files fail with EIO (a failing disk, a network mount that hiccups) from a given byte
on. It wraps read(), __read_chk() and pread()/pread64() as the readers call them (FFmpeg's file protocol,
libsndfile, Python's own file objects); reads glibc makes inside itself (stdio's fread) are not seen.

Environment of the process it is preloaded into (read once, as the library loads):
  EIO_FILES  paths, separated by ':'; a file is matched by its device and inode, whatever name opened it
  EIO_AT     the first byte that cannot be read, counted from each file's start; with '%', that share of its size.
             A read that reaches it returns the bytes before it (a short read); the next one fails
  EIO_TIMES  how many reads fail in all before the files read as they are again (a fault that passes); unset:
             every one, for good
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FILES 16
static struct { dev_t dev; ino_t ino; off_t at; } files[MAX_FILES];
static int n_files;
static long times = -1;  /* reads left to fail; -1: all */

__attribute__((constructor)) static void init(void) {
    const char *list = getenv("EIO_FILES"), *at = getenv("EIO_AT"), *t = getenv("EIO_TIMES");
    if (!list || !at) return;
    if (t) times = atol(t);
    char *copy = strdup(list), *save = NULL;
    for (char *p = strtok_r(copy, ":", &save); p && n_files < MAX_FILES; p = strtok_r(NULL, ":", &save)) {
        struct stat st;
        if (stat(p, &st) != 0) continue;
        files[n_files].dev = st.st_dev;
        files[n_files].ino = st.st_ino;
        files[n_files].at = strchr(at, '%') ? st.st_size * atoll(at) / 100 : atoll(at);
        n_files++;
    }
    free(copy);
}

/* how many of `n` bytes at `pos` (-1: the fd's offset) may be read: -1 with errno EIO where none */
static ssize_t allowed(int fd, off_t pos, size_t n) {
    struct stat st;
    if (!n_files || !times || n == 0 || fstat(fd, &st) != 0) return (ssize_t)n;
    for (int i = 0; i < n_files; i++) {
        if (files[i].dev != st.st_dev || files[i].ino != st.st_ino) continue;
        if (pos < 0) pos = lseek(fd, 0, SEEK_CUR);
        if (pos < 0) return (ssize_t)n;
        if (pos >= files[i].at) {
            if (times > 0) times--;
            errno = EIO;
            return -1;
        }
        return pos + (off_t)n > files[i].at ? (ssize_t)(files[i].at - pos) : (ssize_t)n;
    }
    return (ssize_t)n;
}

#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t read(int fd, void *buf, size_t n) {
    REAL(read);
    ssize_t k = allowed(fd, -1, n);
    return k < 0 ? -1 : real(fd, buf, (size_t)k);
}

ssize_t __read_chk(int fd, void *buf, size_t n, size_t size) {
    REAL(__read_chk);
    ssize_t k = allowed(fd, -1, n);
    return k < 0 ? -1 : real(fd, buf, (size_t)k, size);
}

ssize_t pread(int fd, void *buf, size_t n, off_t pos) {
    REAL(pread);
    ssize_t k = allowed(fd, pos, n);
    return k < 0 ? -1 : real(fd, buf, (size_t)k, pos);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t pos) {
    REAL(pread64);
    ssize_t k = allowed(fd, pos, n);
    return k < 0 ? -1 : real(fd, buf, (size_t)k, pos);
}
"""


class Unavailable(RuntimeError):
    """No C compiler here, or it could not build the library."""


def build(directory: Path) -> Path:
    """The library, compiled into `directory`."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc, gcc) to build the EIO library with")
    src, lib = directory / "eio.c", directory / "libeio.so"
    src.write_text(SOURCE)
    done = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode:
        raise Unavailable(f"the EIO library did not build: {done.stderr.strip()[:500]}")
    return lib


def env(lib: Path, files: list[Path], at: str = "50%", times: int | None = None) -> dict[str, str]:
    """The environment that makes a process's reads of `files` fail from byte `at` on (`times` reads in all)."""
    out = {"LD_PRELOAD": str(lib), "EIO_FILES": ":".join(str(f) for f in files), "EIO_AT": at}
    if times is not None:
        out["EIO_TIMES"] = str(times)
    return out
