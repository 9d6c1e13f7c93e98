"""`herd bench engine --structured` end to end on a tiny checkpoint with Meta's Llama 3 tokenizer: it measures
decode steps with and without a grammar, and the masks' own time inside them."""
import argparse
import json

from tests.checkpoints import LLAMA3_GQA_TIED
from benchmarks.engine_bench import run
from workers.demo import LLAMA3_VOCAB, hf_config, write_checkpoint


def test_bench_engine_structured_reports_the_mask_overhead(tmp_path, capsys):
    spec = dict(LLAMA3_GQA_TIED, vocab_size=LLAMA3_VOCAB, bos_token_id=128000, eos_token_id=[128001, 128009],
                max_position_embeddings=4096, rope_scaling=None, dtype="float32")
    path = write_checkpoint(tmp_path / "l3", hf_config(**spec), tokenizer="llama3")
    args = argparse.Namespace(model=str(path), dtype="float32", structured=True, batch=4, steps=8, rounds=1)
    assert run(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])["structured"]
    assert result["batch"] == 4 and result["vocab_size"] == LLAMA3_VOCAB
    assert all(n >= 4 for n in result["decode_steps_measured"])  # steps with every sequence decoding
    assert 0 < result["mask_ms_per_step"] < result["structured_step_ms"]
    assert result["plain_step_ms"] > 0 and 0 < result["mask_share_of_step"] < 1
