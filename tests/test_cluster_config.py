"""ClusterConfig: good configs load; each bad key is named by its path; secrets never printed."""
import pytest

from cluster.config import ClusterConfig, ConfigError

GOOD = {
    "grpc_port": 9000, "http_port": 8000, "host": "127.0.0.1", "api_keys": ["s3cret-key"],
    "models": [
        {"name": "llama-70b", "path": "/models/Llama-2-70b-hf", "tensor_parallel_size": 4,
         "pipeline_parallel_size": 2, "resources_per_shard": {"GPU": 1}, "num_replicas": 1, "dtype": "bfloat16",
         "max_num_seqs": 64, "max_model_len": 4096},
        {"name": "llama-1b", "path": "/models/Llama-3.2-1B-Instruct",
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 8}},
    ],
}


def test_the_documented_example_loads_and_round_trips(tmp_path):
    cfg = ClusterConfig.from_dict(GOOD)
    assert cfg.models[0].num_shards == 8
    assert cfg.models[0].engine_args()["max_model_len"] == 4096
    assert "max_model_len" not in cfg.models[1].engine_args()  # unset keys keep engine defaults
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(GOOD))
    assert ClusterConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["models"][0].update(tensor_parallel_size=0), "models[0].tensor_parallel_size"),
    (lambda c: c["models"][1].update(flavour="x"), "models[1].flavour: unknown key"),
    (lambda c: c.update(grpc_port=70000), "grpc_port"),
    (lambda c: c["models"][1].update(name="Llama_1B"), "models[1].name"),
    (lambda c: c["models"][0].update(autoscaling_config={"max_replicas": 2}), "models[0]: set num_replicas or"),
    (lambda c: c["models"][1]["autoscaling_config"].update(min_replicas=9), "max_replicas (8) must be >= min_replicas"),
    (lambda c: c["models"][1]["autoscaling_config"].update(metrics_interval_s=10),
     "look_back_period_s (10.0) must be greater than metrics_interval_s (10.0)"),
    (lambda c: c.update(api_keys_file="/k"), "set api_keys or api_keys_file"),
    (lambda c: c["models"].append(dict(c["models"][1])), "model names must be unique"),
    (lambda c: c["models"][0].update(dtype="int4"), "models[0].dtype"),
])
def test_bad_keys_are_named(mutate, expected):
    import copy
    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        ClusterConfig.from_dict(data)
    assert expected in str(e.value)


def test_api_keys_are_never_printed(tmp_path):
    cfg = ClusterConfig.from_dict(GOOD)
    assert "s3cret-key" not in repr(cfg) and "s3cret-key" not in str(cfg)
    keyfile = tmp_path / "keys"
    keyfile.write_text("# operators\nk1\n\nk2\n")
    data = {**GOOD, "api_keys": [], "api_keys_file": str(keyfile)}
    assert ClusterConfig.from_dict(data).resolved_api_keys() == ["k1", "k2"]


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        ClusterConfig.from_yaml(bad)


# ---- the typed contracts that cross a Ray hop ---------------------------------------------------------------
def test_model_spec_is_plain_typed_data_with_every_engine_setting():
    import pickle

    from cluster.app import model_spec, served_model
    from cluster.deployment import ModelSpec, ServedModel

    cfg = ClusterConfig.from_dict({"models": [{"name": "m", "path": "/models/m", "resources_per_shard": {"CPU": 1},
                                               "tensor_parallel_size": 2, "collective_timeout_s": 9.0,
                                               "autoscaling_config": {"max_replicas": 2}}]})
    model = cfg.models[0]
    spec = model_spec(model, tracing=cfg.tracing.model_dump())
    assert isinstance(spec, ModelSpec) and pickle.loads(pickle.dumps(spec)) == spec
    assert spec.engine_args == model.engine_args() and spec.engine_args["collective_timeout_s"] == 9.0
    assert spec.tensor_parallel_size == 2 and spec.tracing == cfg.tracing.model_dump()
    served = served_model(model)
    assert set(served) == set(ServedModel.__annotations__)
    assert served["deployment"] == "model-m" and served["autoscaling"] is True


def test_replica_stats_and_routing_report_keys_are_declared():
    from dataclasses import fields

    from cluster.deployment import ReplicaStats
    from cluster.routing import RoutingReport, routing_stats
    from workers.engine import EngineStats

    assert set(ReplicaStats.__annotations__) == {f.name for f in fields(EngineStats)} | {"replica_id"}

    class Engine:   # what routing_stats reads of an AsyncEngine
        block_size = 16

        def stats(self):
            return EngineStats(1, 2, 100, 40, 0, 0, 0, 0)

        def cached_block_hashes(self):
            return [11, 12, 13]

    report = routing_stats(Engine(), max_hashes=2)
    assert set(report) <= set(RoutingReport.__annotations__)
    assert RoutingReport.__required_keys__ <= set(report)
    assert report["hashes"] == [11, 12] and report["num_cached_blocks"] == 3 and report["kv_blocks_free"] == 40


def test_serve_transport_values_are_the_ones_local_ray_and_the_bench_offer():
    """The config's Literal, cluster.local_ray's SERVE_TRANSPORTS (the bench's choices) and the default agree."""
    import typing

    from cluster.local_ray import DEFAULT_SERVE_TRANSPORT, SERVE_TRANSPORTS

    field = ClusterConfig.model_fields["serve_transport"]
    assert typing.get_args(field.annotation) == SERVE_TRANSPORTS and field.default == DEFAULT_SERVE_TRANSPORT
    with pytest.raises(ConfigError):
        ClusterConfig.from_dict({**GOOD, "serve_transport": "carrier-pigeon"})
