"""herd under load and abuse, end to end: real Ray + Serve on 127.0.0.1, real gRPC and HTTP.

One cluster for the module, API keys on with per-key prefix-cache isolation:
- "wide": one whole-model replica, max_num_seqs 64 — dozens of concurrent streams share its batch;
- "narrow": an engine that holds two requests (one running, one waiting), so overload is easy to provoke;
- "pair": two replicas, for killing one under load.
Nothing here asserts a wall-clock figure: waits are for conditions, with generous deadlines against hangs.
"""
from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from cluster.client import HerdClient, collect
from cluster.pb import inference_pb2 as pb
from cluster.pb import inference_pb2_grpc as pb_grpc
from tests.serve_fixtures import process_running, running_herd_cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY_A, KEY_B = "tenant-a-key-0001", "tenant-b-key-0002"
WIDE = 64
GREEDY = {"temperature": 0.0, "ignore_eos": True}
MAX_MODEL_LEN = 256
LONG = 4096  # "narrow" holds its seats with long generations
# The held bodies' timeout leaves room for the refusals and the checks (~6 s after the last connection here).
SLOW_BODIES, BODY_TIMEOUT_S = 4, 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from workers.demo import write_demo_checkpoint

    path = str(write_demo_checkpoint(tmp_path_factory.mktemp("load") / "m", "llama2-70b-mini", dtype="float32"))
    common = {"path": path, "resources_per_shard": {"CPU": 0.25}, "max_model_len": MAX_MODEL_LEN,
              "kv_cache_memory": 32 << 20, "health_check_period_s": 1.0, "health_check_timeout_s": 30.0}
    config = {
        "api_keys": [KEY_A, KEY_B], "prefix_cache_isolation": "per_key",
        "limits": {"max_health_watchers": 3, "max_request_body_bytes": 65536, "max_tokenize_chars": 5000,
                   "max_slow_request_bodies": SLOW_BODIES, "slow_request_body_s": 2.0,
                   "request_body_timeout_s": BODY_TIMEOUT_S},
        "models": [
            {"name": "wide", "max_num_seqs": WIDE, **common},
            {"name": "narrow", "max_num_seqs": 1, "max_queued_requests": 1, "serve_max_queued_requests": 4,
             **common, "max_model_len": LONG},
            {"name": "pair", "num_replicas": 2, "max_num_seqs": 16, **common},
        ],
    }
    with running_herd_cluster(config, num_cpus=4, api_key=KEY_A) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with HerdClient(cluster.grpc_address, api_key=KEY_A) as c:
        yield c


def outcome(stream) -> str:
    """'length' / 'stop', or the gRPC status code name the stream ended with."""
    try:
        return collect(stream)[2].finish_reason
    except grpc.RpcError as e:
        return e.code().name


def prompt(i: int, n: int = 16) -> list[int]:
    return [(7 * i + j) % 1500 + 10 for j in range(n)]


