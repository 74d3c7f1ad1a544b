"""Process-wide settings that the entry points (app, CLI, benchmarks, evaluation, training) apply.

Library code never calls these: changing how the whole process allocates memory is the caller's choice.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_MAX = -4
KEEP_TOP = 1 << 30  # free memory kept at the top of the heap before it goes back to the system

DISABLE_ENV = "MIMO_CHAT_DEFAULT_MALLOC"


def keep_freed_memory() -> bool:
    """Make glibc serve large tensors from its heap and keep freed memory for the next tensor.

    By default glibc maps every block above a threshold (128 kB, adapting up to 32 MB) fresh from
    the system and unmaps it when freed, so each new activation of the image encoder pays page
    faults and zeroing again. Keeping freed memory makes LiteMedSAM's image encoding faster on a
    CPU (``python -m mimo_chat.bench segment`` with and without ``MIMO_CHAT_DEFAULT_MALLOC=1``; the
    README's Measured table) at the cost of a process that holds on to its peak memory.

    Returns True when applied; False on other C libraries, or when ``$MIMO_CHAT_DEFAULT_MALLOC`` is set.
    """
    if os.environ.get(DISABLE_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TOP))
