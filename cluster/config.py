"""ClusterConfig: the one YAML that `herd serve CONFIG.yaml`, `serve run cluster.app:build_app` and the Helm
chart's serveConfigV2 share. Validated with pydantic; every error names the path of the bad key
(`models[1].tensor_parallel_size: ...`). Keys follow vLLM / Ray Serve naming.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from cluster import unavailable_replicas
from cluster.local_ray import DEFAULT_SERVE_TRANSPORT
from cluster.cpu_binding import DEFAULT_CPU_BINDING, DEFAULT_SERVING_CPUS
from workers.engine_config import EngineConfig, PlacementStrategy
from workers.errors import HerdError
from workers.stream_pacing import StreamPacing

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
    # How often replicas and handles push their load to Serve's controller, and the window it averages over.
    # Serve's defaults (10 s, 30 s) have the controller see a burst up to 10 s late: a burst of 48 streams on
    # one replica (min 1, max 2) got its second replica RUNNING only 30-33 s after the burst began, ~20 s
    # of it before the decision (tests/test_autoscale_burst.py, a 2-vCPU machine). LLM traffic comes in
    # bursts that the engine's batch absorbs only up to its max_num_seqs, so herd pushes every 2 s.
    metrics_interval_s: float = Field(2.0, gt=0, description=(
        "seconds between load reports to Serve's controller (Serve's default: 10)"))
    look_back_period_s: float = Field(10.0, gt=0, description=(
        "seconds of load reports the autoscaler averages (Serve's default: 30); must exceed metrics_interval_s"))
    upscaling_factor: Optional[float] = Field(None, gt=0)
    downscaling_factor: Optional[float] = Field(None, gt=0)
    policy: Optional[dict[str, Any]] = Field(None, description=(
        "Serve autoscaling policy (default: herd's LLM-aware policy)"))

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.look_back_period_s <= self.metrics_interval_s:  # Serve only warns, and averages a single report
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be greater than "
                             f"metrics_interval_s ({self.metrics_interval_s})")
        return self


class LimitsConfig(_Strict):
    """Bounds on what one request may ask for; each violation is INVALID_ARGUMENT / 400 naming the field.
    They keep one client from costing the others more than its own tokens (docs/serving.md, "Limits")."""
    max_prompt_chars: int = Field(2_000_000, ge=1, description="characters of a text prompt / chat content")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="prompt tokens (null = what max_model_len leaves)")
    max_prompts_per_request: int = Field(64, ge=1, description="prompts in one /v1/completions request")
    max_chat_messages: int = Field(512, ge=1, description="messages in one chat request")
    max_tokenize_chars: int = Field(2_000_000, ge=1, description="characters of a Tokenize request")
    max_stop_strings: int = Field(16, ge=0, description="stop strings per request")
    max_stop_string_chars: int = Field(256, ge=1, description="characters of one stop string")
    max_stop_token_ids: int = Field(64, ge=0, description="stop token ids per request")
    max_logprobs: int = Field(20, ge=0, le=20, description="top-N log-probabilities per token")
    max_logit_bias_tokens: int = Field(1024, ge=0, description="token ids in one request's logit_bias")
    max_structured_chars: int = Field(262_144, ge=1, description=(
        "characters of a structured-output constraint: JSON schema text, regex, grammar, or all choices"))
    max_tools_chars: int = Field(262_144, ge=1, description="characters of a chat request's tools, as JSON")
    min_repetition_penalty: float = Field(0.01, gt=0)
    max_repetition_penalty: float = Field(10.0, gt=0)
    max_request_body_bytes: int = Field(8 << 20, ge=1024, description=(
        "HTTP request body (413 over it, checked before parsing)"))
    request_body_timeout_s: float = Field(60.0, gt=0, description=(
        "seconds an HTTP request body may take to arrive in full (408 after it)"))
    slow_request_body_s: float = Field(10.0, gt=0, description=(
        "seconds after which an HTTP request body still arriving counts against max_slow_request_bodies"))
    max_slow_request_bodies: int = Field(16, ge=1, description=(
        "HTTP request bodies still arriving after slow_request_body_s, at once per ingress replica (429 over it)"))
    max_http_connections: int = Field(10_000, ge=1, description=(
        "open HTTP connections per proxy, at most 40% of its open-file limit (HERD_HTTP_MAX_CONNECTIONS on every Ray "
        "container); at the cap a new one closes the longest idle"))
    max_http_header_bytes: int = Field(64 << 10, ge=1024, description=(
        "HTTP request line and headers (431 over it; HERD_HTTP_MAX_HEADER_BYTES on every Ray container)"))
    max_grpc_connections: int = Field(10_000, ge=1, description=(
        "open gRPC connections per proxy, at most 40% of its open-file limit (HERD_GRPC_MAX_CONNECTIONS on every "
        "Ray container); past it a new one is closed at once"))
    grpc_connection_idle_s: float = Field(300.0, ge=1, description=(
        "seconds a gRPC connection with no call in flight stays open (HERD_GRPC_CONNECTION_IDLE_S)"))
    max_grpc_message_bytes: int = Field(8 << 20, ge=1024, description=(
        "gRPC message size of the proxies (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE on every Ray container)"))
    max_request_id_chars: int = Field(128, ge=8, description="characters of a client request id")
    max_health_watchers: int = Field(64, ge=0, description="concurrent Health.Watch streams per ingress replica")

    @model_validator(mode="after")
    def _ranges(self) -> "LimitsConfig":
        if self.max_repetition_penalty < self.min_repetition_penalty:
            raise ValueError("max_repetition_penalty must be >= min_repetition_penalty")
        return self


class TLSConfig(_Strict):
    """TLS on the proxies: Serve's HTTP proxy everywhere; the gRPC proxy on a local `herd serve` (cluster.grpc_tls)."""
    cert_file: str = Field(description="PEM certificate (chain) the proxies present")
    key_file: str = Field(description="PEM private key of cert_file")