# ---- capacity ---------------------------------------------------------------------------------------------
def test_64_streams_share_one_engine_batch_while_health_answers(cluster, client):
    # Long enough streams (200 tokens) that all 64 overlap even when they arrive spread out on a busy machine.
    peak, stop = [0], threading.Event()
    http = httpx.Client(base_url=cluster.http_url, timeout=30)

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], cluster.model_stats("wide")["num_running"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(WIDE) as pool:
            futures = [pool.submit(lambda i=i: outcome(client.generate("wide", prompt(i), max_tokens=200,
                                                                        timeout=300, **GREEDY)))
                       for i in range(WIDE)]
            wait_for(lambda: peak[0] == WIDE, timeout_s=120)
            # saturated, yet probes answer (they hold no inference seat)
            assert client.health("", timeout=10) == "SERVING"
            assert http.get("/health").status_code == 200
            results = [f.result() for f in futures]
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert results == ["length"] * WIDE
    assert peak[0] == WIDE  # all 64 were in the engine's running batch at once (its own counter)


def test_a_long_prompts_logprobs_arrive_in_bounded_responses_beside_other_streams(client):
    """1,300 prompt tokens with their top-20 logprobs come as responses of at most PROMPT_LOGPROBS_PER_MESSAGE
    positions, in order, before the token (in one response a 16k-token prompt's were 7 MiB: past a gRPC
    client's default 4 MiB, and near the proxy's 8 MiB); 16 streams on another model meanwhile end normally."""
    from cluster.proto_convert import PROMPT_LOGPROBS_PER_MESSAGE as PER

    ids = prompt(5, n=1300)
    with ThreadPoolExecutor(16) as pool:
        others = [pool.submit(lambda i=i: outcome(client.generate("wide", prompt(i), max_tokens=64, timeout=300,
                                                                  **GREEDY)))
                  for i in range(16)]
        responses = list(client.generate("narrow", ids, max_tokens=1, prompt_logprobs=20, timeout=300, **GREEDY))
        assert [f.result() for f in others] == ["length"] * 16
    carrying = [r for r in responses if r.prompt_logprobs]
    assert [len(r.prompt_logprobs) for r in carrying] == [PER, PER, len(ids) - 1 - 2 * PER]
    assert [p.token_id for r in carrying for p in r.prompt_logprobs] == ids[1:]
    assert all(len(p.top_logprobs) >= 20 for r in carrying for p in r.prompt_logprobs)
    assert [len(r.token_ids) for r in responses] == [0, 0, 1] and responses[-1].finish_reason == "length"


def test_overload_is_refused_at_once_with_resource_exhausted(cluster, client):
    start = cluster.model_stats("narrow")["kv_blocks_free"]
    long_calls = [client.generate("narrow", prompt(i), max_tokens=LONG - 100, timeout=300, **GREEDY)
                  for i in range(2)]
    holders = [threading.Thread(target=lambda c=c: outcome(c), daemon=True) for c in long_calls]
    for h in holders:
        h.start()
    wait_for(lambda: cluster.model_stats("narrow")["num_waiting"] == 1)  # one running, one waiting: full
    refused = [outcome(client.generate("narrow", prompt(9 + i), max_tokens=4, timeout=60)) for i in range(5)]
    assert refused == ["RESOURCE_EXHAUSTED"] * 5
    assert cluster.model_stats("narrow")["num_running"] == 1  # refused while the others still ran

    r = httpx.post(f"{cluster.http_url}/v1/completions", headers={"authorization": f"Bearer {KEY_A}"},
                   json={"model": "narrow", "prompt": prompt(3), "max_tokens": 4}, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    for call in long_calls:
        call.cancel()
    for h in holders:
        h.join(timeout=60)
    wait_for(lambda: cluster.model_stats("narrow")["num_running"] + cluster.model_stats("narrow")["num_waiting"] == 0)
    wait_for(lambda: cluster.model_stats("narrow")["kv_blocks_free"] == start)


def test_health_watch_streams_are_capped(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with cluster.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60) for _ in range(3)]
        for w in watches:
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
        extra = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            next(extra)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        for w in watches:
            w.cancel()

        # every seat comes back once its watcher leaves (a cancel Serve's proxy lost would hold one for good)
        def all_seats_again() -> bool:
            again = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10) for _ in range(3)]
            try:
                return all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in again)
            except grpc.RpcError:
                return False
            finally:
                for w in again:
                    w.cancel()
        assert wait_for(all_seats_again, timeout_s=30, interval_s=0.5)


