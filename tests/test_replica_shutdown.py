"""cluster.replica_shutdown on Serve's own Replica class: the callback runs before Serve's shutdown does."""
from __future__ import annotations

import asyncio

from cluster import replica_shutdown


def test_the_callback_runs_before_serves_graceful_shutdown(monkeypatch):
    from ray.serve._private.replica import Replica

    order = []

    async def serve_shutdown(self):   # stands in for Serve's method, which would stop a real replica
        order.append("serve")
        return "done"
    # Restored after the test: the class attribute and herd's callbacks.
    monkeypatch.setattr(Replica, "_perform_graceful_shutdown", serve_shutdown)
    monkeypatch.setattr(replica_shutdown, "_callbacks", [])

    def failing():
        raise RuntimeError("a broken callback")
    assert replica_shutdown.on_replica_shutdown(failing)
    assert replica_shutdown.on_replica_shutdown(lambda: order.append("herd"))
    wrapped = Replica._perform_graceful_shutdown
    assert wrapped is not serve_shutdown and wrapped.herd_calls_back
    assert replica_shutdown.on_replica_shutdown(lambda: order.append("again"))
    assert Replica._perform_graceful_shutdown is wrapped          # wrapped once per process

    assert asyncio.run(Replica._perform_graceful_shutdown(object())) == "done"
    assert order == ["herd", "again", "serve"]                     # a failing callback does not stop the rest


def test_a_serve_without_the_method_says_so(monkeypatch):
    from ray.serve._private.replica import Replica

    monkeypatch.delattr(Replica, "_perform_graceful_shutdown")
    monkeypatch.setattr(replica_shutdown, "_callbacks", [])
    assert replica_shutdown.on_replica_shutdown(lambda: None) is False
    assert replica_shutdown._callbacks == []
