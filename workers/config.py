"""ModelConfig: the parts of a Hugging Face Llama `config.json` the engine needs.

Both config generations are understood: the classic `rope_theta` + `rope_scaling` keys and the newer
`rope_parameters` dict (transformers >= 5), `head_dim` when present, GQA via `num_key_value_heads`,
`tie_word_embeddings`, and the stored dtype under `torch_dtype` or `dtype`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Names a config or a flag may give -> the dtype's canonical name. Kept as names so that reading a config
# (herd plan, the router, the CLI) does not import torch; parse_dtype makes the torch dtype where one is needed.
_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def dtype_name(value: "str | torch.dtype | None", default: str = "float32") -> str:
    """'bf16' / torch.bfloat16 / None ('auto') -> 'bfloat16' (the canonical name)."""
    if value is None or value == "auto":
        return default
    try:
        return _DTYPE_NAMES[str(value).replace("torch.", "").lower()]
    except KeyError:
        raise CheckpointError(f"dtype: unsupported value {value!r} (use bfloat16, float16 or float32)") from None


def dtype_bytes(value: "str | torch.dtype") -> int:
    """Bytes of one element of a dtype given by name or as a torch dtype."""
    return DTYPE_BYTES[dtype_name(value)]


def parse_dtype(value: "str | torch.dtype | None", default: "torch.dtype | None" = None) -> "torch.dtype":
    """'bfloat16' / torch.bfloat16 / None ('auto') -> torch dtype (default: float32)."""
    import torch

    if value is None or value == "auto":
        return torch.float32 if default is None else default
    return getattr(torch, dtype_name(value))


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    stored_dtype_name: str                  # canonical name (dtype_name) of the checkpoint's torch_dtype
    eos_token_ids: tuple[int, ...] = ()

    @property
    def stored_dtype(self) -> "torch.dtype":
        return parse_dtype(self.stored_dtype_name)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
            raise CheckpointError(f"config.json: model_type {cfg.get('model_type')!r} is not a Llama model")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise CheckpointError(f"config.json: missing required key {key!r}")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError("config.json: attention_bias/mlp_bias are not used by Llama checkpoints herd serves")
        n_heads = int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise CheckpointError(f"config.json: num_attention_heads {n_heads} not a multiple of num_key_value_heads {n_kv}")
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope=_parse_rope(cfg),
            stored_dtype_name=dtype_name(cfg.get("torch_dtype") or cfg.get("dtype")),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face Llama checkpoint folder)")
        try:
            cfg = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
        return cls.from_dict(cfg)

    @property
    def num_params(self) -> int:
        h, i, layers, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        q = h * self.num_attention_heads * self.head_dim
        kv = 2 * h * self.num_key_value_heads * self.head_dim
        per_layer = q + kv + self.num_attention_heads * self.head_dim * h + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + layers * per_layer + h


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 folds rope_theta into rope_parameters; older configs keep rope_scaling separate.
    params = cfg.get("rope_parameters")
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"config.json: rope type {rope_type!r} not supported (supported: {_SUPPORTED_ROPE_TYPES})")
    return RopeConfig(
        theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
