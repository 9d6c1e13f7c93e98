"""cluster.request_body: an HTTP body bounded in size, in time, and in how many arrive slowly at once.

The bodies here either arrive at once or never (a queue nobody fills), so the outcomes do not depend on this
machine's speed; the slow threshold is short so that a test waits tenths of a second, not seconds."""
from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, Request

from cluster.ingress import Frontend
from cluster.request_body import BodyRefused, GuardedBody, SlowBodies

pytestmark = pytest.mark.asyncio
TIMEOUT_S = 0.6


SLOW_AFTER_S = 0.05


class Client:
    """The messages of one request's body, as Serve's proxy hands them to the ingress."""

    def __init__(self):
        self.messages: asyncio.Queue = asyncio.Queue()

    async def receive(self) -> dict:
        return await self.messages.get()

    def send(self, body: bytes, more: bool = False) -> None:
        self.messages.put_nowait({"type": "http.request", "body": body, "more_body": more})


def guarded(client: Client, slow: SlowBodies, *, max_slow: int = 2, max_bytes: int = 1000,
            timeout_s: float = TIMEOUT_S) -> GuardedBody:
    return GuardedBody(client.receive, max_bytes=max_bytes, timeout_s=timeout_s, slow_after_s=SLOW_AFTER_S,
                       max_slow=max_slow, slow_bodies=slow)


async def test_a_body_sent_with_its_request_is_never_counted_slow():
    client, slow = Client(), SlowBodies()
    client.send(b"x" * 10)
    body = guarded(client, slow)
    assert (await body.receive())["body"] == b"x" * 10
    assert slow.count == 0
    # once complete, a read waits for the disconnect with no deadline (a stream's cancel detection)
    later = asyncio.ensure_future(body.receive())
    await asyncio.sleep(TIMEOUT_S + 0.2)
    assert not later.done()
    client.messages.put_nowait({"type": "http.disconnect"})
    assert (await later)["type"] == "http.disconnect"


async def test_a_body_that_never_comes_is_408_after_the_timeout_and_stops_counting():
    client, slow = Client(), SlowBodies()
    body = guarded(client, slow)
    reading = asyncio.ensure_future(body.receive())
    await asyncio.sleep(0.3)
    assert slow.count == 1 and not reading.done()     # slow, within its time
    with pytest.raises(BodyRefused) as refused:
        await reading
    assert refused.value.status_code == 408
    assert "request_body_timeout_s" in refused.value.error.message and refused.value.error.field == "body"
    body.close()
    assert slow.count == 0


async def test_slow_bodies_past_the_cap_are_refused_429_at_once():
    slow = SlowBodies()
    clients = [Client() for _ in range(3)]
    bodies = [guarded(c, slow, max_slow=2, timeout_s=30) for c in clients]
    readings = [asyncio.ensure_future(b.receive()) for b in bodies]
    done, _ = await asyncio.wait(readings, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert slow.count == 2
    [third] = done
    with pytest.raises(BodyRefused) as refused:
        third.result()
    assert refused.value.status_code == 429 and refused.value.response().headers["retry-after"] == "1"
    assert "max_slow_request_bodies" in refused.value.error.message
    # the two counted slow ones complete (a slow upload is served), and stop counting
    served = [(c, b, r) for c, b, r in zip(clients, bodies, readings) if r is not third]
    for client, _, reading in served:
        client.send(b"a", more=True)
        assert (await reading)["body"] == b"a"
    assert slow.count == 2                              # still arriving
    for client, body, _ in served:
        client.send(b"b")
        assert (await body.receive())["body"] == b"b"
    assert slow.count == 0
    for body in bodies:
        body.close()
    assert slow.count == 0                              # close() after completion counts nothing twice


async def test_a_disconnect_mid_body_stops_counting_it():
    client, slow = Client(), SlowBodies()
    body = guarded(client, slow)
    reading = asyncio.ensure_future(body.receive())
    await asyncio.sleep(0.2)
    assert slow.count == 1
    client.messages.put_nowait({"type": "http.disconnect"})
    assert (await reading)["type"] == "http.disconnect"
    assert slow.count == 0


async def test_a_chunked_body_past_the_size_limit_is_413():
    client, slow = Client(), SlowBodies()
    body = guarded(client, slow, max_bytes=1000)
    client.send(b"x" * 600, more=True)
    await body.receive()
    client.send(b"x" * 600, more=True)
    with pytest.raises(BodyRefused) as refused:
        await body.receive()
    assert refused.value.status_code == 413 and "max_request_body_bytes" in refused.value.error.message


async def test_the_http_guard_answers_a_slow_body_with_an_openai_error():
    """Through EdgeGuard and a FastAPI route that parses JSON, as Serve's proxy calls the ingress's ASGI app:
    the route never runs, and the client gets the status and an OpenAI error body."""
    from cluster.openai_http import EdgeGuard, _body_refused_handler

    frontend = Frontend({}, {}, ["sekrit"], settings={"limits": {"request_body_timeout_s": TIMEOUT_S,
                                                                 "slow_request_body_s": SLOW_AFTER_S,
                                                                 "max_slow_request_bodies": 1}})
    ran = []
    app = FastAPI()
    app.add_middleware(EdgeGuard, frontend=lambda: frontend)
    app.add_exception_handler(BodyRefused, _body_refused_handler)

    @app.post("/v1/json")
    async def parsed(payload: dict, request: Request):
        ran.append(payload)
        return {"keys": len(payload)}

    async def call(client: Client) -> tuple[int, dict[str, str], bytes]:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/json", "raw_path": b"/v1/json", "query_string": b"",
                 "headers": [(b"authorization", b"Bearer sekrit"), (b"content-type", b"application/json"),
                             (b"content-length", b"20")],
                 "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}
        await app(scope, client.receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    first, second = Client(), Client()
    first.send(b'{"a"', more=True)                      # then nothing more
    (status1, _, body1), (status2, headers2, body2) = await asyncio.gather(call(first), call(second))
    assert (status1, status2) == (408, 429)
    assert b"request_body_timeout_s" in body1 and b'"param":"body"' in body1
    assert headers2["retry-after"] == "1" and b"max_slow_request_bodies" in body2
    assert ran == [] and frontend.slow_bodies.count == 0
    ok = Client()
    ok.send(b'{"a": 1, "b": 2, "c":3}')
    status, _, body = await call(ok)
    assert status == 200 and ran == [{"a": 1, "b": 2, "c": 3}]
