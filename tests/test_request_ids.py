"""Request ids: chosen by the client (gRPC request_id field or x-request-id metadata, HTTP X-Request-Id), echoed
back, and named in every herd log line written for the request, at the ingress and at the model replica."""
from __future__ import annotations

import asyncio
import glob
import logging
import os

import pytest

from cluster.request_context import (RequestIdFilter, current_request_id, grpc_request_id, http_request_id,
                                     install_request_id_logging, outgoing_context, request_id_from,
                                     request_scope, set_request_id)


# ---- the pieces --------------------------------------------------------------------------------------------
def test_grpc_request_id_precedence():
    meta = [("x-request-id", "from-header"), ("request_id", "serve-id"), ("authorization", "Bearer k")]
    assert grpc_request_id("from-field", meta) == "from-field"
    assert grpc_request_id("", meta) == "from-header"
    assert grpc_request_id("", [("request_id", "serve-id")]) == "serve-id"
    assert grpc_request_id("", [("X-Request-Id", "Mixed-Case")]) == "Mixed-Case"
    assert grpc_request_id("", [("x-request-id", b"binary")]) is None
    assert grpc_request_id("", []) is None
    assert http_request_id([("content-type", "x"), ("X-Request-ID", "abc")]) == "abc"


def test_log_lines_name_the_request():
    logger = logging.getLogger("herd.test.request_ids")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    h = Collect()
    h.addFilter(RequestIdFilter())
    h.addFilter(RequestIdFilter())   # two filters (two handlers in real life): the prefix is added once
    logger.addHandler(h)
    logger.propagate = False
    try:
        logger.warning("outside any request")
        with request_scope("req-42"):
            logger.warning("inside %s", "the request")
            with request_scope("req-43"):
                logger.warning("a nested one")
            logger.warning("back")
        logger.warning("after")
    finally:
        logger.removeHandler(h)
    assert records == ["outside any request", "[request_id=req-42] inside the request",
                       "[request_id=req-43] a nested one", "[request_id=req-42] back", "after"]


def test_context_follows_tasks_and_threads_not_other_requests():
    async def one(rid: str) -> list:
        set_request_id(rid)
        await asyncio.sleep(0.01)
        in_thread = await asyncio.to_thread(current_request_id)
        return [current_request_id(), in_thread, request_id_from(outgoing_context())]

    async def main():
        return await asyncio.gather(one("a"), one("b"))

    assert asyncio.run(main()) == [["a", "a", "a"], ["b", "b", "b"]]
    assert current_request_id() is None and outgoing_context() is None  # tracing off: nothing to carry


def test_install_adds_one_filter_per_handler():
    logger = logging.getLogger("herd.test.install")
    h = logging.StreamHandler()
    logger.addHandler(h)
    try:
        install_request_id_logging(("herd.test.install",))
        install_request_id_logging(("herd.test.install",))
        assert sum(isinstance(f, RequestIdFilter) for f in h.filters) == 1
    finally:
        logger.removeHandler(h)


def test_http_edge_refuses_a_bad_request_id():
    """EdgeGuard (before any body is read): a malformed X-Request-Id is a 400 naming the header."""
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from cluster.limits import InputLimits, LiveRequestIds
    from cluster.openai_http import EdgeGuard
    from cluster.request_body import SlowBodies

    class Frontend:
        limits = InputLimits()
        live_request_ids = LiveRequestIds()
        slow_bodies = SlowBodies()

        def authenticate(self, headers):
            return 0

    seen = []
    app = FastAPI()

    @app.post("/v1/x")
    async def route():
        seen.append(current_request_id())
        return JSONResponse({"ok": True})

    guarded = EdgeGuard(app, frontend=lambda: Frontend())

    async def call(headers):
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/x", headers=headers, json={})

    bad = asyncio.run(call({"x-request-id": "has spaces in it"}))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    ok = asyncio.run(call({"x-request-id": "client-7"}))
    assert ok.status_code == 200 and seen == ["client-7"]   # the route ran with the request's id set


