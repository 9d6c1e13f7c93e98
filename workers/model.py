"""Llama (2 and 3.x) over a paged KV cache: RMSNorm, RoPE (with llama3 scaling), GQA attention, SwiGLU.

One class serves the whole model in one process and any tensor-parallel rank / pipeline stage of it:
`ShardInfo` says which heads, MLP columns, vocabulary rows and layers this process owns, and `TPGroup`
supplies the two collectives Megatron-style TP needs (all-reduce after the row-parallel o/down
projections and the vocab-parallel embedding, all-gather of the vocab-parallel logits).

Projections that read the same input are fused at load time (q|k|v, gate|up) so a step runs one matmul
where Hugging Face runs three.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, AttentionMetadata, TorchPagedAttention
from .config import ModelConfig, RopeConfig
from .layer_ops import TorchLayerOps
from .packed_linear import linear, pack_module_weights
from .shard import LocalGroup, ShardInfo, TPGroup
from .weights import WeightSource


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Meta's llama3 scaling: keep high frequencies, divide low ones by `factor`, blend in between.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables [max_positions, head_dim/2] (rotate-half layout, as HF checkpoints use); the rotation
    itself is a layer op (layer_ops.py)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, dtype: torch.dtype, device):
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos().to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype=dtype, device=device), persistent=False)


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: ShardInfo, group: TPGroup, dtype, device,
                 attention: AttentionBackend, ops: TorchLayerOps):
        super().__init__()
        self.cfg, self.shard, self.group, self.attention, self.ops = cfg, shard, group, attention, ops
        q0, q1 = shard.q_heads(cfg)
        k0, k1 = shard.kv_heads(cfg)
        i0, i1 = shard.intermediate(cfg)
        self.n_q, self.n_kv, self.n_inter = q1 - q0, k1 - k0, i1 - i0
        d, h = cfg.head_dim, cfg.hidden_size
        self.qkv = _param(((self.n_q + 2 * self.n_kv) * d, h), dtype, device)
        self.o = _param((h, self.n_q * d), dtype, device)
        self.gate_up = _param((2 * self.n_inter, h), dtype, device)
        self.down = _param((h, self.n_inter), dtype, device)
        self.input_norm = _param((h,), dtype, device)
        self.post_attn_norm = _param((h,), dtype, device)
        self.scale = d ** -0.5

    def load(self, src: WeightSource, prefix: str) -> None:
        cfg, shard, d = self.cfg, self.shard, self.cfg.head_dim
        q0, q1 = shard.q_heads(cfg)
        k0, k1 = shard.kv_heads(cfg)
        i0, i1 = shard.intermediate(cfg)
        att, mlp = prefix + "self_attn.", prefix + "mlp."
        with torch.no_grad():
            self.qkv.copy_(torch.cat([
                src.get(att + "q_proj.weight", 0, q0 * d, q1 * d),
                src.get(att + "k_proj.weight", 0, k0 * d, k1 * d),
                src.get(att + "v_proj.weight", 0, k0 * d, k1 * d),
            ]))
            self.o.copy_(src.get(att + "o_proj.weight", 1, q0 * d, q1 * d))
            self.gate_up.copy_(torch.cat([
                src.get(mlp + "gate_proj.weight", 0, i0, i1),
                src.get(mlp + "up_proj.weight", 0, i0, i1),
            ]))
            self.down.copy_(src.get(mlp + "down_proj.weight", 1, i0, i1))
            self.input_norm.copy_(src.get(prefix + "input_layernorm.weight"))
            self.post_attn_norm.copy_(src.get(prefix + "post_attention_layernorm.weight"))

    def forward(self, x, positions, rotary: Rotary, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        d, eps = self.cfg.head_dim, self.cfg.rms_norm_eps
        ops = self.ops
        h = ops.rms_norm(x, self.input_norm, eps)
        q, k, v = linear(h, self.qkv).split([self.n_q * d, self.n_kv * d, self.n_kv * d], dim=-1)
        q = ops.rotary(q.view(-1, self.n_q, d), rotary.cos, rotary.sin, positions)
        k = ops.rotary(k.view(-1, self.n_kv, d), rotary.cos, rotary.sin, positions)
        v = v.view(-1, self.n_kv, d)
        attn = self.attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        # The residual add and the norm after it are one op (one pass on GPU); x is the sum.
        h, x = ops.add_rms_norm(x, self.group.all_reduce(linear(attn.reshape(-1, self.n_q * d), self.o)),
                                self.post_attn_norm, eps)
        return x + self.group.all_reduce(linear(ops.silu_mul(linear(h, self.gate_up)), self.down))


class LlamaForCausalLM(nn.Module):
    """The model, or one shard of it (see ShardInfo). Stage inputs/outputs:
    first stage takes token ids, later stages take the previous stage's hidden states; every stage
    returns hidden states, and the last stage's `compute_logits` maps them to full-vocabulary logits."""

    def __init__(self, cfg: ModelConfig, *, shard: ShardInfo = ShardInfo(), group: TPGroup | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_positions: int | None = None, attention: AttentionBackend | None = None,
                 layer_ops: TorchLayerOps | None = None):
        super().__init__()
        self.cfg, self.shard, self.group = cfg, shard, group or LocalGroup()
        self.dtype, self.device = dtype, torch.device(device)
        attention = attention or TorchPagedAttention()
        self.ops = layer_ops or TorchLayerOps()
        self.layer_ids = list(shard.layers(cfg))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, shard, self.group, dtype, device, attention, self.ops) for _ in self.layer_ids)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, max_positions or cfg.max_position_embeddings, dtype, device)
        self.vocab_start, self.vocab_end = shard.vocab(cfg)
        rows = shard.vocab_per_rank(cfg)
        needs_embed = shard.is_first_stage or (shard.is_last_stage and cfg.tie_word_embeddings)
        self.embed = _param((rows, cfg.hidden_size), dtype, device) if needs_embed else None
        self.norm = _param((cfg.hidden_size,), dtype, device) if shard.is_last_stage else None
        if shard.is_last_stage:
            self.lm_head = self.embed if cfg.tie_word_embeddings else _param((rows, cfg.hidden_size), dtype, device)
        else:
            self.lm_head = None

    # ---- weights -------------------------------------------------------------------------------
    def load_weights(self, src: WeightSource, progress: Callable[[int], None] | None = None) -> None:
        v0, v1 = self.vocab_start, self.vocab_end
        with torch.no_grad():
            if self.embed is not None:
                self.embed.zero_()  # padding rows of the last vocab shard stay zero
                self.embed[: v1 - v0].copy_(src.get("model.embed_tokens.weight", 0, v0, v1))
            if self.lm_head is not None and self.lm_head is not self.embed:
                self.lm_head.zero_()
                self.lm_head[: v1 - v0].copy_(src.get("lm_head.weight", 0, v0, v1))
            if self.norm is not None:
                self.norm.copy_(src.get("model.norm.weight"))
        for layer_id, layer in zip(self.layer_ids, self.layers):
            layer.load(src, f"model.layers.{layer_id}.")
            if progress:
                progress(1)

    def pack_weights_for_cpu(self) -> None:
        """Pack the matmul weights for the CPU's kernels (packed_linear.py); a no-op on GPU.

        A tied lm_head (Llama 3.2 1B/3B) gets a packed copy of its own, and the embedding lookup keeps reading
        the plain rows: plain, every step's logits re-laid the whole vocabulary matrix out, which made the
        head of a [vocab 128,256 x hidden 2,048] model 1.2-2.5x slower in bf16 and 1.8-3.3x in fp32 at 1-64
        rows (docs/benchmarks.md). The copy costs vocab x hidden more host memory (525 MB for Llama 3.2 1B in
        bf16); a last pipeline stage, which looks nothing up, keeps the packed copy only."""
        for layer in self.layers:
            pack_module_weights(layer, ["qkv", "o", "gate_up", "down"])
        if self.lm_head is None:
            return
        pack_module_weights(self, ["lm_head"])      # tied: the Parameter stays registered as `embed`
        if self.lm_head is not self.embed and not self.shard.is_first_stage:
            self.embed = None

    def weight_bytes(self) -> int:
        seen, total = {id(b) for b in self.rotary.buffers()}, 0
        for p in list(self.parameters()) + list(self.buffers()):  # packed weights are buffers
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    # ---- forward -------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return F.embedding(input_ids, self.embed)
        # Vocab-parallel: each rank looks up the ids it owns, zeros elsewhere, then all-reduce.
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.vocab_end - self.vocab_start)
        out = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed)
        return self.group.all_reduce(out * owned.unsqueeze(-1).to(out.dtype))

    def forward(self, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if self.shard.is_first_stage else hidden
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary, cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits for the given final hidden states (last stage only)."""
        h = self.ops.rms_norm(hidden, self.norm, self.cfg.rms_norm_eps)
        logits = linear(h, self.lm_head)
        if self.shard.tp_size > 1:
            logits = self.group.all_gather(logits, dim=-1)
        return logits[:, : self.cfg.vocab_size].float()
