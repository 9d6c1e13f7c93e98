"""TLS on a local herd serve's gRPC port (cluster.grpc_tls): the checks before and after start-up, the worker
set-up hook that turns only Serve's gRPC port into a TLS one, and the client's TLS flags. A real herd serve
with TLS is tests/test_serve_startup.py's start-up test."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import grpc
import pytest

from cluster.cli import main as herd_main
from cluster.client import HerdClient
from cluster.grpc_tls import CERT_ENV, KEY_ENV, tls_file_problems, tls_problem
from tests.serve_fixtures import free_port
from tests.tls_certs import write_self_signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = write_self_signed(folder)
    other_cert, other_key = write_self_signed(folder, "other")
    return SimpleNamespace(cert=cert, key=key, other_key=other_key, folder=folder)


def _tls(cert, key):
    return SimpleNamespace(cert_file=str(cert), key_file=str(key))


def test_certificate_and_key_are_checked_before_start_up(certs):
    assert tls_file_problems(None) == []
    assert tls_file_problems(_tls(certs.cert, certs.key)) == []
    missing = tls_file_problems(_tls(certs.folder / "nope.crt", certs.folder / "nope.key"))
    assert [p.split()[0] for p in missing] == ["tls.cert_file", "tls.key_file"]
    assert all("No such file" in p for p in missing), missing
    (certs.folder / "junk.pem").write_text("not a certificate\n")
    [junk] = tls_file_problems(_tls(certs.folder / "junk.pem", certs.key))
    assert junk.startswith("tls: ") and "not a PEM certificate and its unencrypted private" in junk
    [mismatch] = tls_file_problems(_tls(certs.cert, certs.other_key))   # a key of another certificate
    assert "KEY_VALUES_MISMATCH" in mismatch or "mismatch" in mismatch.lower(), mismatch
    # An encrypted key (grpc cannot use one) is a problem, not a password prompt on the terminal.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    encrypted = certs.folder / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    [locked] = tls_file_problems(_tls(certs.cert, encrypted))
    assert "unencrypted private key" in locked, locked


def _health_server(port: int, credentials=None) -> grpc.Server:
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    if credentials is None:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    return server


def test_the_check_after_start_up_tells_tls_from_plaintext(certs):
    credentials = grpc.ssl_server_credentials([(certs.key.read_bytes(), certs.cert.read_bytes())])
    tls_port, plain_port, closed_port = free_port(), free_port(), free_port()
    servers = [_health_server(tls_port, credentials), _health_server(plain_port)]
    try:
        assert tls_problem("127.0.0.1", tls_port) is None
        assert tls_problem("0.0.0.0", tls_port) is None   # a wildcard host is checked on loopback
        plain = tls_problem("127.0.0.1", plain_port)
        assert plain is not None and plain.startswith(f"port {plain_port} "), plain
        refused = tls_problem("127.0.0.1", closed_port, timeout_s=0.5)
        assert refused is not None and "refused" in refused.lower(), refused
    finally:
        for server in servers:
            server.stop(None)


def test_client_flags_connect_over_tls(certs, capsys):
    credentials = grpc.ssl_server_credentials([(certs.key.read_bytes(), certs.cert.read_bytes())])
    port = free_port()
    server = _health_server(port, credentials)
    try:
        with HerdClient(f"127.0.0.1:{port}", tls_ca_file=str(certs.cert)) as client:
            assert client.health(timeout=10) == "SERVING"
        with HerdClient(f"localhost:{port}", tls_ca_file=str(certs.cert)) as client:
            assert client.health(timeout=10) == "SERVING"
        with HerdClient(f"127.0.0.1:{port}") as plaintext, pytest.raises(grpc.RpcError) as refused:
            plaintext.health(timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # --tls alone trusts the system's roots, which do not hold this self-signed certificate.
        with HerdClient(f"127.0.0.1:{port}", tls=True) as untrusted, pytest.raises(grpc.RpcError) as bad:
            untrusted.health(timeout=10)
        assert bad.value.code() == grpc.StatusCode.UNAVAILABLE
        capsys.readouterr()
        assert herd_main(["client", "health", "--address", f"127.0.0.1:{port}", "--tls-ca", str(certs.cert)]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        assert herd_main(["client", "health", "--address", f"127.0.0.1:{port}", "--tls-ca",
                          str(certs.folder / "missing.pem")]) == 1
        err = capsys.readouterr().err
        assert "missing.pem" in err and "Traceback" not in err, err
    finally:
        server.stop(None)


_HOOKED_SERVER = textwrap.dedent("""
    import asyncio, sys
    from cluster.local_ray import _worker_setup_hook
    _worker_setup_hook()
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    async def main():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        for port in sys.argv[1:]:
            server.add_insecure_port(f"[::]:{port}")   # as Serve's proxy and replicas do
        await server.start()
        print("serving", flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
""")


def _hooked_server(env: dict, *ports: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOOKED_SERVER, *map(str, ports)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_set_up_hook_makes_only_the_serve_grpc_port_tls(certs):
    serve_port, other_port = free_port(), free_port()
    env = {**os.environ, "HERD_LOCAL_RAY_BIND": "127.0.0.1", "HERD_SERVE_GRPC_HOST": "127.0.0.1",
           "HERD_SERVE_GRPC_PORT": str(serve_port), CERT_ENV: str(certs.cert), KEY_ENV: str(certs.key)}
    proc = _hooked_server(env, serve_port, other_port)
    try:
        assert proc.stdout.readline().strip() == "serving", proc.stderr.read()
        assert tls_problem("127.0.0.1", serve_port) is None
        with HerdClient(f"127.0.0.1:{serve_port}", tls_ca_file=str(certs.cert)) as client:
            assert client.health(timeout=10) == "SERVING"
        assert tls_problem("127.0.0.1", other_port) is not None   # a replica's own server: as Serve made it
        with HerdClient(f"127.0.0.1:{other_port}") as client:
            assert client.health(timeout=10) == "SERVING"
    finally:
        proc.kill()
        proc.communicate()


def test_an_unreadable_certificate_stops_the_proxy_instead_of_serving_plaintext(certs):
    port = free_port()
    env = {**os.environ, "HERD_LOCAL_RAY_BIND": "127.0.0.1", "HERD_SERVE_GRPC_PORT": str(port),
           CERT_ENV: str(certs.cert), KEY_ENV: str(certs.folder / "gone.key")}
    proc = _hooked_server(env, port)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "serving" not in out
    assert "gone.key" in err


def test_herd_serve_stops_when_the_grpc_port_answers_in_plaintext(certs):
    """The hook works on Serve's internals; should a Ray upgrade bypass it, herd serve finds the port plaintext
    after start-up and says so (cmd_serve then stops, exit 1) instead of serving keys in the clear."""
    from cluster.config import ClusterConfig
    from cluster.serve_cli import _grpc_tls_problems

    port = free_port()
    cfg = ClusterConfig.from_dict({"models": [{"name": "m", "path": "/m"}], "grpc_port": port,
                                   "tls": {"cert_file": str(certs.cert), "key_file": str(certs.key)}})
    server = _health_server(port)
    try:
        [problem] = _grpc_tls_problems(cfg)
        assert problem.startswith(f"tls is configured, but the gRPC proxy's port {port} ") and "plaintext" in problem
        assert _grpc_tls_problems(cfg.model_copy(update={"tls": None})) == []
    finally:
        server.stop(None)


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(certs, tmp_path, monkeypatch, caplog):
    """cert-manager renews a Secret's files in place: the proxy serves the new certificate from the next
    connection on. A half-written change (a certificate whose key has not arrived) keeps the old one."""
    import logging
    import shutil

    from cluster.grpc_tls import server_credentials_from_env

    renewed_cert, renewed_key = write_self_signed(tmp_path, "renewed")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(certs.cert, cert)
    shutil.copy(certs.key, key)

    def replace(path, source):   # as Kubernetes and cert-manager do: a new file moved into place
        shutil.copy(source, f"{path}.new")
        os.replace(f"{path}.new", path)

    def health(ca) -> str:
        with HerdClient(f"127.0.0.1:{port}", tls_ca_file=str(ca)) as client:
            try:
                return client.health(timeout=10)
            except grpc.RpcError as e:
                return e.code().name

    monkeypatch.setenv(CERT_ENV, str(cert))
    monkeypatch.setenv(KEY_ENV, str(key))
    port = free_port()
    server = _health_server(port, server_credentials_from_env())
    try:
        assert health(certs.cert) == "SERVING"
        replace(cert, renewed_cert)                      # the certificate first, its key not yet
        with caplog.at_level(logging.WARNING, logger="herd.tls"):
            assert health(certs.cert) == "SERVING"       # still the old pair
            assert health(certs.cert) == "SERVING"
        assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1   # said once
        assert "do not load as a pair" in caplog.records[0].getMessage()
        replace(key, renewed_key)
        assert health(renewed_cert) == "SERVING"         # the renewed pair, no restart
        assert health(certs.cert) == "UNAVAILABLE"       # the old certificate is no longer what it presents
    finally:
        server.stop(None)
