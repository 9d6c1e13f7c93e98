"""Tiny random-weight Llama checkpoints for the tests, one per flavour the engine must handle."""
from __future__ import annotations

from pathlib import Path

from workers.demo import LLAMA3_ROPE_SCALING, hf_config, write_checkpoint

# MHA Llama 2 style, weights split over a sharded index.
LLAMA2_MHA = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                  rope_theta=10000.0, dtype="float32")
# Llama 3.2 style: GQA, tied embeddings, llama3 RoPE scaling, stored in bf16 (computed in fp32).
LLAMA3_GQA_TIED = dict(vocab_size=640, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING, tie_word_embeddings=True,
                       dtype="bfloat16", bos_token_id=1, eos_token_id=[2, 3])
# The transformers >= 5 `rope_parameters` config form (llama3 scaling inside it).
LLAMA3_ROPE_PARAMETERS = dict(LLAMA3_GQA_TIED, rope_form="parameters", tie_word_embeddings=False, dtype="float32")


def make_checkpoint(root: Path, name: str, spec: dict, num_shards: int = 1, seed: int = 0) -> Path:
    return write_checkpoint(root / name, hf_config(**spec), num_shards=num_shards, seed=seed)


def make_text_checkpoint(root: Path, name: str = "tok") -> Path:
    """LLAMA2_MHA with a real SentencePiece tokenizer (it needs a vocabulary of ~600 or more for its characters),
    so requests are detokenized and stop strings apply."""
    return write_checkpoint(root / name, hf_config(**dict(LLAMA2_MHA, vocab_size=1000)), tokenizer="llama2")