class TracingConfig(_Strict):
    """OpenTelemetry tracing of requests (cluster/tracing.py): off unless enabled; needs herd[tracing]."""
    enabled: bool = Field(False, description="trace every request (ingress, router, replica, engine spans)")
    # unset: OpenTelemetry's OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else localhost.
    otlp_endpoint: Optional[str] = Field(None, description=(
        "OTLP collector, e.g. http://otel-collector:4317 (grpc) or http://otel-collector:4318/v1/traces (http); "
        "null: OTEL_EXPORTER_OTLP_ENDPOINT"))
    protocol: Literal["grpc", "http"] = Field("grpc", description="OTLP transport")
    insecure: bool = Field(True, description="gRPC export without TLS (a collector on the cluster's network)")
    service_name: str = Field("herd", description="service.name of herd's spans")
    sample_ratio: float = Field(1.0, ge=0, le=1, description=(
        "fraction of the traces herd starts that are kept (a client's sampled flag is kept)"))


class RouterConfig(_Strict):
    """Prefix-cache router options (cluster/routing.py); per-model `router` overrides these."""
    load_imbalance_margin: float = Field(8, ge=0, description=(
        "queued requests a prefix-holding replica may lead the least loaded by"))
    min_match_blocks: int = Field(1, ge=1, description="fewest matching KV blocks that count as a prefix hit")
    min_match_fraction: float = Field(0.5, ge=0, le=1, description=(
        "least fraction of a prompt its best match must cover for affinity; below it, placed by load"))
    max_hashes_per_replica: int = Field(16384, ge=1, description="block hashes the router remembers per replica")
    max_prefix_blocks: int = Field(2048, ge=1, description="longest prefix (in blocks) the router hashes")
    kv_saturated_free_fraction: float = Field(0.05, ge=0, le=1, description=(
        "a replica with waiting sequences and less than this fraction of KV blocks free is saturated"))
    max_filter_bytes: int = Field(4 << 20, ge=1024, description="largest Bloom-filter routing report a router accepts")
    routing_stats_period_s: float = Field(2.0, gt=0, description="seconds between replica routing-stat reports")
    unavailable_ttl_s: float = Field(unavailable_replicas.DEFAULT_TTL_S, ge=0, le=unavailable_replicas.MAX_TTL_S,
                                     description=(
        "seconds a replica found unavailable (its stream broke, its engine is down) is left out of routing "
        "while others remain, so a retry goes elsewhere (0: off)"))


# The engine's own default batch size; the serving defaults derive from it.
DEFAULT_MAX_NUM_SEQS: int = EngineConfig.model_fields["max_num_seqs"].default
# Ingress slots kept beyond the models' capacity, for unary calls (Tokenize, ListModels, Health.Check).
INGRESS_UNARY_HEADROOM = 64
# Model-replica slots beyond what its engine holds: calls such as model_info() and stats() also take a Serve
# slot, and must still reach a full replica. A generation that lands in them is refused by the engine's full
# queue at once (RESOURCE_EXHAUSTED), so they never make anyone wait.
REPLICA_CONTROL_HEADROOM = 4


def _engine_settings() -> type[_Strict]:
    """Every workers.EngineConfig field as an optional key of the same name, type, bounds and description;
    unset (None) keeps the engine's default. ModelDeploymentConfig derives from it, so a new engine setting is
    a cluster-YAML key, a chart-schema key and a `herd serve` flag without an edit here."""
    fields: dict[str, Any] = {}
    for name, f in EngineConfig.model_fields.items():
        annotation: Any = Optional[f.annotation]
        if f.metadata:
            annotation = Annotated[(annotation, *f.metadata)]
        fields[name] = (annotation, Field(None, description=f.description))
    return create_model("EngineSettings", __base__=_Strict, **fields)


EngineSettings = _engine_settings()


class ModelDeploymentConfig(EngineSettings):
    """One served model: its checkpoint and layout, Serve's knobs, and every engine setting (EngineSettings:
    `max_num_seqs`, `max_model_len`, `block_size`, ... as workers.EngineConfig declares them)."""
    # The pattern is for the chart's schema; _dns_safe checks it here with a message that says what is allowed.
    name: str = Field(json_schema_extra={"pattern": _DNS_NAME.pattern},
                      description="model name clients ask for (DNS-safe; the deployment is model-<name>)")
    path: str = Field(description="checkpoint folder (Hugging Face layout)")
    tensor_parallel_size: int = Field(1, ge=1, description="shards per pipeline stage (TP)")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages (PP)")
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed replica count (or use autoscaling_config)")
    autoscaling_config: Optional[AutoscalingConfig] = Field(None, description=(
        "Ray Serve autoscaling_config of the model (instead of num_replicas)"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "compute dtype (auto: the checkpoint's on GPU, float32 on CPU)"))
    # Engine settings whose serving default differs from the engine's:
    placement_strategy: PlacementStrategy = Field(
        EngineConfig.model_fields["placement_strategy"].default,
        description=EngineConfig.model_fields["placement_strategy"].description)
    resources_per_shard: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=default_resources_per_shard, json_schema_extra={"minProperties": 1}, description=(
            "Ray resources of one shard, e.g. {GPU: 1} or {CPU: 0.5} (default: {GPU: 1} where CUDA is, else {CPU: 1})"))
    # Capacity of one replica (docs/serving.md, "Capacity"): `max_num_seqs` run in the engine's batch,
    # `max_queued_requests` more wait in its scheduler; Serve sends a replica at most `max_ongoing_requests`
    # (default: the two together plus REPLICA_CONTROL_HEADROOM), and a caller holds at most
    # `serve_max_queued_requests` more while every replica is full (e.g. while autoscaling starts one); past
    # that the client gets RESOURCE_EXHAUSTED at once. A served engine's queue is always finite.
    max_queued_requests: Optional[int] = Field(None, ge=0, description=(
        "requests waiting in the engine's scheduler, a request of n completions counting n (null = max_num_seqs)"))
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description=(
        "requests Serve sends one replica (null = max_num_seqs + max_queued_requests + 4)"))
    serve_max_queued_requests: Optional[int] = Field(None, ge=1, description=(
        "requests a caller holds while every replica is full (null = max_queued_requests, at least 1: "
        "Serve's minimum)"))
    # Streaming under load (workers/stream_pacing.py, whose defaults these are).
    stream_max_messages_per_s: float = Field(StreamPacing.max_messages_per_s, ge=0, description=(
        "messages per second a replica streams in all before it batches each stream's tokens (0 = every step's)"))
    stream_max_interval_s: float = Field(StreamPacing.max_interval_s, gt=0, le=5, description=(
        "longest a stream's tokens wait for their batch"))
    # The step loop in a process of its own (workers/engine_process.py): the replica's serving threads then
    # do not share its GIL. Whole-model replicas only; a TP x PP group's driver stays in the replica.
    engine_process: bool = Field(True, description=(
        "run a whole-model replica's engine in a process of its own (TP x PP groups: always in the replica)"))
    # Dedicated cores for that process on a CPU host (workers/cpu_affinity.py): the serving path's bursts then
    # stop taking the engine's core (docs/serving.md, "Dedicated engine cores").
    engine_cpu_cores: Optional[str] = Field(None, description=(
        "CPUs the engine process runs on, as a cpu list (\"1\", \"2-7\", \"0,4-5\"); null = wherever the OS "
        "puts it. Whole-model replicas with engine_process only"))
    # Serve deployment knobs
    graceful_shutdown_timeout_s: float = Field(60.0, ge=0, description=(
        "seconds a replica being stopped has to finish its streams"))
    # Serve's rolling update (a redeploy, a reload, a KubeRay config change) stops old replicas before it
    # starts new ones unless it may surge: with one replica the model then has none taking requests while the
    # new one loads. A surge needs room for the extra replicas; without it the update waits and the old
    # replicas keep serving (docs/operations.md, "Reloading the config").
    max_surge_percent: int = Field(0, ge=0, le=100, description=(
        "extra replicas, as a percentage of the model's replicas (rounded up), that a rolling update starts "
        "before it stops old ones (0 = stop first, Serve's default; 100 = a whole new set first)"))
    health_check_period_s: float = Field(10.0, gt=0, description="seconds between Serve's replica health checks")
    health_check_timeout_s: float = Field(30.0, gt=0, description=(
        "seconds a health check may take before the replica counts as unhealthy"))
    router: Optional[RouterConfig] = Field(None, description=(
        "prefix-cache router options (default: the cluster's router section)"))

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
        return v

    @field_validator("engine_cpu_cores")
    @classmethod
    def _cpu_list(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from workers.cpu_affinity import parse_cpu_list
            parse_cpu_list(v)  # ValueError names the malformed part
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "ModelDeploymentConfig":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.engine_cpu_cores is not None and (self.num_shards > 1 or not self.engine_process):
            raise ValueError("engine_cpu_cores pins the engine process of a whole-model replica: it needs "
                             "engine_process true and tensor_parallel_size x pipeline_parallel_size = 1")
        if self.pp_layer_partition is not None and len(self.pp_layer_partition) != self.pipeline_parallel_size:
            raise ValueError("pp_layer_partition needs one entry per pipeline stage")
        return self

    @property
    def num_shards(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    # ---- capacity (explicit values win; the rest derive from max_num_seqs) -----------------------------
    @property
    def effective_max_num_seqs(self) -> int:
        return self.max_num_seqs or DEFAULT_MAX_NUM_SEQS

    @property
    def effective_max_queued_requests(self) -> int:
        return self.max_queued_requests if self.max_queued_requests is not None else self.effective_max_num_seqs

    @property
    def effective_max_ongoing_requests(self) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.effective_max_num_seqs + self.effective_max_queued_requests + REPLICA_CONTROL_HEADROOM

    @property
    def effective_serve_max_queued_requests(self) -> int:
        if self.serve_max_queued_requests is not None:
            return self.serve_max_queued_requests
        return max(1, self.effective_max_queued_requests)

    @property
    def max_replicas(self) -> int:
        return self.autoscaling_config.max_replicas if self.autoscaling_config else (self.num_replicas or 1)

    @property
    def capacity(self) -> int:
        """Requests this model holds at once at full scale: in its replicas plus those a caller queues."""
        return self.max_replicas * self.effective_max_ongoing_requests + self.effective_serve_max_queued_requests

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for workers.Engine.from_pretrained beyond path/TP/PP/dtype: every engine setting
        that is set (max_num_seqs and max_queued_requests always, so the engine's queue is finite when it
        serves)."""
        args = {k: getattr(self, k) for k in EngineConfig.model_fields if getattr(self, k) is not None}
        args["max_num_seqs"] = self.effective_max_num_seqs
        args["max_queued_requests"] = self.effective_max_queued_requests
        args["resources_per_shard"] = dict(self.resources_per_shard)
        return args

    @property
    def router_kwargs(self) -> dict[str, Any]:
        return self.router.model_dump(exclude={"routing_stats_period_s"}) if self.router else {}

    @property
    def routing_stats_period_s(self) -> float:
        return (self.router or RouterConfig()).routing_stats_period_s


class ClusterConfig(_Strict):
    host: str = Field("127.0.0.1", description="gRPC / HTTP bind address (loopback unless set)")
    grpc_port: int = Field(9000, ge=1, le=65535, description="Serve gRPC proxy port")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP proxy port")
    api_keys: list[str] = Field(default_factory=list, repr=False, description="accepted API keys (empty = no auth)")
    api_keys_file: Optional[str] = Field(None, description="file with one API key per line (a mounted Secret)")
    # Serving on a non-loopback host with no API keys is refused unless this says it is meant.
    allow_unauthenticated: bool = Field(False, description="serve without API keys on a non-loopback host")
    tls: Optional[TLSConfig] = None
    # Finite, so nothing waits forever.
    request_timeout_s: float = Field(600.0, gt=0, description=(
        "end-to-end limit of one request (a stream included) at the Serve proxies, seconds"))
    # Ingress (gRPC + HTTP front): fixed replicas or autoscaled; each replica takes every model's capacity
    # plus headroom unless `ingress_max_ongoing_requests` says otherwise (docs/serving.md, "Capacity").
    ingress_replicas: int = Field(1, ge=1, description="ingress replicas (or ingress_autoscaling)")
    ingress_autoscaling: Optional[AutoscalingConfig] = Field(None, description=(
        "Serve autoscaling_config of the ingress deployment (instead of ingress_replicas)"))
    ingress_max_ongoing_requests: Optional[int] = Field(None, ge=1, description=(
        "max_ongoing_requests of an ingress replica (null = every model's capacity + health watchers + headroom)"))
    ingress_max_queued_requests: int = Field(64, ge=1, description=(
        "requests a proxy holds for the ingress while every ingress replica is full"))
    ingress_max_surge_percent: int = Field(100, ge=0, le=100, description=(
        "extra ingress replicas, as a percentage (rounded up), a rolling update starts before it stops old ones"))
    # How Serve carries a request and its streamed chunks between herd's processes (docs/serving.md, "Serve
    # transport"): Serve's direct gRPC between its proxy and replicas costs the serving path less CPU per
    # message than Ray actor calls through the object store (Serve's default).
    serve_transport: Literal["grpc", "ray"] = Field(DEFAULT_SERVE_TRANSPORT, description=(
        "proxy -> ingress -> model replica hops: grpc (Serve's inter-deployment gRPC, RAY_SERVE_PROXY_USE_GRPC) "
        "or ray (Ray actor calls, Serve's default)"))
    # Engine processes on cores of their own on a CPU host, when herd starts its own Ray (cluster/cpu_binding.py).
    cpu_binding: Literal["auto", "off"] = Field(DEFAULT_CPU_BINDING, description=(
        "local herd serve on a CPU host: auto gives each single-replica CPU engine process cores of its own and "
        "the serving path the rest (keeping cpu_binding_serving_cpus); off leaves them to the OS (joined "
        "clusters: not applied)"))
    cpu_binding_serving_cpus: int = Field(DEFAULT_SERVING_CPUS, ge=1, description=(
        "CPUs cpu_binding leaves to the serving path (Ray, Serve's proxy, the ingress, the replicas) at the least"))
    enable_reflection: bool = Field(False, description="gRPC server reflection (grpcurl without the .proto)")
    enable_openapi_docs: bool = Field(False, description="/docs, /redoc and /openapi.json on the HTTP port")
    prefix_cache_isolation: Literal["none", "per_key"] = Field("none", description=(
        "per_key: one API key's requests never reuse (or detect) blocks another key's requests cached"))
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description=(
        "bounds on what one request may ask for (ClusterConfig limits)"))
    router: RouterConfig = Field(default_factory=RouterConfig, description=(
        "prefix-cache router options (ClusterConfig router)"))
    tracing: TracingConfig = Field(default_factory=TracingConfig, description=(
        "OpenTelemetry tracing of requests (off unless enabled; needs herd[tracing])"))
    models: list[ModelDeploymentConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterConfig":
        if self.api_keys and self.api_keys_file:
            raise ValueError("set api_keys or api_keys_file, not both")
        if not (self.api_keys or self.api_keys_file) and not is_loopback(self.host) \
                and not self.allow_unauthenticated:
            raise ValueError(f"host {self.host!r} is reachable from other machines and no api_keys are set; "
                             "set api_keys / api_keys_file, or allow_unauthenticated: true if that is meant")
        if self.ingress_autoscaling is not None and self.ingress_replicas != 1:
            raise ValueError("set ingress_replicas or ingress_autoscaling, not both")
        if self.prefix_cache_isolation == "per_key" and not (self.api_keys or self.api_keys_file):
            raise ValueError("prefix_cache_isolation: per_key needs api_keys or api_keys_file")
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

    @property
    def effective_ingress_max_ongoing_requests(self) -> int:
        """Every model's full capacity, the Health.Watch streams and headroom for unary calls: an ingress
        replica never makes a request wait that a model could take (and never hides load from autoscaling)."""
        if self.ingress_max_ongoing_requests is not None:
            return self.ingress_max_ongoing_requests
        return sum(m.capacity for m in self.models) + self.limits.max_health_watchers + INGRESS_UNARY_HEADROOM

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


def is_loopback(host: str) -> bool:
    """Is `host` a loopback address or name (127.0.0.0/8, ::1, localhost)?"""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
