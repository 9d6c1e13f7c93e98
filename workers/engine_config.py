"""EngineConfig: every setting of one engine, declared once.

This model is the source the other surfaces derive from: a cluster config's model entry takes each field as an
optional key of the same name (cluster/config.py), the Helm chart's values schema is generated from those
(cluster/schema_gen.py), and `herd generate` / `chat` / `serve` build their engine flags from the fields'
names, types, defaults and descriptions (cluster/settings_flags.py). A new engine setting is one field here,
plus its use.

It imports neither torch nor Ray (only pydantic), so the CLI and the cluster config can read it cheaply.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidRequestError

PlacementStrategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


class EngineConfig(BaseModel):
    """Engine arguments (`Engine.from_pretrained(path, **engine_args)`). An invalid value raises
    InvalidRequestError naming the argument."""
    # strict: a bool or a string is not taken for a number (a float field still takes an int). frozen: the
    # engine, its executor and its shard workers hold the same settings for their whole life.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_model_len: Optional[int] = Field(
        None, ge=2, description="longest prompt + output in tokens (default: the model's context, capped to what "
                                "the KV cache holds)")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    max_num_seqs: int = Field(128, ge=1, description="sequences in the engine's batch")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="token budget of one step (longer prompts are prefilled in chunks)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of prompts seen before")
    max_queued_requests: Optional[int] = Field(
        None, ge=0, description=("requests waiting in the engine's scheduler, a request of n completions counting n "
                                  "(default: unbounded)"))
    kv_cache_memory: Optional[int] = Field(
        None, ge=1, description="bytes of KV cache per shard on CPU (default: 1 GiB)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory the weights and KV cache may take")
    num_gpu_blocks_override: Optional[int] = Field(
        None, ge=1, description="KV blocks per shard, instead of what the memory budget gives")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="KV cache element type: auto (the model's dtype) or fp8 (e4m3 with per-tensor "
                            "scales: twice the tokens; CUDA with the Triton attention, every shard)")
    show_progress: bool = Field(True, description="show a progress bar while the weights load")
    # Parallel-only settings (used by workers.parallel); accepted here so one config serves every layout.
    placement_strategy: PlacementStrategy = Field(
        "PACK", description="placement-group strategy of a TP x PP replica's shards")
    resources_per_shard: Optional[dict[str, float]] = Field(
        None, description="Ray resources of one shard, e.g. {GPU: 1} or {CPU: 0.5}")
    pp_layer_partition: Optional[list[Annotated[int, Field(ge=1)]]] = Field(
        None, description="layers per pipeline stage (one entry per stage; default: even)")
    num_microbatches: Optional[int] = Field(
        None, ge=1, description="micro-batches a pipeline step is split into (default: one per stage for a step "
                                "with enough tokens, else one)")
    use_compiled_graph: Optional[bool] = Field(
        None, description="drive the shards with a Ray Compiled Graph (default: on GPU shards, off on CPU)")
    collective_timeout_s: float = Field(
        60.0, gt=0, description="seconds a shard waits in a collective before it fails")
    # AsyncEngine.check_health reports the engine dead when one step runs longer than this (a hung shard or
    # collective). Generous: a GPU's first step compiles kernels and can take minutes.
    step_timeout_s: float = Field(
        300.0, gt=0, description="seconds one engine step may run before the engine counts as dead")

    def __init__(self, **kwargs: Any) -> None:
        try:
            super().__init__(**kwargs)
        except ValidationError as e:
            raise invalid_argument(e) from None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        unknown = sorted(set(kwargs) - set(cls.model_fields))
        if unknown:
            known = ", ".join(sorted(cls.model_fields))
            raise InvalidRequestError(unknown[0], f"unknown engine argument (known: {known})")
        return cls(**kwargs)

    def cache_budget(self):
        from .executor import CacheBudget  # torch: only where an engine is built

        return CacheBudget(self.kv_cache_memory, self.gpu_memory_utilization, self.num_gpu_blocks_override)


def invalid_argument(e: ValidationError) -> InvalidRequestError:
    """The first error of a ValidationError as InvalidRequestError(argument, message)."""
    err = e.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "engine"
    return InvalidRequestError(name, err["msg"].removeprefix("Value error, "))
