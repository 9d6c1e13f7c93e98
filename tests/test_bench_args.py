"""`herd bench`'s flag types (benchmarks/bench_args.py): a bad value is argparse's usage error naming the flag
(exit 2), checked when the command line is parsed, never a traceback or a nonsense run at start. Fast: no Ray,
nothing is run past the parse (or past a cross-flag check)."""
from __future__ import annotations

import argparse

import pytest

from benchmarks import bench_args as ba
from benchmarks import load_bench, soak_bench
from cluster.cli import build_parser


def _rejects(check, text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as e:
        check(text)
    return str(e.value)


@pytest.mark.parametrize("check, good, bad", [
    (ba.positive_int, {"1": 1, "48": 48, " 7 ": 7}, ["0", "-3", "1.5", "a", "", "nan"]),
    (ba.non_negative_int, {"0": 0, "12": 12}, ["-1", "0.5", "x"]),
    (ba.positive_float, {"0.5": 0.5, "2": 2.0, "1e-3": 0.001}, ["0", "-0.1", "inf", "nan", "a"]),
    (ba.non_negative_float, {"0": 0.0, "8.5": 8.5}, ["-1", "-inf", "nan", ""]),
    (ba.fraction, {"0": 0.0, "0.15": 0.15, "1": 1.0}, ["-0.01", "1.01", "nan", "half"]),
    (ba.range_ratio, {"0": 0.0, "0.5": 0.5, "0.999": 0.999}, ["1", "-0.1", "x"]),
    (ba.int_at_least(8), {"8": 8, "256": 256}, ["7", "0", "8.0"]),
])
def test_each_type_keeps_its_range(check, good, bad):
    for text, value in good.items():
        assert check(text) == value and type(check(text)) is type(value)
    for text in bad:
        _rejects(check, text)


def test_messages_say_what_is_wanted_and_what_was_given():
    assert _rejects(ba.positive_int, "0") == "must be > 0, got 0"
    assert _rejects(ba.positive_int, "a") == "must be an integer > 0, got 'a'"
    assert _rejects(ba.non_negative_int, "-1") == "must be >= 0, got -1"
    assert _rejects(ba.positive_float, "-1") == "must be > 0, got -1"
    assert _rejects(ba.positive_float, "inf") == "must be a number > 0, got 'inf'"
    assert _rejects(ba.non_negative_float, "x") == "must be a number >= 0, got 'x'"
    assert _rejects(ba.fraction, "1.5") == "must be in [0, 1], got 1.5"
    assert _rejects(ba.range_ratio, "1") == "must be in [0, 1), got 1"
    assert _rejects(ba.int_at_least(8), "7") == "must be >= 8, got 7"
    assert ba.positive_int.__name__ == "positive_int" and ba.fraction.__name__ == "fraction"


def test_concurrency_levels():
    assert ba.concurrency_levels("1,8,32") == [1, 8, 32]
    assert ba.concurrency_levels(" 4 , 2 ,") == [4, 2]          # order kept; spaces and a trailing comma are fine
    assert ba.concurrency_levels("1,,8") == [1, 8]               # empty items skipped, as parse_levels always did
    for bad in ("0", "a", "", ",", "1,0", "1,-4", "2,x", "1.5"):
        assert _rejects(ba.concurrency_levels, bad) == \
            f"must be comma-separated integers > 0 (e.g. 1,8,32), got {bad!r}"


def test_cpu_list_arg_moved_with_its_behaviour():
    assert ba.cpu_list_arg("0") == "0" and ba.cpu_list_arg("1-3") == "1-3"
    for bad in ("0-x", "3-1"):
        _rejects(ba.cpu_list_arg, bad)
    assert load_bench.cpu_list_arg is ba.cpu_list_arg and load_bench.positive_int is ba.positive_int
    assert load_bench.range_ratio is ba.range_ratio


def test_parse_levels_takes_the_parsed_list_or_text():
    assert load_bench.parse_levels([1, 4]) == [1, 4]
    assert load_bench.parse_levels("2,16") == [2, 16]
    with pytest.raises(argparse.ArgumentTypeError):
        load_bench.parse_levels("0")


# ---- the real `herd` parser ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["bench", "load", "--concurrency", "0"], "--concurrency"),
    (["bench", "load", "--concurrency", "a"], "--concurrency"),
    (["bench", "load", "--concurrency", ""], "--concurrency"),
    (["bench", "load", "--max-tokens", "0"], "--max-tokens"),
    (["bench", "load", "--replica-cpus", "0"], "--replica-cpus"),
    (["bench", "load", "--seed", "-1"], "--seed"),
    (["bench", "load", "--cooldown-s", "-2"], "--cooldown-s"),
    (["bench", "load", "--overload-rate", "0"], "--overload-rate"),
    (["bench", "load", "--stream-max-interval-s", "0"], "--stream-max-interval-s"),
    (["bench", "soak", "--minutes", "-1"], "--minutes"),
    (["bench", "soak", "--cancel-fraction", "1.5"], "--cancel-fraction"),
    (["bench", "soak", "--max-prompt", "4"], "--max-prompt"),
    (["bench", "soak", "--sample-s", "0"], "--sample-s"),
    (["bench", "fault", "--streams", "0"], "--streams"),
    (["bench", "fault", "--kill-at-s", "-1"], "--kill-at-s"),
    (["bench", "serve", "--sessions", "0"], "--sessions"),
    (["bench", "serve", "--replicas", "2", "0"], "--replicas"),
    (["bench", "serve", "--think-s", "-0.1"], "--think-s"),
    (["bench", "engine", "--requests", "0"], "--requests"),
    (["bench", "engine", "--batch", "x"], "--batch"),
    (["bench", "parallel", "--iters", "0"], "--iters"),
    (["bench", "routing-sim", "--blocks", "1000", "-5"], "--blocks"),
])
def test_a_bad_value_is_a_usage_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: must be" in err and "Traceback" not in err


