"""How the worker's processes allocate memory: glibc's allocator told to keep the memory a process frees,
for the process's next allocations, and torch's large CPU buffers on transparent huge pages.

By default glibc hands a freed block of 128 KiB or more (a threshold it raises as it sees such blocks
freed, up to 32 MiB) back to the kernel, and shrinks the heap once 128 KiB at its top are free. The worker
allocates and frees the same large buffers on every batch, in several threads (the model's activations in
each lane, the log-mel frames, the decoded samples), so under the defaults those buffers keep coming back
as fresh pages that the kernel faults in and zeroes again. On the 2-core VM (BENCHMARKS.md, session 15,
two alternated pairs of runs) these settings took the worker from 121-133 to 103-111 CPU-ms a clip and
the service from 12.86 to 15.25 clips a second (+19%; raw, in a process with the same settings, +9%), at
the same peak RSS. The process's memory stays at its high-water mark instead of shrinking between
batches; the worker's peak RSS already counted that mark.

Only glibc has these knobs; elsewhere (musl, macOS) this does nothing and says so.

torch places CPU buffers of 2 MiB or more on transparent huge pages when THP_MEM_ALLOC_ENABLE=1 (read
once, at its first CPU allocation): 512 times fewer page faults and TLB entries for the model's
activations. Measured the same way (session 15, four alternated pairs): the worker -7% CPU a clip, the
service +8% clips a second, raw +2%; the worker's peak RSS rises by 0.1-0.2 GB (to 1.38-1.50 GB with the
full-size model, flat once warm). It needs the kernel's THP mode to be `madvise` or `always`
(`/sys/kernel/mm/transparent_hugepage/enabled`); THP_MEM_ALLOC_ENABLE=0 in the worker's environment
turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (
    (M_MMAP_THRESHOLD, 1 << 30),  # only blocks over 1 GiB get their own mapping, returned when freed
    (M_TRIM_THRESHOLD, 2**31 - 1),  # the heap is never shrunk (mallopt takes an int)
    (M_TOP_PAD, 512 << 20),  # and grows 512 MiB of address space at a time (pages count once touched)
)


def keep_freed_memory() -> bool:
    """Apply SETTINGS to this process (and to the children it forks later); True where glibc took them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # musl's mallopt is a stub that answers 0
    return all([mallopt(param, value) == 1 for param, value in SETTINGS])


def torch_huge_pages() -> bool:
    """Turn on torch's huge-page CPU buffers unless THP_MEM_ALLOC_ENABLE is set already (a user's 0 stays);
    call before torch allocates its first tensor. True where they are on and the kernel can give them."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1" and thp_mode() in ("always", "madvise")


def thp_mode() -> str:
    """The kernel's transparent huge page mode (the bracketed word), or '' where it cannot be read."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.partition("[")[2].partition("]")[0]
