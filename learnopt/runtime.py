"""Process settings that make meta-training fast on CPU.

``keep_freed_memory`` tells glibc's allocator to keep freed memory for reuse. Meta-training
allocates and frees many tensors of a few MiB every unrolled step (gates, saved activations,
their gradients). By default glibc serves each allocation above 128 KiB to 32 MiB with a
fresh ``mmap`` or returns the top of its heap to the system once freed, so the next step
touches new pages, page faults that can cost more than the arithmetic (``docs/benchmarks``
has the measurements). ``learnopt meta-train`` applies it at start-up; ``LEARNOPT_KEEP_FREED_MEMORY=0``
turns that off. It is the in-process equivalent of the environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``, and a no-op where the C library is
not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest dynamic mmap threshold on 64-bit
TRIM_THRESHOLD_BYTES = 2**31 - 1

ENV_SWITCH = "LEARNOPT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and keep up to 2 GiB of freed memory in
    the process (``mallopt(M_MMAP_THRESHOLD, 32 MiB)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``).
    Process-wide.

    Returns:
        Whether it applied (False without glibc).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
            and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))


def apply_defaults() -> bool:
    """What ``learnopt meta-train`` runs at start-up: ``keep_freed_memory()`` unless the
    environment sets ``LEARNOPT_KEEP_FREED_MEMORY=0``.

    Returns:
        Whether it applied.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return keep_freed_memory()
