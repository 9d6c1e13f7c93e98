"""cluster.host_memory: freed heap pages go back to the OS (what keeps a long-lived replica's RSS flat)."""
from __future__ import annotations

import platform

import psutil
import pytest

from workers.host_memory import trim_host_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


def _uss_mib() -> float:
    return psutil.Process().memory_full_info().uss / 2**20  # from smaps: exact, unlike the lagging RSS counter


@glibc_only
def test_freed_heap_pages_return_to_the_os():
    # 200 MiB in 100 KiB chunks (below malloc's mmap threshold: they live in the heap), then all but every 50th
    # freed: the survivors pin the heap, so malloc keeps the freed pages until trimmed.
    chunks = [bytearray(100_000) for _ in range(2000)]
    survivors = chunks[::50]
    del chunks
    before = _uss_mib()
    assert trim_host_memory() is True
    after = _uss_mib()
    assert before - after > 100, (before, after)
    assert len(survivors) == 40