def test_slow_request_bodies_cannot_take_the_ingress(cluster, client):
    """Authenticated HTTP requests that send their headers and then never their body (a stuck client, a slowloris),
    more of them than the ingress has slots and queue: at most max_slow_request_bodies of them are held, every
    other one is refused (429; 503 from Serve's proxy while the ingress was full); meanwhile Health.Check, /health
    and a generation are served; the held ones end 408 at request_body_timeout_s. Without cluster.request_body
    no connection was answered and Health.Check got RESOURCE_EXHAUSTED for as long as they stayed open."""
    import socket
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.config import ClusterConfig

    cfg = ClusterConfig.from_dict(cluster.config)
    n = cfg.effective_ingress_max_ongoing_requests + cfg.ingress_max_queued_requests + 16
    host, port = cluster.http_url.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: herd\r\nAuthorization: Bearer {KEY_A}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()
    sockets = []

    def status(sock: socket.socket) -> int:
        sock.settimeout(BODY_TIMEOUT_S + 60)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(256)
            assert chunk, f"connection closed without a response: {data!r}"
            data += chunk
        return int(data.split()[1])

    try:
        for _ in range(n):
            sockets.append(socket.create_connection((host, int(port)), timeout=30))
            sockets[-1].sendall(head)
        with ThreadPoolExecutor(max_workers=64) as pool:
            answers = [pool.submit(status, s) for s in sockets]
            refused = wait_for(lambda: sum(a.done() for a in answers) >= n - SLOW_BODIES and
                               [a.result() for a in answers if a.done()], timeout_s=120, interval_s=0.2)
            # the slow ones held now are the most there can be: everything else is served
            with cluster.channel() as ch:
                assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            assert httpx.get(f"{cluster.http_url}/health", timeout=10).status_code == 200
            assert outcome(client.generate("wide", prompt(1), max_tokens=4, timeout=60, **GREEDY)) == "length"
            held = [a for a in answers if not a.done()]
            assert len(held) == SLOW_BODIES, len(held)
            statuses = collections.Counter(a.result() for a in answers)
    finally:
        for s in sockets:
            s.close()
    assert set(refused) <= {429, 503} and statuses[429] > 0, statuses
    assert statuses[408] == SLOW_BODIES and set(statuses) <= {408, 429, 503}, statuses


# ---- bounded inputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": ["y" * 300]}, "stop"),
    ({"stop_token_ids": [1] * 65}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"repetition_penalty": 50.0}, "repetition_penalty"),
])
def test_sampling_limits_over_grpc(client, kwargs, field):
    code = outcome(client.generate("wide", prompt(1), max_tokens=2, timeout=30, **kwargs))
    assert code == "INVALID_ARGUMENT"
    with pytest.raises(grpc.RpcError) as e:
        collect(client.generate("wide", prompt(1), max_tokens=2, timeout=30, **kwargs))
    assert e.value.details().startswith(field)


