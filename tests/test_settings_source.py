"""Each setting is declared once and every surface derives from it.

- the committed chart values schema is what `make schema` generates from the pydantic models;
- every workers.EngineConfig field is a cluster-YAML key of each model, reaches the engine's arguments, is in
  the chart schema with its bounds, and is a flag of `herd serve` (every model) and `herd generate` / `chat`;
- engine errors name the argument (InvalidRequestError), cluster errors the key's path (ConfigError);
- the sampling flags are workers.SamplingParams' fields, with their types and defaults.
"""
from __future__ import annotations

import argparse
import json
from typing import Literal, Optional

import jsonschema
import pytest
from pydantic import BaseModel, Field, ValidationError

from cluster import schema_gen
from cluster.cli import ENGINE_FLAGS, build_parser
from cluster.client import sampling_flag_fields, sampling_from_args
from cluster.config import ClusterConfig, ConfigError, ModelDeploymentConfig
from cluster.serve_cli import apply_overrides, model_flag_fields
from cluster.settings_flags import add_setting_flags, set_flags, setting_fields
from workers.engine_config import EngineConfig
from workers.errors import InvalidRequestError
from workers.sampling_params import SamplingParams

ENGINE_SETTINGS = sorted(EngineConfig.model_fields)


def _model(**keys) -> dict:
    return {"name": "m", "path": "/models/m", "resources_per_shard": {"CPU": 1}, **keys}


def test_committed_values_schema_is_generated_from_the_models():
    committed = schema_gen.VALUES_SCHEMA.read_text()
    assert committed == schema_gen.render(), "helm/herd/values.schema.json is stale: run `make schema`"
    assert schema_gen.SERVE_DEFAULTS.read_text() == schema_gen.serve_defaults(), \
        "helm/herd/files/serve-defaults.json is stale: run `make schema`"
    assert schema_gen.main(["--check"]) == 0


@pytest.mark.parametrize("name", ENGINE_SETTINGS)
def test_every_engine_setting_reaches_every_surface(name):
    engine_field = EngineConfig.model_fields[name]
    assert engine_field.description, f"EngineConfig.{name} has no description (the schema and --help show it)"
    assert name in ModelDeploymentConfig.model_fields
    chart_key = json.loads(schema_gen.VALUES_SCHEMA.read_text())["properties"]["models"]["items"]["properties"][name]
    for meta in engine_field.metadata:             # EngineConfig's bounds, as the chart refuses them
        for attr, key in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum")):
            if getattr(meta, attr, None) is not None:
                assert chart_key[key] == getattr(meta, attr), (name, chart_key)
    flag = "--" + name.replace("_", "-")
    assert flag in _flags_of(["serve"]) and flag in _flags_of(["generate"]) and flag in _flags_of(["chat"])


def _flags_of(command: list[str]) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command[0]]
    return {opt for action in p._actions for opt in action.option_strings}


def test_kv_cache_dtype_declared_once_is_everywhere():
    """kv_cache_dtype was added as one EngineConfig field (plus its use in the engine) and `make schema`: its
    choices are a cluster key's, the chart's enum and the flags' choices, with no other edit."""
    choices = ["auto", "fp8"]
    cfg = ClusterConfig.from_dict({"models": [_model(kv_cache_dtype="fp8")]})
    assert cfg.models[0].engine_args()["kv_cache_dtype"] == "fp8"
    with pytest.raises(ConfigError, match=r"models\[0\]\.kv_cache_dtype"):
        ClusterConfig.from_dict({"models": [_model(kv_cache_dtype="int4")]})
    chart = json.loads(schema_gen.VALUES_SCHEMA.read_text())["properties"]["models"]["items"]["properties"]
    assert chart["kv_cache_dtype"]["enum"] == choices + [None]
    for command in (["serve"], ["generate", "--model", "/m", "--prompt", "p"]):
        args = build_parser().parse_args([*command, "--kv-cache-dtype", "fp8"])
        assert args.kv_cache_dtype == "fp8"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--kv-cache-dtype", "int4"])


def test_engine_settings_in_a_cluster_yaml_reach_the_engine():
    set_by_yaml = {"num_microbatches": 2, "use_compiled_graph": False, "collective_timeout_s": 5.0,
                   "step_timeout_s": 30.0, "num_gpu_blocks_override": 64, "show_progress": False,
                   "pp_layer_partition": [3, 1]}
    cfg = ClusterConfig.from_dict({"models": [_model(pipeline_parallel_size=2, **set_by_yaml), _model(name="n")]})
    args = cfg.models[0].engine_args()
    engine = EngineConfig.from_kwargs(**args)
    for key, value in set_by_yaml.items():
        assert getattr(engine, key) == value
    # unset keys keep the engine's defaults (they are not passed at all)
    defaults = EngineConfig.from_kwargs(**cfg.models[1].engine_args())
    assert "collective_timeout_s" not in cfg.models[1].engine_args()
    assert defaults.collective_timeout_s == EngineConfig.model_fields["collective_timeout_s"].default


@pytest.mark.parametrize("key, value, message", [
    ("collective_timeout_s", 0, "greater than 0"),
    ("num_microbatches", 0, "greater than or equal to 1"),
    ("block_size", 2048, "less than or equal to 1024"),
    ("placement_strategy", "ANYWHERE", "'PACK'"),
    ("use_compiled_graph", "sometimes", "boolean"),
])
def test_engine_bounds_hold_in_both_places(key, value, message):
    with pytest.raises(ConfigError, match=rf"models\[0\]\.{key}: .*{message}"):
        ClusterConfig.from_dict({"models": [_model(**{key: value})]})
    with pytest.raises(InvalidRequestError) as e:
        EngineConfig.from_kwargs(**{key: value})
    assert e.value.field == key and message in str(e.value)


