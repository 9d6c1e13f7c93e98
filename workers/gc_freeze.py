"""Start-up objects out of the garbage collector's full collections, in every long-lived serving process.

CPython's full (generation 2) collection walks every container object the process holds, and holds the GIL
while it does: whatever that process was doing waits. A serving process holds most of its objects from
start-up on (Ray, Serve, grpc, protobuf, pydantic, torch, the tokenizers: ~140k in the ingress, ~250k in an
engine process), and a full collection comes whenever a quarter as many new ones have piled up since the
last. Measured on 2 vCPUs (`herd bench load --concurrency 1 --skip-in-process --overload` with a
`gc.callbacks` timer in every process): one full collection in the ingress took 163-176 ms in the middle of
the sustained overload, and the refusals arriving meanwhile took 150-250 ms instead of ~20 (the run's p99).

`gc.freeze()` moves every object alive at that moment into a permanent generation that no collection walks
again (vLLM and SGLang freeze after their start-up the same way), so a later full collection walks only what
came since. Each process freezes once, when its start-up is done: the engine process after its model loaded,
the model replica after its engine is up, the ingress after its warm-up asked every model for its info (the
first calls through Serve's handles import and build much of what requests use). Cycles among frozen
objects are never collected, which costs nothing here: start-up objects live as long as the process.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("herd.gc_freeze")


def freeze_startup_objects(where: str) -> int:
    """Collect what start-up left as garbage, then freeze the rest; returns how many objects are frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%s: %d start-up objects frozen out of the garbage collector's full collections (%.0f ms)",
             where, frozen, (time.perf_counter() - t0) * 1000)
    return frozen
