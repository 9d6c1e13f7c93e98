"""`herd bench load | soak | fault`: the figures' arithmetic (fast), and the benches end to end on a tiny demo
checkpoint with a real local Ray + Serve + gRPC (slow; each a few tens of seconds on 2 cores)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os

import pytest

from benchmarks import bench_common as bc
from benchmarks import load_bench, soak_bench


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    module.register_bench(sub)
    return parser.parse_args(argv)


def test_chunks_make_ttft_and_inter_token_gaps():
    r = bc.StreamResult()
    r.on_chunk(0.010, 2, None)         # first chunk: TTFT; its second token came with it (gap 0)
    r.on_chunk(0.030, 1, 0.010)
    r.on_chunk(0.070, 2, 0.030)        # 40 ms for two tokens: 20 ms each
    assert r.ttft_s == 0.010 and r.tokens == 5
    assert r.gaps_s == pytest.approx([0.0, 0.020, 0.020, 0.020])


def test_stream_summary_counts_codes_and_orders_percentiles():
    ok = [bc.StreamResult(ttft_s=0.01 * i, latency_s=0.1, tokens=4, gaps_s=[0.001 * i]) for i in range(1, 11)]
    bad = [bc.StreamResult(code="RESOURCE_EXHAUSTED", latency_s=0.002)] * 3
    s = bc.stream_summary(ok + bad, wall_s=2.0)
    assert s["requests"] == 13 and s["ok"] == 10 and s["errors"] == {"RESOURCE_EXHAUSTED": 3}
    assert s["tokens_per_s"] == 20.0
    assert s["ttft_p50_ms"] == 50.0 and s["ttft_p99_ms"] == 100.0 and s["itl_p50_ms"] <= s["itl_p99_ms"]


def test_cpu_per_request_of_each_role_and_of_the_serving_path():
    cores = {"serve_proxy": 0.42, "ingress": 0.53, "model_replica": 0.30, "engine_process": 0.36,
             "bench_client": 0.12, "machine": 1.91, "other": 0.18}
    ms = bc.cpu_ms_per_request(cores, wall_s=10.0, requests=1000)  # 10 s at 100 requests/s
    assert ms["ingress"] == 5.3 and ms["serve_proxy"] == 4.2 and ms["engine_process"] == 3.6
    assert ms["serving_path"] == pytest.approx(4.2 + 5.3 + 3.0)  # proxy + ingress + replica, not the engine
    assert "machine" not in ms and "other" not in ms
    # the engine hop alone (no Serve in front): no serving path to sum; no request: nothing to divide
    assert "serving_path" not in bc.cpu_ms_per_request({"engine_process": 1.0, "bench_client": 0.1}, 1.0, 10)
    assert bc.cpu_ms_per_request(cores, 1.0, 0) == {}


def test_closed_loop_keeps_the_concurrency_and_stops_on_time():
    peak, now = [0], [0]

    async def call(i):
        now[0] += 1
        peak[0] = max(peak[0], now[0])
        await asyncio.sleep(0.005)
        now[0] -= 1
        return bc.StreamResult(tokens=1)

    results, _ = asyncio.run(bc.closed_loop(call, 20, 4))
    assert len(results) == 20 and peak[0] == 4
    results, wall = asyncio.run(bc.closed_loop(call, None, 3, run_for_s=0.1))
    assert len(results) > 3 and wall < 1.0


def test_soak_outcomes_and_fault_summary():
    rs = [bc.StreamResult(kind="normal"), bc.StreamResult(kind="invalid", code="INVALID_ARGUMENT"),
          bc.StreamResult(kind="deadline", code="OK"), bc.StreamResult(kind="normal", code="INTERNAL")]
    by_kind, unexpected = soak_bench.outcome_counts(rs)
    assert by_kind["normal"] == {"OK": 1, "INTERNAL": 1} and unexpected == {"normal:INTERNAL": 1}
    f = soak_bench.fault_summary([bc.StreamResult(start=1.0, latency_s=0.5),
                                  bc.StreamResult(start=5.0, code="UNAVAILABLE", latency_s=0.5, ttft_s=0.1),
                                  bc.StreamResult(start=5.2, code="UNAVAILABLE", latency_s=1.0)], 5.0, 30.0)
    assert f["failed"] == 2 and f["first_error_after_kill_s"] == 0.5 and f["error_window_s"] == 0.7
    assert f["failed_before_first_token"] == 1
    assert f["hung"] is False and f["reached_deadline"] == 0


def test_target_check_and_cli():
    rows = [{"concurrency": 64, "served": {"errors": {}}, "served_fraction_of_in_process": 0.8,
             "served_steady_fraction_of_in_process": 0.9}]
    assert load_bench.target_check(rows)["met"] is True  # the steady rate is the one compared
    rows[0].update(served_fraction_of_in_process=0.9, served_steady_fraction_of_in_process=0.8)
    assert load_bench.target_check(rows)["met"] is False and load_bench.target_check(rows)["whole_level_fraction"] == 0.9
    assert load_bench.target_check([])["measured"] is False
    args = _parse(load_bench, ["load", "--concurrency", "1,4", "--overload"])
    assert load_bench.parse_levels(args.concurrency) == [1, 4] and args.overload
    assert args.ingress_replicas == 1 and args.repeats == 1
    assert _parse(load_bench, ["load", "--ingress-replicas", "2"]).ingress_replicas == 2
    assert load_bench.requests_for(4, args) == 64 and load_bench.requests_for(64, args) == 256  # steady state
    assert _parse(load_bench, ["load", "--serving-cpu-cores", "0", "--engine-cpu-cores", "1-3"]).engine_cpu_cores \
        == "1-3"
    for bad in (["--serving-cpu-cores", "0-x"], ["--engine-cpu-cores", "3-1"], ["--cpu-binding-serving-cpus", "0"]):
        with pytest.raises(SystemExit):        # argparse's usage error, naming the part at fault
            _parse(load_bench, ["load", *bad])
    assert _parse(soak_bench, ["soak", "--minutes", "0.5"]).func is soak_bench.run_soak
    assert _parse(soak_bench, ["fault"]).func is soak_bench.run_fault


def test_mixed_lengths_are_seeded_bounded_and_off_by_default():
    equal = _parse(load_bench, ["load", "--max-tokens", "64"])
    assert load_bench.level_max_tokens(64, equal) == [64] * 256
    mixed = _parse(load_bench, ["load", "--max-tokens", "64", "--max-tokens-range-ratio", "0.5"])
    lengths = load_bench.level_max_tokens(64, mixed)
    assert len(lengths) == 256 and min(lengths) >= 32 and max(lengths) <= 96 == load_bench.longest_max_tokens(mixed)
    assert len(set(lengths)) > 20 and 56 <= sum(lengths) / len(lengths) <= 72       # spread, mean near 64
    reseeded = _parse(load_bench, ["load", "--max-tokens", "64", "--max-tokens-range-ratio", "0.5", "--seed", "1"])
    assert lengths == load_bench.level_max_tokens(64, mixed) != load_bench.level_max_tokens(64, reseeded)
    assert load_bench.model_entry("/m", mixed)["max_model_len"] == 64 + 96 + 16   # room for the longest
    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit):
            _parse(load_bench, ["load", "--max-tokens-range-ratio", bad])


def test_ports_taken_together_are_distinct():
    ports = bc.free_ports(16)
    assert len(set(ports)) == 16 and all(p > 1023 for p in ports)
    config = bc.cluster_config([])
    assert config["grpc_port"] != config["http_port"]


def test_stream_pacing_flags_reach_the_served_model_only_when_given():
    default = load_bench.model_entry("/m", _parse(load_bench, ["load"]))
    assert "stream_max_messages_per_s" not in default and "stream_max_interval_s" not in default   # herd's own
    paced = load_bench.model_entry("/m", _parse(load_bench, ["load", "--stream-max-messages-per-s", "100",
                                                            "--stream-max-interval-s", "1"]))
    assert (paced["stream_max_messages_per_s"], paced["stream_max_interval_s"]) == (100.0, 1.0)


def test_steady_rate_counts_tokens_while_every_stream_is_busy():
    def stream(start, tokens_at, latency):
        r = bc.StreamResult(start=start, latency_s=latency)
        last = None
        for t in tokens_at:
            r.on_chunk(t, 1, last)
            last = t
        return r
    # Two streams, closed loop: the first requests end at 2.0 and 3.0, the last starts at 3.0. Tokens counted in
    # [2.0, 3.0): the first request's at 2.0, the second's at 2.2 (not its 3.0), the refill's at 2.0 and 2.5.
    results = [stream(0.0, [1.0, 1.5, 2.0], 2.0), stream(0.0, [0.5, 2.2, 3.0], 3.0),
               stream(2.0, [0.0, 0.5, 1.5], 1.5), stream(3.0, [0.5], 0.5)]
    assert bc.steady_tokens_per_s(results) == 4.0
    assert bc.stream_summary(results, 4.0)["steady_tokens_per_s"] == 4.0
    assert bc.steady_tokens_per_s(results[:2]) is None       # one wave: no request started after the first ended
    assert bc.steady_tokens_per_s([bc.StreamResult()]) is None


def _check_summary(s):
    assert s["errors"] == {} and s["ok"] == s["requests"] > 0
    assert s["tokens_per_s"] > 0
    for name in ("ttft", "itl", "latency"):
        assert s[f"{name}_p50_ms"] <= s[f"{name}_p99_ms"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_load_bench_end_to_end(tmp_path):
    args = _parse(load_bench, ["load", "--concurrency", "1,4", "--requests-per-level", "6", "--prompt-tokens", "16",
                               "--max-tokens", "6", "--overload", "--overload-streams", "12",
                               "--overload-rate", "10", "--overload-s", "1", "--cpu-binding-serving-cpus", "1",
                               "--out", str(tmp_path)])
    cpus_before = os.sched_getaffinity(0)
    assert args.func(args) == 0
    report = json.loads((tmp_path / "load_bench.json").read_text())
    assert [r["concurrency"] for r in report["levels"]] == [1, 4]
    for row in report["levels"]:
        assert row["requests"] == 6
        _check_summary(row["served"])
        _check_summary(row["in_process"])
        assert row["served"]["tokens"] == row["in_process"]["tokens"] == 6 * 6  # exactly max_tokens each
        assert row["served_fraction_of_in_process"] > 0
        assert row["served_steady_fraction_of_in_process"] is None or row["served_steady_fraction_of_in_process"] > 0
        cores = row["served"]["cpu_cores"]  # where the machine's CPU went during the level
        assert set(cores) >= {"model_replica", "ingress", "serve_proxy", "bench_client", "machine", "other"}
        assert cores["model_replica"] > 0 and cores["machine"] >= cores["model_replica"]
        assert cores["engine_process"] > 0  # the engine runs in its own process by default
        per_request = row["served"]["cpu_ms_per_request"]
        assert per_request["serving_path"] > 0 and per_request["serving_path"] == pytest.approx(
            per_request["serve_proxy"] + per_request["ingress"] + per_request["model_replica"], abs=0.02)
        for side in ("served", "in_process"):  # a closed loop: never more than `concurrency` requests at once
            s = row[side]
            assert s["latency_p50_ms"] * row["requests"] / row["concurrency"] <= 1.5 * s["wall_s"] * 1000
    # As herd serve does (the serving path keeping one CPU here): the bench model (one replica) on the top CPU, the
    # capped model left to the OS.
    binding = report["cpu_binding"]
    if len(cpus_before) >= 2:
        assert binding["applied"] and binding["engines"]["bench"] == str(max(cpus_before))
        assert "bench-capped" in binding["unbound"] or len(binding["engines"]) == 2
    assert os.sched_getaffinity(0) == cpus_before  # the bench put this process back where it was
    o = report["overload"]
    assert o["burst"]["streams"] == 12 and o["sustained"]["streams"] == 10
    for phase in (o["burst"], o["sustained"]):
        assert phase["rejected"] + phase["served"] == phase["streams"]
        assert set(phase["errors"]) <= {"RESOURCE_EXHAUSTED"}
        if phase["rejected"]:
            assert phase["rejection_p50_ms"] <= phase["rejection_p99_ms"]
    assert o["sustained"]["rejected"] > 0  # the model was kept full: some arrivals must be refused
    assert (tmp_path / "load_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(240)
def test_engine_hop_only_drives_the_replicas_engine_client_beside_the_baseline(tmp_path):
    """--engine-hop-only: the served side is cluster.deployment.load_engine's client (an engine process here),
    streamed from this process with no cluster; every level beside its in-process baseline, and no claim on
    the served-path target."""
    # 24 tokens a request: enough engine work in each level for its CPU clock to tick (the packed head made a
    # level of 6-token requests take ~20 ms of the engine process's CPU, under the 10 ms ticks' noise).
    args = _parse(load_bench, ["load", "--engine-hop-only", "--concurrency", "1,4", "--requests-per-level", "6",
                               "--prompt-tokens", "16", "--max-tokens", "24", "--max-tokens-range-ratio", "0.5",
                               "--out", str(tmp_path)])
    cpus_before = os.sched_getaffinity(0)
    assert args.func(args) == 0
    report = json.loads((tmp_path / "load_bench.json").read_text())
    assert report["mode"] == "engine-hop" and report["engine_process"] is True
    assert report["target"]["measured"] is False
    assert report["workload"]["max_tokens_range_ratio"] == 0.5
    for row in report["levels"]:
        _check_summary(row["served"])
        _check_summary(row["in_process"])
        # mixed lengths, the same requests on both sides
        assert row["served"]["tokens"] == row["in_process"]["tokens"] == \
            sum(load_bench.level_max_tokens(row["concurrency"], args))
        cores = row["served"]["cpu_cores"]
        assert cores["engine_process"] > 0 and cores["machine"] >= cores["engine_process"]
    assert os.sched_getaffinity(0) == cpus_before
    assert (tmp_path / "load_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(240)
def test_engine_hop_only_with_the_engine_as_a_thread(tmp_path):
    """--no-engine-process: the replica's AsyncEngine in the bench's own process (no engine process to count)."""
    import torch

    threads_before = torch.get_num_threads()
    args = _parse(load_bench, ["load", "--engine-hop-only", "--no-engine-process", "--concurrency", "2",
                               "--requests-per-level", "4", "--prompt-tokens", "16", "--max-tokens", "4",
                               "--skip-in-process", "--out", str(tmp_path)])
    try:
        assert args.func(args) == 0
        assert torch.get_num_threads() == 1   # the replica's {CPU: 1}
    finally:
        torch.set_num_threads(threads_before)
    report = json.loads((tmp_path / "load_bench.json").read_text())
    assert report["engine_process"] is False
    [row] = report["levels"]
    assert row["served"]["tokens"] == 4 * 4 and "engine_process" not in row["served"]["cpu_cores"]


@pytest.mark.parametrize("flag", [["--overload"], ["--autoscale"], ["--address", "127.0.0.1:1"],
                                  ["--serving-cpu-cores", "0"]])
def test_engine_hop_only_refuses_cluster_flags(flag, capsys):
    args = _parse(load_bench, ["load", "--engine-hop-only", *flag])
    assert args.func(args) == 2
    assert flag[0] in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_bench_end_to_end(tmp_path):
    args = _parse(soak_bench, ["soak", "--minutes", "0.1", "--streams", "6", "--max-tokens", "8", "--max-prompt",
                               "32", "--sample-s", "0.5", "--feature-fraction", "0.5", "--out", str(tmp_path)])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "soak_bench.json").read_text())
    assert report["requests"] > 0 and report["unexpected_total"] == 0, report["unexpected"]
    assert report["outcomes"]["normal"]["OK"] > 0
    # The served features were mixed in (each output checked: a broken one would be unexpected above), and some
    # outputs ended whole (a choice, a regex match), so the checks saw complete outputs, not only cut ones.
    features = report["features"]
    assert len(features["outcomes"]) >= 4 and features["violations"] == {}, features
    assert sum(features["whole_outputs"].values()) > 0, features
    kv = report["kv_blocks"]
    assert kv["returned"] and kv["free_end"] == kv["free_start"] and kv["free_min"] <= kv["free_start"]
    assert report["rss_mib"]["start"] > 0 and len(report["samples"]["t"]) >= 5
    assert (tmp_path / "soak_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rss_trend_compares_windows_not_single_samples():
    t = [float(i) for i in range(0, 300)]
    # a sawtooth (trimmed every 10 s) around a flat level after warm-up: not a leak
    flat = [1500.0 if x < 30 else 2000.0 + (x % 10) * 10 for x in t]
    trend = soak_bench.rss_trend(t, flat, 30.0, 299.0, 60.0)
    assert abs(trend["after_warmup"] - trend["last_window"]) <= 10 and abs(trend["slope_mib_per_min"]) < 1
    # a steady climb is one
    leak = [2000.0 + x for x in t]
    trend = soak_bench.rss_trend(t, leak, 30.0, 299.0, 60.0)
    assert trend["last_window"] - trend["after_warmup"] > 200 and trend["slope_mib_per_min"] == pytest.approx(60.0)


def test_repeated_rounds_report_the_median_round_and_every_rounds_ratio():
    """--repeats: each round is the level's baseline then its served side; the row is the round whose steady
    ratio is the (lower) median, and `rounds` keeps every round's figures; an error in any round fails the
    target."""
    local_rates, served_rates = iter([1000.0, 2000.0, 1000.0, 1000.0]), iter([900.0, 1000.0, 700.0, 800.0])
    order = []

    class Baseline:
        async def level(self, level):
            order.append("in-process")
            rate = next(local_rates)
            return {"tokens_per_s": rate, "steady_tokens_per_s": rate}

    async def served_level():
        order.append("served")
        rate = next(served_rates)
        return {"tokens_per_s": rate, "steady_tokens_per_s": rate, "errors": {} if rate != 700.0 else {"X": 1}}

    served, local, rounds = asyncio.run(load_bench.level_rounds(64, 4, served_level, Baseline()))
    assert order == ["in-process", "served"] * 4
    assert [r["served_steady_fraction_of_in_process"] for r in rounds] == [0.9, 0.5, 0.7, 0.8]
    assert served["steady_tokens_per_s"] == 700.0 and local["steady_tokens_per_s"] == 1000.0  # ratios 0.5 0.7 0.8 0.9
    assert [r["reported"] for r in rounds] == [False, False, True, False]
    args = _parse(load_bench, ["load", "--concurrency", "64", "--repeats", "4"])
    assert args.repeats == 4
    rows = load_bench.merge_levels([64], {64: served}, {64: local}, args, {64: rounds})
    assert rows[0]["served_steady_fraction_of_in_process"] == 0.7 and len(rows[0]["rounds"]) == 4
    target = load_bench.target_check(rows)
    assert target["round_fractions"] == [0.9, 0.5, 0.7, 0.8] and target["errors"] == 1 and target["met"] is False

    served_rates = iter([900.0])   # one round (the default): that round, no `rounds`
    local_rates = iter([1000.0])
    served, local, rounds = asyncio.run(load_bench.level_rounds(8, 1, served_level, Baseline()))
    assert served["steady_tokens_per_s"] == 900.0 and rounds == []
    assert "rounds" not in load_bench.merge_levels([8], {8: served}, {8: local}, args, {8: rounds})[0]
