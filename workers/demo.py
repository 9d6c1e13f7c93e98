"""Small random-weight Llama checkpoints in the real Hugging Face layout.

They let herd run end to end with no download: `herd demo-checkpoint`, the embedded `herd serve` demo, the
tests and the benchmarks all use them. Shapes keep the real models' proportions that matter to the code
(GQA ratios, tied embeddings, llama3 RoPE scaling, vocabulary and tokenizer), scaled down in width/depth.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .demo_tokenizer import build_llama2_sentencepiece, llama3_tokenizer_path
from .tokenizer import Tokenizer

if TYPE_CHECKING:           # torch is imported where weights are made: `herd --help` lists DEMO_SHAPES without it
    import torch

LLAMA3_VOCAB = 128256
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}

DEMO_SHAPES: dict[str, dict] = {
    # Llama 2 70B: 64 heads / 8 kv heads (GQA), 4k context, untied embeddings, SentencePiece tokenizer.
    "llama2-70b-mini": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                            rms_norm_eps=1e-5, tie_word_embeddings=False, tokenizer="llama2",
                            bos_token_id=1, eos_token_id=2),
    # Llama 3 8B: 32 heads / 8 kv heads, 128k context with llama3 RoPE scaling, untied, tiktoken.
    "llama3-8b-mini": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=1, max_position_embeddings=131072, rope_theta=500000.0,
                           rope_scaling=LLAMA3_ROPE_SCALING, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           tokenizer="llama3", bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    # Llama 3.2 1B: GQA, tied embeddings, llama3 RoPE scaling.
    "llama32-1b-mini": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0,
                            rope_scaling=LLAMA3_ROPE_SCALING, rms_norm_eps=1e-5, tie_word_embeddings=True,
                            tokenizer="llama3", bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
}
LLAMA2_DEMO_VOCAB = 2000


def hf_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
              num_attention_heads: int, num_key_value_heads: int | None = None, dtype: str = "float32",
              rope_form: str = "classic", **extra) -> dict:
    """A Hugging Face LlamaForCausalLM config.json dict; rope_form 'classic' writes rope_theta + rope_scaling,
    'parameters' the newer rope_parameters dict."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "max_position_embeddings": extra.pop("max_position_embeddings", 2048),
        "rms_norm_eps": extra.pop("rms_norm_eps", 1e-5), "tie_word_embeddings": extra.pop("tie_word_embeddings", False),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
        "bos_token_id": extra.pop("bos_token_id", 1), "eos_token_id": extra.pop("eos_token_id", 2),
    }
    theta = extra.pop("rope_theta", 10000.0)
    scaling = extra.pop("rope_scaling", None)
    if rope_form == "parameters":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = scaling
    cfg.update(extra)
    return cfg


def random_weights(cfg: dict, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """fp32 random weights with the exact HF tensor names and shapes for `cfg`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // n_heads

    def rand(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return 1.0 + torch.randn(h, generator=g) * 0.1

    w = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": norm()}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = rand(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(n_heads * d, h)
        w[p + "self_attn.k_proj.weight"] = rand(n_kv * d, h)
        w[p + "self_attn.v_proj.weight"] = rand(n_kv * d, h)
        w[p + "self_attn.o_proj.weight"] = rand(h, n_heads * d)
        w[p + "mlp.gate_proj.weight"] = rand(inter, h)
        w[p + "mlp.up_proj.weight"] = rand(inter, h)
        w[p + "mlp.down_proj.weight"] = rand(h, inter)
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
    return w


def write_checkpoint(outdir: str | Path, cfg: dict, *, seed: int = 0, num_shards: int = 1,
                     tokenizer: str | None = None) -> Path:
    """Write config.json + safetensors (one file, or `num_shards` files with an index) + tokenizer."""
    import torch
    from safetensors.torch import save_file

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["torch_dtype"]]
    weights = {k: t.to(dtype).contiguous() for k, t in random_weights(cfg, seed).items()}
    if num_shards <= 1:
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(weights)
        weight_map, total = {}, sum(t.numel() * t.element_size() for t in weights.values())
        for s in range(num_shards):
            fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            part = names[s::num_shards]
            save_file({k: weights[k] for k in part}, out / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}, indent=2))
    if tokenizer == "llama3":
        shutil.copyfile(llama3_tokenizer_path(), out / "tokenizer.model")
    elif tokenizer == "llama2":
        build_llama2_sentencepiece(out / "tokenizer.model", vocab_size=cfg["vocab_size"])
    return out


def write_demo_checkpoint(outdir: str | Path, shape: str, *, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """One of DEMO_SHAPES, with its real tokenizer (Meta's Llama 3 tokenizer.model, or a small SentencePiece
    model for the Llama 2 shape)."""
    if shape not in DEMO_SHAPES:
        raise ValueError(f"unknown demo shape {shape!r}; choose from {', '.join(DEMO_SHAPES)}")
    spec = dict(DEMO_SHAPES[shape])
    tokenizer = spec.pop("tokenizer")
    if tokenizer == "llama3":
        return write_checkpoint(outdir, hf_config(vocab_size=LLAMA3_VOCAB, dtype=dtype, **spec), seed=seed,
                                tokenizer="llama3")
    # The SentencePiece trainer may settle on fewer pieces than asked; the model's vocabulary follows it.
    sp_path = build_llama2_sentencepiece(Path(outdir) / "tokenizer.model", vocab_size=LLAMA2_DEMO_VOCAB)
    vocab = Tokenizer.from_file(sp_path).vocab_size
    return write_checkpoint(outdir, hf_config(vocab_size=vocab, dtype=dtype, **spec), seed=seed)