def test_text_limits_and_request_ids(cluster, client):
    with pytest.raises(grpc.RpcError) as e:
        client.tokenize("wide", "word " * 2000, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokenize_chars" in e.value.details()

    with cluster.channel() as ch:
        stub = pb_grpc.InferenceStub(ch)
        meta = [("x-api-key", KEY_A)]

        def gen(rid: str, max_tokens: int = 2):
            return stub.Generate(pb.GenerateRequest(model="wide", token_ids=pb.TokenIds(ids=prompt(2)),
                                                    request_id=rid, sampling=pb.SamplingParams(
                                                        max_tokens=max_tokens, temperature=0.0, ignore_eos=True)),
                                 metadata=meta, timeout=120)
        assert outcome(gen("bad id with spaces")) == "INVALID_ARGUMENT"
        assert outcome(gen("x" * 200)) == "INVALID_ARGUMENT"
        live = gen("dup-1", max_tokens=150)
        first = next(iter(live))
        assert first.request_id == "dup-1"
        assert outcome(gen("dup-1")) == "ALREADY_EXISTS"
        live.cancel()
        wait_for(lambda: outcome(gen("dup-1")) == "length", timeout_s=30)  # free once the first ended

    # HTTP: the same rule for X-Request-Id (409 while a request with that id is live; "narrow" makes the first
    # one long enough to still be running)
    key = {"authorization": f"Bearer {KEY_A}", "x-request-id": "http-dup-1"}
    body = {"model": "narrow", "prompt": prompt(3), "max_tokens": LONG // 2, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=cluster.http_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", headers=key, json=body) as live_http:
            assert live_http.status_code == 200 and live_http.headers["x-request-id"] == "http-dup-1"
            lines = live_http.iter_lines()
            assert all(next(lines) is not None for _ in range(8))  # a few tokens in: decoding
            dup = http.post("/v1/completions", headers=key, json={**body, "stream": False, "max_tokens": 2})
            assert dup.status_code == 409 and dup.json()["error"]["param"] == "request_id", dup.text
        wait_for(lambda: http.post("/v1/completions", headers=key,
                                   json={**body, "stream": False, "max_tokens": 2}).status_code == 200, timeout_s=60)


def test_max_tokens_is_capped_by_the_context_and_says_length(client):
    p = prompt(5, 200)
    tokens, _, last = collect(client.generate("wide", p, max_tokens=10_000, timeout=120, **GREEDY))
    assert last.finish_reason == "length"
    assert len(tokens) == last.usage.completion_tokens == MAX_MODEL_LEN - len(p)


def test_http_limits_and_unsupported_fields(cluster):
    key = {"authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=cluster.http_url, timeout=60) as http:
        big = http.post("/v1/completions", headers=key, content=b"{" + b" " * 70000 + b"}")
        assert big.status_code == 413 and big.json()["error"]["param"] == "body"
        for field, value in [("functions", [{"name": "f"}]), ("audio", {"voice": "alloy"}),
                             ("prediction", {"type": "content", "content": "x"})]:
            r = http.post("/v1/chat/completions", headers=key,
                          json={"model": "wide", "messages": [{"role": "user", "content": "hi"}], field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = http.post("/v1/completions", headers=key, json={"model": "wide", "prompt": ["a"] * 65})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        # several prompts in one request: answered together, in order
        r = http.post("/v1/completions", headers=key,
                      json={"model": "wide", "prompt": [prompt(1), prompt(2), prompt(3)], "max_tokens": 3,
                            "temperature": 0})
        assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
        assert r.json()["usage"]["completion_tokens"] == 9


# ---- authentication and exposure ----------------------------------------------------------------------------
def test_every_method_and_route_needs_a_key(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with cluster.channel() as ch:
        stub = pb_grpc.InferenceStub(ch)
        calls = [
            lambda: list(stub.Generate(pb.GenerateRequest(model="wide", text="hi"), timeout=30)),
            lambda: list(stub.Chat(pb.ChatRequest(model="wide", messages=[pb.ChatMessage(role="user", content="x")]),
                                   timeout=30)),
            lambda: stub.Tokenize(pb.TokenizeRequest(model="wide", text="hi"), timeout=30),
            lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch)  # probes need no key
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        # reflection is off unless the config enables it
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=30))
        assert e.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)

    with httpx.Client(base_url=cluster.http_url, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/completions", json={"model": "wide", "prompt": "x"}).status_code == 401
        assert http.post("/v1/chat/completions", json={}).status_code == 401
        assert http.get("/health").status_code == 200
        assert http.get("/openapi.json", headers={"x-api-key": KEY_A}).status_code == 404
        assert http.get("/docs", headers={"x-api-key": KEY_A}).status_code == 404


def test_prefix_cache_is_isolated_per_key(cluster, client):
    p = prompt(777, 96)  # a prompt no other test sends
    with HerdClient(cluster.grpc_address, api_key=KEY_B) as other:
        first = collect(client.generate("wide", p, max_tokens=2, timeout=60, **GREEDY))[2].usage.cached_tokens
        again = collect(client.generate("wide", p, max_tokens=2, timeout=60, **GREEDY))[2].usage.cached_tokens
        b = collect(other.generate("wide", p, max_tokens=2, timeout=60, **GREEDY))[2].usage.cached_tokens
        b_again = collect(other.generate("wide", p, max_tokens=2, timeout=60, **GREEDY))[2].usage.cached_tokens
    assert first == 0 and again >= 80       # tenant A reuses its own blocks
    assert b == 0 and b_again >= 80         # tenant B never sees A's, only its own


# ---- cancellation at every stage ---------------------------------------------------------------------------
def test_cancel_while_queued_prefilling_and_decoding_returns_every_block(cluster, client):
    start = cluster.model_stats("narrow")["kv_blocks_free"]
    running = client.generate("narrow", prompt(1), max_tokens=LONG - 100, timeout=300, **GREEDY)
    next(iter(running))                                      # decoding
    queued = client.generate("narrow", prompt(2, 180), max_tokens=50, timeout=300, **GREEDY)
    holder = threading.Thread(target=lambda: outcome(queued), daemon=True)
    holder.start()
    wait_for(lambda: cluster.model_stats("narrow")["num_waiting"] == 1)
    queued.cancel()                                          # queued in the engine
    wait_for(lambda: cluster.model_stats("narrow")["num_waiting"] == 0)
    running.cancel()                                         # decoding
    holder.join(timeout=30)
    wait_for(lambda: cluster.model_stats("narrow")["num_running"] == 0)
    wait_for(lambda: cluster.model_stats("narrow")["kv_blocks_free"] == start)
    # a long prompt cancelled before its first token (admission / prefill)
    for delay in (0.0, 0.05, 0.2):
        call = client.generate("narrow", prompt(3 + int(delay * 100), 230), max_tokens=20, timeout=60, **GREEDY)
        time.sleep(delay)
        call.cancel()
        wait_for(lambda: cluster.model_stats("narrow")["num_running"] == 0)
        wait_for(lambda: cluster.model_stats("narrow")["kv_blocks_free"] == start)


def test_a_cancel_right_after_the_first_token_always_stops_the_sequence(cluster, client):
    """Serve's gRPC proxy lost a cancel that landed while it wrote a message to the client: the sequence ran on
    to max_tokens (cluster/proxy_streams.py). Every cancel must stop it: twelve right after the first token
    (a race: with Serve's own registration about one run of this test in two lost one of them) and one from a
    client that has not read for 2.5 s."""
    for i, unread_s in enumerate([0.0] * 12 + [2.5]):
        before = cluster.model_stats("narrow")["generation_tokens"]
        stream = client.generate("narrow", prompt(60 + i), max_tokens=LONG - 100, timeout=300, **GREEDY)
        next(iter(stream))
        time.sleep(unread_s)   # the engine goes on meanwhile (~900 tokens here): the client only stopped reading
        at_cancel = cluster.model_stats("narrow")["generation_tokens"] - before
        stream.cancel()
        wait_for(lambda: cluster.model_stats("narrow")["num_running"] == 0)
        generated = cluster.model_stats("narrow")["generation_tokens"] - before
        # A lost cancel runs the sequence to its max_tokens; a delivered one stops it within a few steps.
        assert generated < LONG - 100 and generated - at_cancel < 500, \
            f"try {i}: the cancelled sequence went on ({at_cancel} tokens at the cancel, {generated} in all)"


def test_http_stream_disconnect_aborts_the_sequence(cluster):
    start = cluster.model_stats("narrow")["kv_blocks_free"]
    with httpx.Client(base_url=cluster.http_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers={"x-api-key": KEY_A},
                         json={"model": "narrow", "prompt": prompt(4), "max_tokens": LONG - 100, "stream": True,
                               "temperature": 0, "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
        # leaving the block closes the connection mid-stream
    wait_for(lambda: cluster.model_stats("narrow")["num_running"] == 0)
    wait_for(lambda: cluster.model_stats("narrow")["kv_blocks_free"] == start)


# ---- a replica dies under load -------------------------------------------------------------------------
def _replica_actor_names(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::herd#{deployment}#"))


def _engine_process_pids(actor_name: str) -> list[int]:
    """The engine processes (workers.engine_process) of the named replica actor."""
    import ray._private.state as state

    from benchmarks.bench_common import engine_process_pids

    return engine_process_pids([int(a["Pid"]) for a in state.actors().values()
                                if a.get("Name") in (actor_name, actor_name.split("::", 1)[-1])
                                and a.get("State") == "ALIVE"])


@contextlib.contextmanager
def serve_controller_paused():
    """Serve's controller stopped (SIGSTOP) for the block: it cannot tell the routers that a replica died, as
    on a busy machine where it notices late. Routing needs no controller, so requests still flow."""
    from benchmarks.bench_common import serve_process_pids

    [pid] = serve_process_pids("pair")["serve_controller"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def sse_outcome(cluster, i: int) -> str:
    """'length' when an SSE completion stream finished, 'error' when it carried an error event; both end
    with [DONE]."""
    import json

    with httpx.Client(base_url=cluster.http_url, timeout=240) as http:
        with http.stream("POST", "/v1/completions", headers={"x-api-key": KEY_A},
                         json={"model": "pair", "prompt": prompt(300 + i), "max_tokens": 120, "stream": True,
                               "temperature": 0, "ignore_eos": True}) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["type"] == "service_unavailable_error", last
        return "error"
    return last["choices"][0]["finish_reason"]


def test_killed_replica_ends_its_streams_unavailable_and_traffic_recovers(cluster, client):
    import ray

    from cluster.app import deployment_name

    names = _replica_actor_names(deployment_name("pair"))
    assert len(names) == 2
    engine_pids = _engine_process_pids(names[0])
    assert len(engine_pids) == 1, engine_pids  # a whole-model replica runs its engine in a process of its own
    streaming = threading.Semaphore(0)

    def one(i: int) -> str:
        try:
            stream = client.generate("pair", prompt(100 + i), max_tokens=120, timeout=240, **GREEDY)
            first = next(iter(stream))
            streaming.release()  # this stream has its first token: a replica is serving it
            return collect_rest(first, stream)
        except grpc.RpcError as e:
            streaming.release()
            return e.code().name

    def collect_rest(first, stream) -> str:
        last = first
        for last in stream:
            pass
        return last.finish_reason

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        http_futures = [pool.submit(sse_outcome, cluster, i) for i in range(4)]
        for _ in futures:
            assert streaming.acquire(timeout=120)
        with serve_controller_paused():
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            # Requests sent right after the kill, while the routers still list the dead replica: one that hits
            # it before its first token is sent again, to the other replica.
            after = [pool.submit(lambda i=i: outcome(client.generate("pair", prompt(50 + i), max_tokens=40,
                                                                      timeout=240, **GREEDY))) for i in range(6)]
            results = [f.result(timeout=300) for f in futures]
            after_results = [f.result(timeout=300) for f in after]
        http_results = [f.result(timeout=300) for f in http_futures]
    assert set(results) <= {"length", "UNAVAILABLE"}, results       # no hang (DEADLINE_EXCEEDED), no INTERNAL
    assert not process_running(engine_pids[0]), "the killed replica's engine process is still running"
    assert "UNAVAILABLE" in results                                 # the dead replica's streams were told
    assert set(http_results) <= {"length", "error"}, http_results   # SSE: finished, or an error event + [DONE]
    # A request that hit the dead replica before its first token was sent again, and the router left the dead
    # replica out of that second choice (cluster.unavailable_replicas), even before the controller removed it.
    assert after_results == ["length"] * len(after_results), after_results
    # Serve replaces the replica; the model serves on both again
    wait_for(lambda: len(_replica_actor_names(deployment_name("pair"))) == 2 and
             _replica_actor_names(deployment_name("pair")) != names, timeout_s=180, interval_s=1.0)
    assert outcome(client.generate("pair", prompt(7), max_tokens=4, timeout=120, **GREEDY)) == "length"


def test_a_replica_whose_engine_died_is_left_out_of_retries_until_it_is_replaced(cluster, client):
    """Its actor lives on until the failing health check gets it replaced, answering every request at once with
    UNAVAILABLE, so it looks idle to the router. Each request that meets it first is sent again, and the
    router leaves it out of that second choice: no client sees the error."""
    from benchmarks.bench_common import replica_counts
    from cluster.app import APP_NAME, deployment_name

    # an earlier test's kill: both replicas running again
    wait_for(lambda: replica_counts(APP_NAME, deployment_name("pair"))[0] == 2, timeout_s=180, interval_s=0.5)
    names = _replica_actor_names(deployment_name("pair"))
    assert len(names) == 2
    engine_pid = _engine_process_pids(names[0])[0]
    os.kill(engine_pid, signal.SIGKILL)
    wait_for(lambda: not process_running(engine_pid))
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: outcome(client.generate("pair", prompt(400 + i), max_tokens=8,
                                                                 timeout=120, **GREEDY)), range(24)))
    assert results == ["length"] * len(results), results
    wait_for(lambda: names[0] not in _replica_actor_names(deployment_name("pair")) and
             len(_replica_actor_names(deployment_name("pair"))) == 2, timeout_s=180, interval_s=1.0)
    assert outcome(client.generate("pair", prompt(8), max_tokens=4, timeout=120, **GREEDY)) == "length"


def test_killed_ingress_replica_ends_its_calls_unavailable_and_frees_every_block(cluster, client):
    """The ingress replica's process is killed (the OOM killer, a lost node) with an SSE stream running on
    "narrow" and a gRPC stream waiting behind it (the model holds no more). Serve's proxy answered INTERNAL with
    Ray's actor message and cut the SSE stream mid-chunk; with cluster.proxy_replica_lost the gRPC call ends
    UNAVAILABLE and the SSE stream with an error event and [DONE] (an HTTP request not yet answered gets 503:
    test_proxy_streams). The model cancels both sequences and has every KV block back; once Serve has replaced
    the ingress, calls succeed again."""
    import json

    import ray._private.state as state

    from cluster.app import INGRESS_NAME
    from cluster.proxy_replica_lost import REPLICA_LOST_DETAILS

    [ingress] = _replica_actor_names(INGRESS_NAME)
    [pid] = [a["Pid"] for a in state.actors().values() if a.get("Name") == ingress and a["State"] == "ALIVE"]
    free = cluster.model_stats("narrow")["kv_blocks_free"]

    def grpc_end(stream) -> tuple:
        try:
            return ("OK", collect(stream)[2].finish_reason)
        except grpc.RpcError as e:
            return (e.code().name, e.details())

    with httpx.Client(base_url=cluster.http_url, headers={"authorization": f"Bearer {KEY_A}"}, timeout=300) as http, \
            ThreadPoolExecutor(1) as pool:
        with http.stream("POST", "/v1/completions", json={"model": "narrow", "prompt": prompt(1), "stream": True,
                                                          "max_tokens": LONG - 100, **GREEDY}) as sse:
            lines = sse.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))          # running
            waiting = pool.submit(grpc_end, client.generate("narrow", prompt(2), max_tokens=LONG - 100, timeout=300,
                                                            **GREEDY))
            wait_for(lambda: cluster.model_stats("narrow")["num_waiting"] == 1, timeout_s=60)
            os.kill(pid, signal.SIGKILL)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert waiting.result(timeout=60) == ("UNAVAILABLE", REPLICA_LOST_DETAILS)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == REPLICA_LOST_DETAILS, events[-2:]
    wait_for(lambda: (lambda s: s["num_running"] + s["num_waiting"] == 0 and s["kv_blocks_free"] == free)(
        cluster.model_stats("narrow")), timeout_s=60)
    wait_for(lambda: _replica_actor_names(INGRESS_NAME) not in ([], [ingress]), timeout_s=180, interval_s=0.5)
    assert outcome(client.generate("narrow", prompt(3), max_tokens=4, timeout=120, **GREEDY)) == "length"
