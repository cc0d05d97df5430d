"""Host-process settings that make XLA on CPU faster: keep freed memory for reuse.

XLA:CPU allocates each execution's temporaries as one block (73 MB for the quick-start
train step, over 1 GB at the gpt2 shape) from a worker thread and frees it when the
step ends. glibc serves a block that size with a fresh ``mmap`` every time (thread
arenas cannot hold it, and 32 MB is the most its mmap threshold adapts to), so every
step page-faults its whole working set back in: 18,000 faults (4 KiB each) per
quick-start step, about a tenth of its time on a 2-core CPU.

:func:`keep_freed_memory` tells glibc to serve every thread from the main heap, never
to ``mmap`` a block, and never to give freed memory back to the kernel. The process
keeps its peak footprint (which a training process reaches on its first step anyway),
and steps run without faults. Entry points call it, library functions do not (a process
setting is the program's to choose): every ``gptjax`` command does, and a script that
wants it calls it before JAX starts its backend (its worker threads pick their arena on
their first allocation). ``GPTJAX_KEEP_HOST_MEMORY=0``
turns it off. It does nothing where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory; True if it is in effect (idempotent)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("GPTJAX_KEEP_HOST_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied
