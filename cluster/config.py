"""ClusterConfig: the one YAML that `herd serve CONFIG.yaml`, `serve run cluster.app:build_app` and the Helm
chart's serveConfigV2 share. Validated with pydantic; every error names the path of the bad key
(`models[1].tensor_parallel_size: ...`). Keys follow vLLM / Ray Serve naming.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.errors import HerdError

_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ConfigError(HerdError):
    """The cluster configuration is invalid; the message names the key."""


def default_resources_per_shard() -> dict[str, float]:
    """{GPU: 1} where CUDA is present, else {CPU: 1} (a whole-model replica is one shard)."""
    try:
        import torch
        if torch.cuda.is_available():
            return {"GPU": 1.0}
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return {"CPU": 1.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling_config keys herd accepts (the policy defaults to herd's LLM-aware one)."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    metrics_interval_s: Optional[float] = Field(None, gt=0)
    look_back_period_s: Optional[float] = Field(None, gt=0)
    upscaling_factor: Optional[float] = Field(None, gt=0)
    downscaling_factor: Optional[float] = Field(None, gt=0)
    policy: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class TLSConfig(_Strict):
    cert_file: str
    key_file: str


class RouterConfig(_Strict):
    """Prefix-cache router options (cluster/routing.py); per-model `router` overrides these."""
    load_imbalance_margin: float = Field(8, ge=0)
    min_match_blocks: int = Field(1, ge=1)
    max_hashes_per_replica: int = Field(16384, ge=1)
    max_prefix_blocks: int = Field(2048, ge=1)
    routing_stats_period_s: float = Field(2.0, gt=0)


_ENGINE_KEYS = ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "block_size", "kv_cache_memory",
                "gpu_memory_utilization", "enable_prefix_caching", "max_queued_requests", "placement_strategy",
                "resources_per_shard", "pp_layer_partition")


class ModelDeploymentConfig(_Strict):
    name: str
    path: str
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    pp_layer_partition: Optional[list[int]] = None
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    resources_per_shard: dict[str, float] = Field(default_factory=default_resources_per_shard)
    num_replicas: Optional[int] = Field(None, ge=1)
    autoscaling_config: Optional[AutoscalingConfig] = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_num_seqs: Optional[int] = Field(None, ge=1)
    max_model_len: Optional[int] = Field(None, ge=2)
    max_num_batched_tokens: Optional[int] = Field(None, ge=1)
    block_size: Optional[int] = Field(None, ge=1, le=1024)
    kv_cache_memory: Optional[int] = Field(None, ge=1)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    enable_prefix_caching: Optional[bool] = None
    max_queued_requests: Optional[int] = Field(None, ge=0)
    # Serve deployment knobs
    max_ongoing_requests: int = Field(64, ge=1)
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    router: Optional[RouterConfig] = None

    @field_validator("name")
    @classmethod
    def _dns_safe(cls, v: str) -> str:
        if not _DNS_NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '.', at most 63 characters (DNS-safe)")
        return v

    @field_validator("resources_per_shard")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("must name at least one resource, e.g. {GPU: 1} or {CPU: 0.25}")
        for k, amount in v.items():
            if amount < 0:
                raise ValueError(f"{k} must be >= 0")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "ModelDeploymentConfig":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.pp_layer_partition is not None and len(self.pp_layer_partition) != self.pipeline_parallel_size:
            raise ValueError("pp_layer_partition needs one entry per pipeline stage")
        return self

    @property
    def num_shards(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for workers.Engine.from_pretrained beyond path/TP/PP/dtype (only those set)."""
        args = {k: getattr(self, k) for k in _ENGINE_KEYS if getattr(self, k) is not None}
        args["placement_strategy"] = self.placement_strategy
        args["resources_per_shard"] = dict(self.resources_per_shard)
        return args

    @property
    def router_kwargs(self) -> dict[str, Any]:
        return self.router.model_dump(exclude={"routing_stats_period_s"}) if self.router else {}

    @property
    def routing_stats_period_s(self) -> float:
        return (self.router or RouterConfig()).routing_stats_period_s


class ClusterConfig(_Strict):
    host: str = "127.0.0.1"
    grpc_port: int = Field(9000, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, repr=False)
    api_keys_file: Optional[str] = None
    tls: Optional[TLSConfig] = None
    request_timeout_s: Optional[float] = Field(None, gt=0)
    ingress_replicas: int = Field(1, ge=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    models: list[ModelDeploymentConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.api_keys and self.api_keys_file:
            raise ValueError("set api_keys or api_keys_file, not both")
        if self.grpc_port == self.http_port:
            raise ValueError("grpc_port and http_port must differ")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique (repeated: {', '.join(dupes)})")
        for m in self.models:  # a model without its own router section takes the cluster's
            if m.router is None:
                object.__setattr__(m, "router", self.router)
        return self

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> "ClusterConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_describe(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        data = read_yaml(path)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def resolved_api_keys(self) -> list[str]:
        """The accepted API keys: inline, or one per non-empty line of api_keys_file (a mounted Secret)."""
        if self.api_keys_file:
            try:
                lines = Path(self.api_keys_file).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"api_keys_file: cannot read {self.api_keys_file} ({e.strerror})") from None
            return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        return list(self.api_keys)

    def __repr_args__(self):  # never print keys
        for k, v in super().__repr_args__():
            yield (k, "<redacted>" if k == "api_keys" and v else v)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file; unreadable or malformed files raise ConfigError naming the file."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        path = ""
        for item in err["loc"]:
            path += f"[{item}]" if isinstance(item, int) else (f".{item}" if path else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{path or 'config'}: {msg}")
    return "; ".join(parts)