def test_engine_config_refuses_unknown_arguments_and_loose_types():
    with pytest.raises(InvalidRequestError, match="unknown engine argument") as e:
        EngineConfig.from_kwargs(max_num_seq=4)
    assert e.value.field == "max_num_seq"
    with pytest.raises(InvalidRequestError) as e:   # a bool or a string is not a number here
        EngineConfig(max_num_seqs=True)
    assert e.value.field == "max_num_seqs"
    config = EngineConfig(gpu_memory_utilization=1)  # an int is a float
    assert config.gpu_memory_utilization == 1.0
    with pytest.raises(ValidationError, match="frozen"):   # settings do not change under a running engine
        config.block_size = 32


def test_herd_serve_engine_flags_set_every_model():
    args = build_parser().parse_args([
        "serve", "--collective-timeout-s", "7.5", "--no-enable-prefix-caching", "--resources-per-shard",
        '{"CPU": 0.5}', "--max-num-seqs", "8", "--placement-strategy", "SPREAD"])
    cfg = ClusterConfig.from_dict({"models": [_model(), _model(name="n", pipeline_parallel_size=2)]})
    out = apply_overrides(cfg, args)
    for m in out.models:
        assert m.collective_timeout_s == 7.5 and m.enable_prefix_caching is False and m.max_num_seqs == 8
        assert m.resources_per_shard == {"CPU": 0.5} and m.placement_strategy == "SPREAD"
        assert m.engine_args()["collective_timeout_s"] == 7.5
    # the config validates the result: a partition for two stages does not fit a one-stage model
    with pytest.raises(ConfigError, match=r"models\[0\]: pp_layer_partition needs one entry per pipeline stage"):
        apply_overrides(cfg, build_parser().parse_args(["serve", "--pp-layer-partition", "2", "2"]))
    # the config's own values stay where no flag is given
    assert apply_overrides(cfg, build_parser().parse_args(["serve"])) is cfg


def test_herd_serve_flag_help_shows_the_engine_default():
    by_name = {f.name: f for f in model_flag_fields()}
    assert by_name["max_num_seqs"].default == EngineConfig.model_fields["max_num_seqs"].default
    assert by_name["placement_strategy"].default == "PACK"
    with pytest.raises(SystemExit):     # a bound flag value is refused by the config, naming the key
        build_parser().parse_args(["serve", "--placement-strategy", "ANYWHERE"])


def test_in_process_engine_flags_are_engine_arguments():
    args = build_parser().parse_args(["generate", "--model", "/m", "--prompt", "hi", "--num-microbatches", "2",
                                      "--use-compiled-graph", "--kv-cache-memory", "1048576"])
    kwargs = set_flags(args, ENGINE_FLAGS)
    assert kwargs == {"num_microbatches": 2, "use_compiled_graph": True, "kv_cache_memory": 1 << 20}
    EngineConfig.from_kwargs(**kwargs)


def test_sampling_flags_are_sampling_params_fields():
    from dataclasses import fields

    flags = {f.name: f for f in sampling_flag_fields()}
    params = {f.name: f for f in fields(SamplingParams)}
    assert set(flags) == {n for n, f in params.items() if f.metadata["cli"]}
    assert {"max_tokens", "temperature", "stop", "ignore_eos", "stop_token_ids"} <= set(flags)
    for name, flag in flags.items():
        assert flag.description and flag.default == params[name].default or params[name].default_factory
    args = build_parser().parse_args(["client", "generate", "--model", "m", "--stop", "a", "--stop", "b", "c",
                                      "--top-k", "3", "--ignore-eos", "--stop-token-ids", "7"])
    sampling = sampling_from_args(args)
    assert sampling == {"stop": ["a", "b", "c"], "top_k": 3, "ignore_eos": True, "stop_token_ids": [7]}
    assert SamplingParams(**sampling).stop == ["a", "b", "c"]
    # herd generate's own defaults (greedy, 128 tokens) are what its help shows
    help_text = _subparser("generate").format_help()
    assert "(default: 128)" in help_text and "(default: 0.0)" in help_text


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


class _NewSettings(BaseModel):
    """A stand-in for a model that gains a setting: its flag follows from the field alone."""
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="KV cache element type")
    spill_blocks: Optional[list[int]] = Field(None, description="blocks to spill")
    enable_thing: Optional[bool] = Field(None, description="turn the thing on")


def test_a_new_field_becomes_a_flag_without_an_edit():
    p = argparse.ArgumentParser()
    fields = setting_fields(_NewSettings)
    add_setting_flags(p, fields)
    assert set_flags(p.parse_args([]), fields) == {}
    args = p.parse_args(["--kv-cache-dtype", "fp8", "--spill-blocks", "1", "2", "--no-enable-thing"])
    assert set_flags(args, fields) == {"kv_cache_dtype": "fp8", "spill_blocks": [1, 2], "enable_thing": False}
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "int3"])
    assert "KV cache element type (default: auto)" in p.format_help()


def test_generated_schema_refuses_what_the_engine_refuses():
    schema = schema_gen.values_schema()
    model_schema = schema["properties"]["models"]["items"]
    jsonschema.Draft7Validator(model_schema).validate({"name": "m", "collective_timeout_s": 5, "num_microbatches": 2})
    for bad in ({"name": "m", "collective_timeout_s": 0}, {"name": "m", "use_compiled_graph": "yes"},
                {"name": "m", "num_microbatches": 0}, {"name": "m", "not_a_setting": 1}):
        assert list(jsonschema.Draft7Validator(model_schema).iter_errors(bad)), bad
    assert "$ref" not in json.dumps(schema)