# ---- a real herd serve ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.serve_fixtures import running_herd_cluster
    from workers.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("rid-ckpt") / "m", "llama32-1b-mini", dtype="float32")
    config = {"models": [{"name": "tiny", "path": str(path), "max_model_len": 128,
                          "resources_per_shard": {"CPU": 0.25}, "kv_cache_memory": 4 << 20}]}
    with running_herd_cluster(config, num_cpus=2) as c:
        yield c


def _serve_log_lines(needle: str) -> dict[str, list[str]]:
    """Lines naming `needle` in the session's Serve replica logs, by file name."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    out: dict[str, list[str]] = {}
    for path in glob.glob(os.path.join(logs, "serve", "replica_*.log")):
        with open(path, errors="replace") as f:
            lines = [ln for ln in f if needle in ln]
        if lines:
            out[os.path.basename(path)] = lines
    return out


@pytest.mark.slow
def test_grpc_request_id_echoed_and_logged(served):
    import grpc

    from cluster.pb import inference_pb2 as pb
    from cluster.pb import inference_pb2_grpc as pb_grpc
    from tests.serve_fixtures import wait_for

    stub = pb_grpc.InferenceStub(served.channel())
    sampling = pb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    # The field: every response message carries it, and trailing metadata x-request-id echoes it.
    call = stub.Generate(pb.GenerateRequest(model="tiny", text="hello there", sampling=sampling,
                                            request_id="field-id-1"), timeout=120)
    responses = list(call)
    assert responses and all(r.request_id == "field-id-1" for r in responses)
    assert ("x-request-id", "field-id-1") in list(call.trailing_metadata())

    # Metadata only: the same, with the id the client sent as x-request-id.
    call = stub.Generate(pb.GenerateRequest(model="tiny", text="hello again", sampling=sampling), timeout=120,
                         metadata=[("x-request-id", "meta-id-2")])
    assert all(r.request_id == "meta-id-2" for r in call)
    assert ("x-request-id", "meta-id-2") in list(call.trailing_metadata())

    # A malformed id is refused, naming the field.
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(model="tiny", text="x", sampling=sampling), timeout=60,
                           metadata=[("x-request-id", "bad id!")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Log lines: herd's line for the request at the model replica names it, and so does Serve's own access
    # line there (the ingress makes herd's id Serve's request id for the model call).
    def logged():
        found = _serve_log_lines("field-id-1")
        lines = [ln for name, lns in found.items() if "model-tiny" in name for ln in lns]
        herd = [ln for ln in lines if "[request_id=field-id-1] model tiny: request" in ln]
        serve = [ln for ln in lines if "CALL generate_stream OK" in ln]
        return (herd, serve) if herd and serve else None

    herd, serve = wait_for(logged, timeout_s=30, interval_s=0.5)
    assert "3 generated" in herd[0] and "length" in herd[0], herd


@pytest.mark.slow
def test_http_request_id_echoed_and_logged(served):
    import httpx

    from tests.serve_fixtures import wait_for

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, headers={"X-Request-Id": "http-id-3"},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "http-id-3"
    r = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, headers={"X-Request-Id": "bad id"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    # Without one, the id Serve made is echoed (and is what the logs name).
    r = httpx.post(f"{served.http_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.headers.get("x-request-id")

    # X-Request-Id is Serve's request id from the proxy on: every Serve log line of the request shows it, and
    # herd's line at the model replica names it too.
    def logged():
        found = _serve_log_lines("http-id-3")
        names = " ".join(found)
        herd = [ln for lns in found.values() for ln in lns if "[request_id=http-id-3] model tiny: request" in ln]
        return found if herd and "Ingress" in names and "model-tiny" in names else None

    assert wait_for(logged, timeout_s=30, interval_s=0.5)
