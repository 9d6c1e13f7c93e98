"""The `herd` CLI: demo checkpoints and in-process generation / chat, as an operator runs them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from workers import Engine, SamplingParams
from workers.config import ModelConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    for shape in ("llama2-70b-mini", "llama32-1b-mini"):
        assert main(["demo-checkpoint", str(root / shape), "--shape", shape]) == 0
    return root


def test_demo_checkpoints_have_the_real_layout_and_tokenizers(demo):
    l2 = ModelConfig.from_pretrained(demo / "llama2-70b-mini")
    assert l2.num_key_value_heads < l2.num_attention_heads and not l2.tie_word_embeddings
    l3 = ModelConfig.from_pretrained(demo / "llama32-1b-mini")
    assert l3.tie_word_embeddings and l3.rope.rope_type == "llama3" and l3.vocab_size == 128256
    assert json.loads((demo / "llama32-1b-mini" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    eng = Engine.from_pretrained(demo / "llama32-1b-mini", show_progress=False)
    try:
        assert eng.tokenizer.kind == "tiktoken"
        out = eng.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
        assert len(out.token_ids) == 5 and out.text == eng.tokenizer.decode(out.token_ids)
    finally:
        eng.shutdown()


def test_generate_command(demo, capsys):
    rc = main(["generate", "--model", str(demo / "llama2-70b-mini"), "--prompt", "Hello world",
               "--max-tokens", "6", "--ignore-eos"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "finish_reason=length tokens=6" in err


def test_chat_command_streams_a_reply(demo):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "chat", "--model", str(demo / "llama32-1b-mini"),
                           "--max-tokens", "4", "--ignore-eos"], input="Hi there\n\n", capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "assistant> " in proc.stdout


def test_generate_takes_engine_settings_as_flags(demo, capsys):
    # Every EngineConfig field is a flag; these change how the engine batches, not what greedy decoding gives.
    base = ["generate", "--model", str(demo / "llama32-1b-mini"), "--prompt", "Hello world", "--max-tokens", "5",
            "--ignore-eos"]
    assert main([*base, "--max-num-batched-tokens", "3", "--no-enable-prefix-caching", "--block-size", "8",
                 "--max-model-len", "64", "--no-show-progress"]) == 0
    out = capsys.readouterr()
    assert "finish_reason=length tokens=5" in out.err
    assert main(base) == 0               # the engine's defaults give the same greedy text
    assert capsys.readouterr().out == out.out
    # a bad value is refused by EngineConfig, naming the setting
    assert main(["generate", "--model", str(demo / "llama32-1b-mini"), "--prompt", "x", "--block-size", "0"]) == 2
    assert "block_size: " in capsys.readouterr().err


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    assert rc == 2
    assert "no config.json" in capsys.readouterr().err


def test_herd_serve_flags_override_capacity_and_cluster_keys():
    from cluster.cli import build_parser
    from cluster.config import ClusterConfig, ConfigError
    from cluster.serve_cli import apply_overrides

    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b"}]})
    args = build_parser().parse_args(["serve", "--ingress-replicas", "2", "--request-timeout-s", "30",
                                      "--max-num-seqs", "16", "--serve-max-queued-requests", "8"])
    out = apply_overrides(cfg, args)
    assert (out.ingress_replicas, out.request_timeout_s) == (2, 30.0)
    assert [m.effective_max_num_seqs for m in out.models] == [16, 16]
    assert [m.effective_serve_max_queued_requests for m in out.models] == [8, 8]
    assert apply_overrides(cfg, build_parser().parse_args(["serve"])) is cfg
    with pytest.raises(ConfigError, match="max_num_seqs"):
        apply_overrides(cfg, build_parser().parse_args(["serve", "--max-num-seqs", "0"]))


@pytest.mark.parametrize("model, says", [
    ({"path": "/no/such/folder"}, "models[0] (m): path /no/such/folder: no such folder"),
    ({"path": "{tmp}"}, "no config.json"),
    ({"path": "{demo}/llama32-1b-mini", "tensor_parallel_size": 3}, "tensor_parallel_size 3 must divide"),
    ({"path": "{demo}/llama32-1b-mini", "pipeline_parallel_size": 9}, "pipeline_parallel_size 9 exceeds"),
    ({"path": "{weightless}"}, "no model.safetensors or model.safetensors.index.json"),
    ({"path": "{pickled}"}, "(found pytorch_model.bin: pickle checkpoints are never loaded; convert to safetensors)"),
])
def test_herd_serve_checks_each_checkpoint_before_starting_ray(demo, tmp_path, capsys, model, says):
    """A wrong path or a layout the model cannot take: one line naming the model, exit 2, and no Ray started
    (it used to surface a minute later as Serve's RuntimeError with a traceback)."""
    import shutil

    import ray

    weightless = tmp_path / "weightless"
    shutil.copytree(demo / "llama32-1b-mini", weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    pickled = tmp_path / "pickled"
    shutil.copytree(weightless, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    model = {k: v.format(tmp=tmp_path, demo=demo, weightless=weightless, pickled=pickled) if isinstance(v, str) else v
             for k, v in model.items()}
    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps({"models": [{"name": "m", **model}]}))
    assert main(["serve", str(config)]) == 2
    err = capsys.readouterr().err
    assert "herd: error: models[0] (m): " in err and says in err, err
    assert not ray.is_initialized()


def test_herd_serve_checks_the_tls_files_before_starting_ray(demo, tmp_path, capsys):
    """A certificate whose key is missing or belongs to another certificate: what the proxies would fail on
    after Ray had started, said first (exit 2, no Ray)."""
    import ray

    from tests.tls_certs import write_self_signed

    cert, _ = write_self_signed(tmp_path)
    _, other_key = write_self_signed(tmp_path, "other")
    config = tmp_path / "cluster.yaml"
    for key, says in ((tmp_path / "missing.key", f"herd: error: tls.key_file {tmp_path / 'missing.key'}: No such file"),
                      (other_key, "are not a PEM certificate and its unencrypted private")):
        config.write_text(json.dumps({"models": [{"name": "m", "path": str(demo / "llama32-1b-mini")}],
                                      "tls": {"cert_file": str(cert), "key_file": str(key)}}))
        assert main(["serve", str(config)]) == 2
        err = capsys.readouterr().err
        assert says in err, err
        assert not ray.is_initialized()


def test_a_file_the_command_cannot_write_is_one_line_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo-checkpoint", str(blocker / "ckpt"), "--shape", "llama32-1b-mini"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("herd: error: [Errno ") and str(blocker) in err and "Traceback" not in err


@pytest.mark.parametrize("reuse_port", [False, True])
def test_herd_serve_refuses_a_port_another_server_holds_before_starting_ray(demo, tmp_path, capsys, reuse_port):
    """A listener already on the gRPC port (with SO_REUSEPORT, as grpc's own servers bind, a second gRPC proxy
    would bind beside it and share its connections): one line naming the key and address, exit 2, no Ray."""
    import socket

    import ray

    from cluster.preflight import port_problems

    config = tmp_path / "cluster.yaml"
    config.write_text(json.dumps({"models": [{"name": "m", "path": str(demo / "llama32-1b-mini")}]}))
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        assert main(["serve", str(config), "--grpc-port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"herd: error: grpc_port: cannot listen on 127.0.0.1:{port}: in use" in err, err
        assert not ray.is_initialized()
    assert port_problems("127.0.0.1", {"grpc_port": port}) == []   # free again once the holder closed


def _raising(error: BaseException):
    def delete(name: str) -> None:
        raise error
    return delete


@pytest.mark.parametrize("delete, says", [
    (lambda name: None, r"herd: in-flight requests finished in \d+\.\d s"),
    (_raising(KeyboardInterrupt()), r"herd: stopping without waiting"),   # a second Ctrl-C during the drain
    (_raising(RuntimeError("gcs gone")), r"herd: WARNING: could not wait for in-flight requests "
                                         r"\(RuntimeError\('gcs gone'\)\)"),
])
def test_the_drain_at_shutdown_says_how_it_ended(monkeypatch, capsys, delete, says):
    """herd serve's drain deletes the application (its replicas finish their streams); a second Ctrl-C during
    it stops at once, and a failure to wait is said, never raised (the stop goes on). The drain itself is
    tested on a real herd serve in tests/test_serve_startup.py."""
    import re

    from ray import serve

    from cluster.config import ClusterConfig
    from cluster.serve_cli import _drain

    deleted = []
    monkeypatch.setattr(serve, "delete", lambda name: (deleted.append(name), delete(name)))
    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/m", "graceful_shutdown_timeout_s": 5},
                                              {"name": "b", "path": "/m", "graceful_shutdown_timeout_s": 90}]})
    _drain(cfg)
    lines = capsys.readouterr().err.splitlines()
    assert deleted == ["herd"]
    assert lines[0] == "herd: finishing in-flight requests (up to 90 s; Ctrl-C again stops at once) ..."
    assert re.fullmatch(says, lines[1]), lines
