"""glibc's allocator told to hand large freed blocks back to the system (Linux only).

Why: MLX's CPU buffers come from `malloc`. glibc serves a large request with its own
`mmap` (and returns it on `free`) only above a threshold that it raises, by default,
whenever such a block is freed, up to 32 MB; after a few frees every buffer of a call
(mel frames, vocoder activations of a few MB each) is carved from the heap instead, and
freed heap blocks stay resident. Over a call that leaves a process a few hundred MB
above the memory it uses. A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops
the raising) keeps blocks of 1 MB and more mapped and returned on free; MLX's own buffer
cache still reuses freed buffers within a call.

`COSYVOICE2_MALLOC_TUNE=0` leaves the allocator as it is. Nothing is done where the C
library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import sys

from cosyvoice2 import settings

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20

_done: bool | None = None


def tune() -> bool:
    """Set the fixed mmap threshold once per process; whether it is set."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux") and settings.flag("COSYVOICE2_MALLOC_TUNE"):
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (AttributeError, OSError):  # not glibc
                return False
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return _done
