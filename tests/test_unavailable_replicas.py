"""cluster.unavailable_replicas: the ingress notes the replica a broken stream names, and the router leaves it
out of a retry's choice while another replica remains, until the note expires."""
from __future__ import annotations

import asyncio

import pytest
from ray import ActorID
from ray.exceptions import ActorDiedError, ActorUnavailableError

from cluster import unavailable_replicas as ur
from tests.test_routing import CONV_A, FakeReplica, blocks, make_router, names, request


@pytest.fixture(autouse=True)
def clean_table():
    ur.forget_all()
    yield
    ur.forget_all()


class Named:
    def __init__(self, name: str):
        self.name, self.actor = name, ActorID.from_random().hex()


def test_a_broken_streams_actor_is_noted_and_expires_after_the_ttl():
    a = ActorID.from_random()
    assert ur.note_unavailable(ActorUnavailableError("Actor is unavailable.", a.binary()), now=100.0) == a.hex()
    assert ur.noted_unavailable(now=100.0 + ur.DEFAULT_TTL_S - 0.1) == {a.hex()}
    assert ur.noted_unavailable(now=100.0 + ur.DEFAULT_TTL_S) == set()
    assert ur.noted_unavailable(ttl_s=30.0, now=100.0 + 29.9) == {a.hex()}   # each router reads with its own TTL
    assert ur.noted_unavailable(ttl_s=0.0, now=100.0) == set()               # 0: the rule is off
    assert ur.noted_unavailable(ttl_s=ur.MAX_TTL_S, now=100.0 + ur.MAX_TTL_S) == set()
    assert ur.noted_unavailable(ttl_s=ur.MAX_TTL_S, now=100.0) == set()      # dropped past MAX_TTL_S, not revived


def test_entries_of_replicas_never_asked_about_again_are_dropped_too():
    gone = [ActorID.from_random().hex() for _ in range(50)]  # replicas that died and were replaced
    for i, actor_id in enumerate(gone):
        ur.note_actor_unavailable(actor_id, now=float(i))
    later = ActorID.from_random().hex()
    ur.note_actor_unavailable(later, now=50.0 + ur.MAX_TTL_S)
    assert ur._noted == {later: 50.0 + ur.MAX_TTL_S}


def test_an_error_wrapping_an_actor_error_names_its_actor_and_others_name_none():
    a = ActorID.from_random()

    class Wrapped(Exception):
        cause = ActorDiedError()

    Wrapped.cause.actor_id = a.hex()
    assert ur.note_unavailable(Wrapped()) == a.hex()
    assert ur.note_unavailable(ValueError("bad input")) is None
    assert ur.note_unavailable(ActorUnavailableError("gone", None)) is None  # no id: nothing to leave out


def test_noted_replicas_are_left_out_unless_none_would_remain():
    a, b = Named("a"), Named("b")
    ur.note_unavailable(ActorUnavailableError("gone", ActorID.from_hex(a.actor).binary()), now=0.0)
    assert ur.without_unavailable([a, b], lambda r: r.actor, now=1.0) == [b]
    assert ur.without_unavailable([a], lambda r: r.actor, now=1.0) == [a]           # it is all there is
    assert ur.without_unavailable([a, b], lambda r: None, now=1.0) == [a, b]       # ids unknown: all kept
    assert ur.without_unavailable([a, b], lambda r: r.actor, now=ur.DEFAULT_TTL_S) == [a, b]
    assert ur.without_unavailable([a, b], lambda r: r.actor, ttl_s=0.0, now=1.0) == [a, b]


def dead_and_live(router) -> tuple[FakeReplica, FakeReplica]:
    """Two replicas with actor ids, given to `router`; the dead one holds the prompt's whole prefix, so affinity
    would pick it."""
    dead, live = FakeReplica("dead"), FakeReplica("live")
    for r in (dead, live):
        r.actor_id = ActorID.from_random()
    dead.report(blocks(CONV_A))
    router.update_replicas([dead, live])
    return dead, live


def test_the_router_never_offers_a_noted_replica_while_another_remains():
    async def go():
        router = make_router()
        dead, live = dead_and_live(router)
        assert names(await router.choose_replicas([dead, live], request(CONV_A)))[0] == ["dead"]
        ur.note_unavailable(ActorUnavailableError("gone", dead.actor_id.binary()))
        for _ in range(20):
            ranks = names(await router.choose_replicas([dead, live], request(CONV_A)))
            assert ranks == [["live"]], ranks
        assert names(await router.choose_replicas([dead], request(CONV_A))) == [["dead"]]
    asyncio.run(go())


def test_the_routers_unavailable_ttl_comes_from_its_config():
    async def go(ttl_s):
        router = make_router(unavailable_ttl_s=ttl_s)
        dead, live = dead_and_live(router)
        ur.note_unavailable(ActorUnavailableError("gone", dead.actor_id.binary()))
        return names(await router.choose_replicas([dead, live], request(CONV_A)))[0]

    assert asyncio.run(go(5.0)) == ["live"]
    ur.forget_all()
    assert asyncio.run(go(0.0)) == ["dead"]     # off: affinity picks the replica holding the prefix again
    with pytest.raises(ValueError, match="unavailable_ttl_s"):
        make_router(unavailable_ttl_s=ur.MAX_TTL_S + 1)


def test_the_cluster_config_carries_the_ttl_to_every_models_router():
    from cluster.config import ClusterConfig, ConfigError

    models = [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b", "router": {"unavailable_ttl_s": 2}}]
    config = ClusterConfig.from_dict({"models": models, "router": {"unavailable_ttl_s": 30}})
    assert [m.router_kwargs["unavailable_ttl_s"] for m in config.models] == [30.0, 2.0]
    assert ClusterConfig.from_dict({"models": models[:1]}).models[0].router_kwargs["unavailable_ttl_s"] == \
        ur.DEFAULT_TTL_S
    with pytest.raises(ConfigError, match="unavailable_ttl_s"):
        ClusterConfig.from_dict({"models": models[:1], "router": {"unavailable_ttl_s": -1}})
