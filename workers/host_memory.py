"""Handing freed host memory back to the operating system, in a long-lived model replica.

A replica allocates and frees host tensors of a different size every step (the batch's tokens, logits,
sampling buffers; on CPU the whole forward pass). glibc's malloc keeps freed chunks in its arenas for reuse
and returns their pages to the OS only when the top of a heap is free, so with varying sizes the process's
RSS climbs for many minutes under steady load, although nothing leaks: a 6-minute in-process soak
(16 streams, random prompt and output lengths, cancels) went from 1.6 to 2.3 GiB, and to 1.8 GiB flat with
`malloc_trim(0)` every 15 s (docs/serving.md, "Measured"). Operators read a climbing RSS as a leak, and
the kernel counts it against the pod's memory limit, so the replica trims periodically.

`malloc_trim` walks glibc's arenas, returning whole free pages (a few ms on a 2 GiB heap, less when little
was freed since the last call). It is glibc-only: elsewhere (musl, macOS) `trim_host_memory` does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("herd.host_memory")

# How often a replica returns freed host memory (seconds).
TRIM_PERIOD_S = 10.0


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_host_memory() -> bool:
    """Return free heap pages to the OS (glibc's malloc_trim(0)); False where that is not available. ctypes
    releases the GIL for the call, so it may run in a worker thread beside the engine's."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
