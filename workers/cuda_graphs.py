"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once over fixed-address
input buffers, so a decode step costs a few small copies and one replay instead of hundreds of kernel launches
issued from Python (at batch 1 on a large GPU the launches, not the GPU, set the pace).

How a step runs (as vLLM's CUDAGraphRunner and SGLang's cuda_graph_runner do it):
- Only pure decode steps (one new token per sequence, every row sampled) replay a graph; prefill and mixed
  steps run eagerly, since their shapes change every step.
- The batch is padded up to the smallest bucket that holds it. Padding rows write their k/v to a scratch
  block the runner allocates beyond the engine's pool (vLLM's padding slot) and attend over its first key
  only, so they cannot disturb a sequence; their logits are dropped.
- Block tables are padded inside the graph: the graph reads a [bucket, max_model_len / block_size] table,
  of which each step fills only the columns its longest sequence uses; the decode kernel never reads past
  a row's seq_len, so stale columns are never read. The Triton decode kernel's split count depends only on
  the batch and the table's width (`decode_splits`), so it is fixed per bucket, as a replay needs.
- Inputs go up through pinned host buffers with non-blocking copies; the host waits for the previous
  step's copies to have left those buffers (a CUDA event) before it overwrites them, never for the GPU's
  compute. The logits stay on the GPU: the engine's sampler draws there (gpu_sampling.py) and only the
  sampled ids come back to the host.

Shards of a TP × PP group (workers/parallel/) capture and replay their decode steps too:
- Every TP rank of a stage must issue the same collectives in the same order, or they hang. The driver hands
  every shard the same StepInput, and `can_run` and the bucket are functions of that step and of the buckets
  alone, so every rank replays the same bucket's graph (or all run eagerly); the buckets themselves are
  agreed at setup: each shard requests a largest batch (`requested_max_batch`), the group takes the minimum
  (`ShardComm.agree_on_graphs`, before the KV cache is sized), and `capture` checks that every rank of the
  stage holds the same buckets and table width before it starts, which is also the rendezvous that makes
  every rank's KV cache exist before any rank captures. Then all capture the buckets in one order, largest
  first.
- The TP all-reduces (and the logits' all-gather) are inside the graph. They go to a capture-safe twin of the
  stage's TP group (NCCL without TORCH_NCCL_BLOCKING_WAIT, whose host-side wait a capture cannot record:
  workers/parallel/distributed.py), only while a graph's forward is captured or warmed up (`graph_mode`).
- A pipeline stage after the first reads its hidden states from a static buffer (the received rows, padding
  rows zero); one before the last returns its graph's hidden states (a copy) for the next stage. Sends and
  receives stay outside the graphs.

