"""Keep freed memory in the process for reuse: CPU training allocates and frees tens of MB per step.

glibc hands large blocks (above a threshold that adapts only up to 32 MB) to mmap and returns them on
free, so every training step faults the same pages in again and the kernel zeroes them: measured on
perovskites (cgcnn, batch 256, 2 threads) that is ~10% of a CPU step. Raising the mmap and trim
thresholds keeps such blocks in the heap for the next step (peak memory is unchanged; it is not given
back to the system until the process ends). No effect where the C library has no ``mallopt``.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from (and go back to) the heap; 1 GiB covers any batch tensor
THRESHOLD = 2**30
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold only once the mmap one is set: alone it pins the mmap threshold at 128 KB
    _done = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    return _done
