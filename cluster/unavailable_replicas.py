"""Replicas just found unavailable (a broken stream, an engine that is down): a retry before the first token
goes elsewhere.

Why this exists: with Serve's gRPC transport (herd's default) a replica that dies under a stream surfaces in
the ingress as `ActorUnavailableError`, but Serve's router never hears of it. Its completion callback gets the
gRPC call object rather than the error, so it neither drops the replica nor invalidates its queue-length
entry. The router keeps offering the dead replica, and often prefers it, since its streams just ended and its
queue looks empty, until the controller notices the death and broadcasts the new replica set: ~0.1 s on an
idle machine, seconds on a busy one. A request sent again "before its first token" in that window lands on the
dead replica again and fails twice.

A replica whose engine is down (a dead engine process or TP×PP shard) is alive as an actor until its failing
health check gets it replaced, and it answers every request at once with UNAVAILABLE: it too looks idle, and
would draw a retry back. Its error names its actor (cluster.deployment), so it is noted the same way.

So the ingress notes the actor id its failed stream names (`note_unavailable`), and `PrefixCacheRouter`
leaves such replicas out of its candidates (`without_unavailable`) for its `unavailable_ttl_s` (the router
config's key, DEFAULT_TTL_S). That holds unless that would leave none: a replica that was only briefly
unreachable is still used when it is all there is. Both run in the ingress process (the router is the
ingress's handle router), so a process-wide table is enough. Its size is bounded by the replicas that fail
within MAX_TTL_S: older entries are dropped whenever a replica is noted or a choice is made, including those of
replicas that are gone and never asked about again.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence, TypeVar

# Long enough to cover the controller's replacement of a dead replica on a busy machine (its health check
# marks a crashed actor at once, a hung one within health_check_timeout_s), short enough that a replica that
# was only briefly unreachable returns to rotation soon.
DEFAULT_TTL_S = 10.0
# The longest TTL a router may ask for (RouterConfig.unavailable_ttl_s's bound): entries older than this are
# no router's concern and are dropped.
MAX_TTL_S = 300.0

_lock = threading.Lock()  # the ingress's event loop notes, the router's own loop thread reads
_noted: dict[str, float] = {}  # actor id (hex) -> monotonic time it was noted

R = TypeVar("R")


def unavailable_actor_id(exc: BaseException) -> Optional[str]:
    """The actor id (hex) a Ray actor error names, also when it is wrapped as another error's cause."""
    from ray.exceptions import RayActorError

    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, RayActorError) and isinstance(getattr(e, "actor_id", None), str):
            return e.actor_id
    return None


def note_unavailable(exc: BaseException, now: Optional[float] = None) -> Optional[str]:
    """Remember the replica actor that `exc` says is unavailable (if it names one); returns its id."""
    actor_id = unavailable_actor_id(exc)
    note_actor_unavailable(actor_id, now)
    return actor_id


def note_actor_unavailable(actor_id: Optional[str], now: Optional[float] = None) -> None:
    """Remember a replica actor found unavailable: its stream broke, or it answered that its engine is down."""
    if isinstance(actor_id, str) and actor_id:
        now = time.monotonic() if now is None else now
        with _lock:
            _drop_expired(now)
            _noted[actor_id] = now


def noted_unavailable(ttl_s: float = DEFAULT_TTL_S, now: Optional[float] = None) -> set[str]:
    """The actor ids noted within the last `ttl_s` seconds."""
    if not _noted:  # the common case, without the lock: nothing failed lately
        return set()
    now = time.monotonic() if now is None else now
    with _lock:
        _drop_expired(now)
        return {actor_id for actor_id, at in _noted.items() if now - at < ttl_s}


def without_unavailable(replicas: Sequence[R], actor_id_of: Callable[[R], Optional[str]],
                        ttl_s: float = DEFAULT_TTL_S, now: Optional[float] = None) -> list[R]:
    """The replicas not noted unavailable within `ttl_s`; all of them when every one is (or none is)."""
    noted = noted_unavailable(ttl_s, now)
    if not noted:
        return list(replicas)
    live = [r for r in replicas if actor_id_of(r) not in noted]
    return live or list(replicas)


def _drop_expired(now: float) -> None:
    for actor_id in [a for a, at in _noted.items() if now - at >= MAX_TTL_S]:
        del _noted[actor_id]


def forget_all() -> None:
    """Clear the table (tests)."""
    with _lock:
        _noted.clear()
