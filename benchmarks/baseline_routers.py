"""Baseline request routers that `herd bench serve` compares herd's PrefixCacheRouter with (never used to serve).

Serve's own default, PowerOfTwoChoicesRequestRouter, is the other baseline; it needs no code here.
"""
from __future__ import annotations

import itertools
from typing import Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn (by replica id), blind to load and to what is cached: the
    replica after it ranks second, and so on, so a full replica does not stall the request."""

    def initialize_state(self, **kwargs):   # (the prefix router's kwargs arrive too: nothing to use here)
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if not hasattr(self, "_turn"):
            self._turn = itertools.count()
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = next(self._turn) % len(ordered)
        rotated = ordered[i:] + ordered[:i]
        return [[rotated[0]], rotated[1:]] if len(rotated) > 1 else [rotated]
