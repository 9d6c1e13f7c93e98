"""Code in a Serve replica learns when Serve begins to shut that replica down.

Serve stops a replica (scale-down, redeploy or reload, `serve.delete`, a node drain) by draining it: it waits
until the replica has no ongoing request, up to `graceful_shutdown_timeout_s`, then kills it. A request that
never ends by itself holds that drain for the whole timeout and then dies with the process. A gRPC
Health.Watch stream is one: it lasts as long as its client. With one watcher connected, stopping a herd serve
took 62 s instead of 2, ended with "could not wait for in-flight requests", and the watcher got INTERNAL
"actor unavailable".

Serve 2.60 gives user code no signal that the drain has begun, so `on_replica_shutdown` wraps the replica's
shutdown method (`ray.serve._private.replica.Replica._perform_graceful_shutdown`, in the calling process only)
to call back first. The ingress then ends its Health.Watch streams with NOT_SERVING and UNAVAILABLE, which
health-checking clients take as "go elsewhere", and the drain waits for real requests only. Where a Ray
version lacks the method, the caller is told (False) and says so in its log: the drain then waits as before.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(f"herd.{__name__}")

_callbacks: list[Callable[[], None]] = []
_lock = threading.Lock()


def on_replica_shutdown(callback: Callable[[], None]) -> bool:
    """Call `callback()` when Serve begins to shut down this process's replica (from Serve's event loop, which
    may not be the caller's: hand work to your own loop with call_soon_threadsafe). False where this Serve has
    no shutdown method to wrap."""
    with _lock:
        if not _wrap_shutdown():
            return False
        _callbacks.append(callback)
        return True


def _wrap_shutdown() -> bool:
    try:
        from ray.serve._private.replica import Replica
    except ImportError:
        return False
    original = getattr(Replica, "_perform_graceful_shutdown", None)
    if original is None:
        return False
    if getattr(original, "herd_calls_back", False):
        return True

    async def _perform_graceful_shutdown(self, *args, **kwargs):
        for callback in list(_callbacks):
            try:
                callback()
            except Exception:  # noqa: BLE001 - the shutdown goes on whatever a callback does
                log.warning("a replica shutdown callback failed", exc_info=True)
        return await original(self, *args, **kwargs)

    _perform_graceful_shutdown.herd_calls_back = True
    Replica._perform_graceful_shutdown = _perform_graceful_shutdown
    return True