On by default on CUDA with the Triton attention (the portable path sizes its work from values on the GPU);
HERD_CUDA_GRAPHS=0 turns it off, HERD_CUDA_GRAPH_MAX_BATCH (default 256) bounds the buckets (a shard group
takes the smallest of its shards'). The padding, the static buffers, the stage inputs and the TP group's
routing are plain torch code and are tested on the CPU (tests/test_cuda_graphs.py,
tests/test_cuda_graphs_tp.py): the forward that is captured runs there eagerly, on one shard, on two
pipeline stages and across a real 2-process gloo TP group, and equals the unpadded step.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Iterator

import torch

from .attention import AttentionMetadata

if TYPE_CHECKING:
    from .model_runner import ModelRunner, StepInput

log = logging.getLogger(f"herd.{__name__}")

# Batch sizes with a graph: fine steps where padding would cost most relative to the batch, coarser above.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
DEFAULT_MAX_GRAPH_BATCH = 256


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The buckets that hold at most max_batch sequences, plus max_batch itself when it falls between two."""
    kept = [b for b in GRAPH_BUCKETS if b <= max_batch]
    if max_batch >= 1 and (not kept or kept[-1] != max_batch):
        kept.append(max_batch)
    return tuple(kept)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `batch` sequences; None when the batch is larger than every bucket."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if batch >= 1 and i < len(buckets) else None


def is_pure_decode(step: "StepInput") -> bool:
    """One new token per sequence and every row sampled, in order: what a decode graph computes."""
    return (step.num_decode > 0 and not step.prefills and step.num_tokens == step.num_decode
            and step.sample_indices == list(range(step.num_decode)))


def padded_rows(step: "StepInput", bucket: int, padding_block: int, block_size: int
                ) -> tuple[list[int], list[int], list[int], list[int]]:
    """input ids, positions, cache slots and seq lens of the step padded to `bucket` rows: a padding row is
    token 0 at position 0, writing the first slot of `padding_block` and seeing that one key."""
    pad = bucket - step.num_decode
    if pad < 0:
        raise ValueError(f"{step.num_decode} sequences do not fit a bucket of {bucket}")
    return (step.input_ids + [0] * pad, step.positions + [0] * pad,
            step.slot_mapping + [padding_block * block_size] * pad, step.decode_seq_lens + [1] * pad)


def padded_tables(step: "StepInput", bucket: int, padding_block: int) -> list[list[int]]:
    """[bucket][width] block tables, width = the step's longest table: short rows repeat their last block
    (any valid block: it is never read), padding rows hold the padding block."""
    width = max(len(t) for t in step.decode_block_tables)
    rows = [t + [t[-1]] * (width - len(t)) for t in step.decode_block_tables]
    return rows + [[padding_block] * width] * (bucket - len(rows))


class StaticDecodeInputs:
    """The fixed-address inputs every decode graph reads: rows [4, max_batch] (token ids, positions, cache
    slots, seq lens; each row contiguous, as the kernels index them) and int64 block tables [max_batch,
    max_blocks], on the device, with host staging buffers (pinned on CUDA) they are copied from; and for a
    pipeline stage after the first, its input hidden states [max_batch, hidden_size] (`hidden_size` > 0)."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, padding_block: int, device: torch.device,
                 hidden_size: int = 0, dtype: torch.dtype = torch.float32):
        self.device, self.block_size, self.max_blocks = device, block_size, max_blocks
        self.padding_block = padding_block
        pin = device.type == "cuda"
        self.host_rows = torch.zeros((4, max_batch), dtype=torch.int64, pin_memory=pin)
        self.host_tables = torch.zeros(max_batch * max_blocks, dtype=torch.int64, pin_memory=pin)
        self.rows = torch.zeros((4, max_batch), dtype=torch.int64, device=device)
        self.tables = torch.zeros((max_batch, max_blocks), dtype=torch.int64, device=device)
        self.hidden = torch.zeros((max_batch, hidden_size), dtype=dtype, device=device) if hidden_size else None
        self.copied = torch.cuda.Event() if pin else None

    def load(self, step: "StepInput", bucket: int, hidden: torch.Tensor | None = None) -> None:
        """Write the step, padded to `bucket`, into the device buffers (non-blocking on CUDA); `hidden`: the
        previous stage's hidden states of its rows (a stage after the first)."""
        tables = padded_tables(step, bucket, self.padding_block)
        width = len(tables[0])
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds the graphs' {self.max_blocks}")
        if (hidden is None) != (self.hidden is None):
            raise ValueError("hidden states are the input of a pipeline stage after the first, and only of one")
        if self.copied is not None:
            self.copied.synchronize()        # the previous step's copies have left the staging buffers
        self.host_rows[:, :bucket] = torch.tensor(padded_rows(step, bucket, self.padding_block, self.block_size),
                                                  dtype=torch.int64)
        staged = self.host_tables[:bucket * width].view(bucket, width)
        staged.copy_(torch.tensor(tables, dtype=torch.int64))
        self.rows.copy_(self.host_rows, non_blocking=True)                 # 4 x max_batch int64: a few KiB
        self.tables[:bucket, :width].copy_(staged, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if hidden is not None:                                             # on the device already (received)
            self.hidden[:step.num_decode].copy_(hidden)
            self.hidden[step.num_decode:bucket].zero_()

    def load_placeholder(self, bucket: int) -> None:
        """Inputs for capturing a graph: every row a padding row (only the scratch block is written)."""
        placeholder = [0, 0, self.padding_block * self.block_size, 1]
        self.rows[:, :bucket] = torch.tensor(placeholder, dtype=torch.int64, device=self.device)[:, None]
        self.tables[:bucket] = self.padding_block
        if self.hidden is not None:
            self.hidden[:bucket].zero_()

    def metadata(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(self.rows[2, :bucket], bucket, self.tables[:bucket], self.rows[3, :bucket], [],
                                 self.block_size)

    def input_ids(self, bucket: int) -> torch.Tensor:
        return self.rows[0, :bucket]

    def positions(self, bucket: int) -> torch.Tensor:
        return self.rows[1, :bucket]

    def hidden_states(self, bucket: int) -> torch.Tensor | None:
        return None if self.hidden is None else self.hidden[:bucket]


def static_forward(runner: "ModelRunner", inputs: StaticDecodeInputs, bucket: int) -> torch.Tensor:
    """The decode forward over the static inputs: what each graph captures (the CPU tests run it eagerly).
    The last pipeline stage (or the only one) returns fp32 logits [bucket, vocab], an earlier one its hidden
    states [bucket, hidden_size]."""
    model, shard = runner.model, runner.shard
    hidden = model(inputs.positions(bucket), runner.kv_caches, inputs.metadata(bucket),
                   input_ids=inputs.input_ids(bucket) if shard.is_first_stage else None,
                   hidden=inputs.hidden_states(bucket))
    return model.compute_logits(hidden) if shard.is_last_stage else hidden


def requested_max_batch(runner: "ModelRunner") -> int:
    """The largest decode batch this process would capture a graph for, 0 for none: CUDA, the Triton
    attention (the portable path sizes its work from values on the GPU), not turned off by
    HERD_CUDA_GRAPHS=0; HERD_CUDA_GRAPH_MAX_BATCH bounds it. A shard group agrees on one value."""
    if runner.device.type != "cuda" or os.environ.get("HERD_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "off"):
        return 0
    try:
        from .triton_attention import TritonPagedAttention
    except ImportError:          # no triton: the portable attention runs, which a graph cannot replay
        return 0
    if not all(isinstance(layer.attention, TritonPagedAttention) for layer in runner.model.layers):
        return 0
    return max(0, int(os.environ.get("HERD_CUDA_GRAPH_MAX_BATCH", DEFAULT_MAX_GRAPH_BATCH)))


def graph_max_batch(runner: "ModelRunner") -> int:
    """The largest batch the runner's decode graphs hold, 0 = decode eagerly. A single shard: what it
    requests. A shard of a TP × PP group: what its group agreed on (`runner.agreed_graph_batch`, set by
    ShardWorker.init; unset = eager), and with TP only once its collectives have a capture-safe group."""
    if runner.shard.tp_size * runner.shard.pp_size == 1:
        return requested_max_batch(runner)
    if runner.device.type != "cuda" or not runner.agreed_graph_batch or not runner.model.group.capture_safe:
        return 0
    return runner.agreed_graph_batch


def graphs_wanted(runner: "ModelRunner") -> bool:
    return graph_max_batch(runner) > 0


class CudaGraphDecoder:
    """The captured decode graphs of one ModelRunner (built after its KV cache, which the graphs read)."""

    def __init__(self, runner: "ModelRunner", max_batch: int, padding_block: int):
        self.runner = runner
        self.buckets = buckets_up_to(max_batch)
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        first = runner.shard.is_first_stage
        self.inputs = StaticDecodeInputs(self.buckets[-1], self.max_blocks, runner.block_size, padding_block,
                                         runner.device, hidden_size=0 if first else runner.cfg.hidden_size,
                                         dtype=runner.dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0

    def capture_order(self) -> tuple[int, ...]:
        """Largest first: a smaller graph reuses the larger one's pool blocks. The same on every TP rank (it
        depends on the buckets alone), so their recorded collectives pair up."""
        return tuple(reversed(self.buckets))

    @contextlib.contextmanager
    def collectives(self) -> Iterator[None]:
        """Around capture (and the CPU tests' eager stand-in): every TP rank of the stage must hold the same
        buckets and table width (a rendezvous too: all have allocated their KV caches), then the collectives
        issued inside go to the group's capture-safe twin. A single shard: nothing to do."""
        group = self.runner.model.group
        group.check_same(hash((self.buckets, self.max_blocks)) & (2**62 - 1), "the decode graphs' buckets")
        with group.graph_mode():
            yield

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket in `capture_order` into one memory pool. Each is run once eagerly first, on a
        side stream, so Triton compiles its kernels, a TP group's communicator is warm and the allocator
        settles before capture."""
        device = self.runner.device
        with self.collectives():
            torch.cuda.synchronize(device)
            free_before = torch.cuda.mem_get_info(device)[0]
            pool = None
            side = torch.cuda.Stream(device)
            for bucket in self.capture_order():
                self.inputs.load_placeholder(bucket)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    static_forward(self.runner, self.inputs, bucket)
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)      # the warm-up's collectives are done before capture begins
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bucket] = static_forward(self.runner, self.inputs, bucket)
                pool = graph.pool() if pool is None else pool
                self.graphs[bucket] = graph
            torch.cuda.synchronize(device)
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info(device)[0])
        log.info("captured %d decode graphs (batch %d..%d), %.0f MiB", len(self.graphs), self.buckets[0],
                 self.buckets[-1], self.memory_bytes / 2**20)

    def can_run(self, step: "StepInput") -> bool:
        """A function of the step and the buckets only: every TP rank, given the same step, decides alike."""
        return is_pure_decode(step) and bucket_for(step.num_decode, self.buckets) is not None

    def run(self, step: "StepInput", hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket's graph over the step: fp32 logits [num_decode, vocab] (last stage) or hidden states
        [num_decode, hidden_size] (an earlier one; `hidden`: a later one's input), left on the GPU: the sampler
        draws there and only the sampled ids come back. A copy, since the next replay overwrites the graph's
        output."""
        bucket = bucket_for(step.num_decode, self.buckets)
        self.inputs.load(step, bucket, hidden)
        return self.replay(bucket)[:step.num_decode].clone()

    def replay(self, bucket: int) -> torch.Tensor:
        """The bucket's output over the loaded inputs (the one CUDA-only step of `run`)."""
        self.graphs[bucket].replay()
        return self.outputs[bucket]


def decode_graphs_for(runner: "ModelRunner", padding_block: int) -> CudaGraphDecoder:
    """The runner's captured decode graphs; `padding_block` is the scratch block its cache holds beyond the
    engine's pool (allocated when graphs_wanted)."""
    decoder = CudaGraphDecoder(runner, graph_max_batch(runner), padding_block)
    decoder.capture()
    return decoder
