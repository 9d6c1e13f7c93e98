"""The committed gRPC stubs match proto/herd/v1/inference.proto, and the API's wire conventions hold."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "cluster" / "pb"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path):
    # Exactly what `make proto` runs, into a temporary folder; then byte-for-byte comparison.
    subprocess.run([sys.executable, "-m", "proto.build", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    for name in GENERATED:
        fresh, committed = (tmp_path / name).read_bytes(), (STUBS / name).read_bytes()
        assert fresh == committed, f"cluster/pb/{name} is stale: run `make proto` and commit the result"


def test_descriptor_names():
    from cluster.pb import inference_pb2 as pb

    assert pb.DESCRIPTOR.package == "herd.v1"
    assert pb.DESCRIPTOR.name == "herd/v1/inference.proto"
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Chat": ("ChatRequest", "GenerateResponse", True),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "ListModels": ("ListModelsRequest", "ListModelsResponse", False),
    }


def test_sampling_fields_mirror_workers_sampling_params():
    from dataclasses import fields as dataclass_fields

    from cluster.pb import inference_pb2 as pb
    from workers import SamplingParams

    proto_fields = {f.name: f for f in pb.SamplingParams.DESCRIPTOR.fields}
    assert set(proto_fields) == {f.name for f in dataclass_fields(SamplingParams)}
    # Scalars are proto3 `optional`: unset is distinguishable from zero (lists, maps and messages need not be).
    for f in proto_fields.values():
        if not f.is_repeated and f.message_type is None:
            assert f.has_presence, f.name


def test_unset_sampling_is_not_zero():
    from cluster.pb import inference_pb2 as pb

    msg = pb.GenerateRequest.FromString(pb.GenerateRequest(model="m", text="hi").SerializeToString())
    assert not msg.sampling.HasField("temperature")
    msg = pb.GenerateRequest(model="m", text="hi", sampling=pb.SamplingParams(temperature=0.0))
    msg = pb.GenerateRequest.FromString(msg.SerializeToString())
    assert msg.sampling.HasField("temperature") and msg.sampling.temperature == 0.0


def test_prompt_is_a_oneof():
    from cluster.pb import inference_pb2 as pb

    req = pb.GenerateRequest(model="m", text="hello")
    req.token_ids.ids.extend([1, 2, 3])
    assert req.WhichOneof("prompt") == "token_ids" and req.text == ""


@pytest.mark.parametrize("name", ["add_InferenceServicer_to_server", "InferenceStub", "InferenceServicer"])
def test_grpc_module_exports(name):
    from cluster.pb import inference_pb2_grpc

    assert hasattr(inference_pb2_grpc, name)