def test_defaults_still_parse_and_zero_stays_where_it_means_none():
    parser = build_parser()
    load = parser.parse_args(["bench", "load"])
    assert load.concurrency == [1, 8, 32, 64, 128, 256] and load_bench.parse_levels(load.concurrency) == \
        [1, 8, 32, 64, 128, 256]
    assert (load.requests_per_level, load.max_num_seqs, load.stream_max_messages_per_s) == (None, None, None)
    assert (load.max_tokens_range_ratio, load.replica_cpus, load.timeout_s, load.seed) == (0.0, 1.0, 120.0, 0)
    soak = parser.parse_args(["bench", "soak"])
    assert (soak.minutes, soak.max_prompt, soak.cancel_fraction, soak.warmup_s) == (10.0, 256, 0.15, 30.0)
    fault = parser.parse_args(["bench", "fault"])
    assert (fault.streams, fault.duration_s, fault.kill_at_s) == (16, 30.0, 8.0)
    serve = parser.parse_args(["bench", "serve"])
    assert (serve.replicas, serve.session_tokens, serve.kv_blocks, serve.think_s) == ([2], 0, None, 0.05)
    engine = parser.parse_args(["bench", "engine"])
    assert (engine.requests, engine.max_num_seqs, engine.hf_batch_size) == (48, 48, 16)
    sim = parser.parse_args(["bench", "routing-sim"])
    assert sim.blocks == [100_000, 1_000_000] and sim.seed == 0
    # 0 where it has a meaning: a message per token, no pause, no document, no warm-up, a kill right away
    zero = parser.parse_args(["bench", "load", "--stream-max-messages-per-s", "0", "--cooldown-s", "0",
                              "--seed", "0"])
    assert zero.stream_max_messages_per_s == 0.0 and zero.cooldown_s == 0.0
    assert parser.parse_args(["bench", "serve", "--think-s", "0", "--system-tokens", "0"]).think_s == 0.0
    assert parser.parse_args(["bench", "soak", "--warmup-s", "0", "--deadline-fraction", "0"]).warmup_s == 0.0
    assert parser.parse_args(["bench", "fault", "--kill-at-s", "0"]).kill_at_s == 0.0


def test_cross_flag_checks_stop_before_anything_starts(capsys):
    parser = build_parser()
    fault = parser.parse_args(["bench", "fault", "--duration-s", "10", "--kill-at-s", "10"])
    assert soak_bench.run_fault(fault) == 2
    assert capsys.readouterr().err.strip() == \
        "herd bench fault: error: --kill-at-s must be below --duration-s (10), got 10"
    soak = parser.parse_args(["bench", "soak", "--cancel-fraction", "0.6", "--invalid-fraction", "0.3",
                              "--deadline-fraction", "0.2"])
    assert soak_bench.run_soak(soak) == 2
    assert "herd bench soak: error: --cancel-fraction + --invalid-fraction + --deadline-fraction must be <= 1" \
        in capsys.readouterr().err
