"""Fixed glibc malloc thresholds for processes that move bulk data.

glibc serves blocks above its mmap threshold with fresh mappings, raises that
threshold to the largest such block freed, and gives the top of the heap back
to the kernel whenever more than twice the threshold lies free there.  A
tunnel reads and writes 256 KiB buffers and frees them as fast as it allocates
them, so the free top of the heap crosses the trim threshold on nearly every
read: each new buffer is then fresh pages, one page fault per 4 KiB.  Measured
on the yamux CLI echoing 2 GiB over one stream: 341,000 page faults and 2.3 s
of CPU in the echo process; 15,700 faults and 1.55 s with fixed thresholds.

Both thresholds are set together: setting either alone turns glibc's dynamic
adjustment off and leaves the other at its default, which is worse than both
untouched (every 256 KiB buffer mapped afresh, or the top trimmed at 128 KiB).
"""

import ctypes
import os
import platform

from twisted.logger import Logger

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap and are reused (256 KiB I/O buffers,
# 1 MiB gRPC messages); only larger ones are mapped afresh.
MMAP_THRESHOLD = 2 * 1024 * 1024
# Free memory at the heap's top kept for reuse instead of handed back.  16 MiB
# streamed no faster and kept 40 MiB more resident in grpcmux-server after the
# benchmark's streaming (134 MiB against 94; 89 with glibc's own thresholds).
TRIM_THRESHOLD = 4 * 1024 * 1024

# An operator who tunes malloc through the environment keeps their choice.
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_log = Logger(namespace="grpcmux.malloc")


def tune_malloc(environ=None):
    """Fix glibc's mmap and trim thresholds; returns True when they were set.

    Nothing is done (False) on other C libraries or when the environment
    already tunes malloc (``MALLOC_*_`` variables or ``glibc.malloc`` tunables).
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in _OPERATOR_SETTINGS):
        return False
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        _log.warn("glibc refused the malloc thresholds; bulk transfers will page-fault more")
        return False
    _log.debug("malloc: blocks up to {mmap_threshold} bytes from the heap, up to "
               "{trim_threshold} free bytes kept at its top",
               mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
    return True
