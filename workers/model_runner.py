"""Runs one model (or one TP rank / PP stage of it) over its own slice of the paged KV cache.

The engine core turns a scheduler decision into a `StepInput` made of plain lists (cheap to pickle, so the
same object travels to Ray shard workers); the runner turns it into tensors on its device, runs the
forward pass and returns logits for the rows that sample (last stage) or hidden states (earlier stages).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .attention import AttentionMetadata, PrefillChunk, context_slots, select_attention_backend
from .config import ModelConfig
from .cuda_graphs import CudaGraphDecoder, decode_graphs_for, graphs_wanted
from .gpu_memory import kv_cache_torch_dtype
from .layer_ops import select_layer_ops
from .model import LlamaForCausalLM
from .shard import ShardInfo, TPGroup, kv_block_bytes
from .weights import WeightSource

log = logging.getLogger(f"herd.{__name__}")


@dataclass
class StepInput:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    num_decode: int = 0                                      # first tokens: one per decoding sequence
    decode_block_tables: list[list[int]] = field(default_factory=list)
    decode_seq_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # q_start, q_len, ctx_len, blocks
    sample_indices: list[int] = field(default_factory=list)  # flat token rows whose logits are needed

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def split(self, num_parts: int) -> list["StepInput"]:
        """Split by sequence into up to `num_parts` micro-batches of about equal tokens (pipeline parallel)."""
        seqs = [(i, 1, self.decode_seq_lens[i], self.decode_block_tables[i]) for i in range(self.num_decode)]
        seqs += list(self.prefills)
        if num_parts <= 1 or len(seqs) <= 1:
            return [self]
        target = self.num_tokens / min(num_parts, len(seqs))
        groups, current, tokens = [], [], 0
        for s in seqs:
            current.append(s)
            tokens += s[1]
            if tokens >= target and len(groups) < num_parts - 1:
                groups.append(current)
                current, tokens = [], 0
        if current:
            groups.append(current)
        return [self._subset(g) for g in groups]

    def _subset(self, seqs) -> "StepInput":
        # A sequence may want several rows (prompt_logprobs keeps every prompt position's logits), in order.
        sample = sorted(self.sample_indices)
        out = StepInput()
        for q_start, q_len, ctx_len, blocks in seqs:
            new_start = len(out.input_ids)
            sl = slice(q_start, q_start + q_len)
            out.input_ids += self.input_ids[sl]
            out.positions += self.positions[sl]
            out.slot_mapping += self.slot_mapping[sl]
            if q_len == 1 and q_start < self.num_decode:
                out.num_decode += 1
                out.decode_block_tables.append(blocks)
                out.decode_seq_lens.append(ctx_len)
            else:
                out.prefills.append((new_start, q_len, ctx_len, blocks))
            out.sample_indices += [new_start + i - q_start for i in sample if q_start <= i < q_start + q_len]
        return out


class ModelRunner:
    def __init__(self, cfg: ModelConfig, *, shard: ShardInfo = ShardInfo(), group: TPGroup | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", max_model_len: int,
                 block_size: int, kv_cache_dtype: str = "auto"):
        self.cfg, self.shard, self.dtype = cfg, shard, dtype
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.model = LlamaForCausalLM(cfg, shard=shard, group=group, dtype=dtype, device=self.device,
                                      max_positions=max_model_len, attention=select_attention_backend(self.device),
                                      layer_ops=select_layer_ops(self.device))
        self.kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, dtype, self.model)   # fp8: gpu_memory.py
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.weight_bytes_read = 0
        self.decode_graphs: CudaGraphDecoder | None = None   # CUDA only (cuda_graphs.py)
        # A shard of a TP x PP group: the largest decode-graph batch its group agreed on (ShardWorker.init;
        # None: eager). A single shard decides alone (cuda_graphs.graph_max_batch).
        self.agreed_graph_batch: int | None = None

    def load_weights(self, path: str, show_progress: bool = True) -> None:
        layers = len(self.model.layers)
        with WeightSource(path) as src, tqdm(total=layers, desc="loading weights", unit="layer",
                                             disable=not show_progress, leave=False) as bar:
            self.model.load_weights(src, progress=bar.update)
            self.weight_bytes_read = src.bytes_read
        self.model.pack_weights_for_cpu()

    def block_bytes(self) -> int:
        return kv_block_bytes(self.cfg, self.shard, self.block_size, self.dtype) * self.kv_dtype.itemsize \
            // self.dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        k0, k1 = self.shard.kv_heads(self.cfg)
        graphs = graphs_wanted(self)   # CUDA graphs pad their batches into one scratch block beyond the pool
        shape = (num_blocks + graphs, self.block_size, k1 - k0, self.cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                          for _ in self.model.layers]
        self.decode_graphs = decode_graphs_for(self, padding_block=num_blocks) if graphs else None

    def _metadata(self, step: StepInput) -> AttentionMetadata:
        dev, bs, long = self.device, self.block_size, torch.long
        if step.num_decode:
            width = max(len(t) for t in step.decode_block_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in step.decode_block_tables], dtype=long, device=dev)
        else:
            tables = torch.zeros((0, 1), dtype=long, device=dev)
        prefills = [PrefillChunk(s, n, c, context_slots(torch.tensor(b, dtype=long, device=dev), c, bs))
                    for s, n, c, b in step.prefills]
        return AttentionMetadata(torch.tensor(step.slot_mapping, dtype=long, device=dev), step.num_decode, tables,
                                 torch.tensor(step.decode_seq_lens, dtype=long, device=dev), prefills, bs)

    @torch.inference_mode()
    def execute(self, step: StepInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Last stage: fp32 logits [len(sample_indices), vocab] (on CPU; a replayed decode graph's stay on the
        GPU, where the sampler takes them). Other stages: hidden states. `hidden`: a later stage's input."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(step):
            return self.decode_graphs.run(step, hidden)
        positions = torch.tensor(step.positions, dtype=torch.long, device=self.device)
        meta = self._metadata(step)
        input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=self.device) if self.shard.is_first_stage else None
        if hidden is not None:
            hidden = hidden.to(self.device)
        out = self.model(positions, self.kv_caches, meta, input_ids=input_ids, hidden=hidden)
        if not self.shard.is_last_stage:
            return out
        rows = torch.tensor(step.sample_indices, dtype=torch.long, device=self.device)
        return self.model.compute_logits(out.index_select(0, rows)).cpu()
