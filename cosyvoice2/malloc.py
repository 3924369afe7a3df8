"""glibc's allocator told to hand large freed blocks back to the system (Linux only).

Why: MLX's CPU buffers come from `malloc`. glibc serves a large request with its own
`mmap` (and returns it on `free`) only above a threshold that it raises, by default,
whenever such a block is freed, up to 32 MB; after a few frees every buffer of a call
(mel frames, vocoder activations of a few MB each) is carved from the heap instead, and
freed heap blocks stay resident. Over a call that leaves a process a few hundred MB
above the memory it uses. A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops
the raising) keeps blocks of 1 MB and more mapped and returned on free; MLX's own buffer
cache still reuses freed buffers within a call.

`trim()` hands back the free memory of every heap (glibc's `malloc_trim`): load calls it
once the model is built, after the temporaries of building it (the tokenizer's merges,
built on a second thread, whose heap glibc trims only from its top) are freed.

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


def trim() -> bool:
    """Return the free pages of glibc's heaps to the system (`malloc_trim(0)`); whether it
    ran (glibc on Linux, `COSYVOICE2_MALLOC_TUNE` not 0)."""
    if not (sys.platform.startswith("linux") and settings.flag("COSYVOICE2_MALLOC_TUNE")):
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
