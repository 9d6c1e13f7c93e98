"""`herd bench engine` end to end on a tiny checkpoint: both sides run the same workload and the JSON says so."""
import argparse
import json

from benchmarks.engine_bench import run, workload
from tests.checkpoints import LLAMA2_MHA, make_checkpoint


def test_bench_engine_prints_both_sides_and_the_ratio(tmp_path, capsys):
    path = make_checkpoint(tmp_path, "mha", LLAMA2_MHA)
    args = argparse.Namespace(model=str(path), dtype="float32", requests=4, max_num_seqs=4, hf_batch_size=2,
                              skip_transformers=False)
    assert run(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])
    expected_tokens = sum(m for _, m in workload(4, LLAMA2_MHA["vocab_size"]))
    assert result["herd"]["tokens"] == result["transformers"]["tokens"] == expected_tokens
    assert result["speedup"] == result["herd"]["tok_per_s"] / result["transformers"]["tok_per_s"] > 0
    assert result["herd"]["peak_rss_mib"] > 50 and result["transformers"]["peak_rss_mib"] > 50
    setup = result["herd"]["setup"]   # what the figures were measured with
    assert setup["cpu_kernels"] and setup["packed_weights"] and setup["threads"] >= 1
