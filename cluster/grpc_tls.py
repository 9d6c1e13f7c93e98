"""TLS on the gRPC front door of a local `herd serve`, and the checks that keep it from silently being plaintext.

Serve 2.60's gRPC proxy only ever listens in plaintext (grpc_util.start_grpc_server -> add_insecure_port). A
local herd serve already runs a worker set-up hook in every Ray worker, the proxy included (cluster.local_ray),
that wraps grpc.aio's Server.add_insecure_port to rebind wildcard addresses. With `tls` in the config, the
hook also turns the proxy's own port into add_secure_port with the config's certificate and key, read in the
proxy process from the paths in the job's environment (tls_env). No other port changes: the replicas'
inter-deployment servers stay as Serve made them, on loopback.

    tls_env(cfg.tls)                    # {HERD_SERVE_GRPC_TLS_CERT: path, HERD_SERVE_GRPC_TLS_KEY: path}
    server_credentials_from_env()       # in the proxy: grpc.ServerCredentials (renewed files are picked up
                                        # at the next connection), or None without TLS
    tls_file_problems(cfg.tls)          # before start-up: both files readable, the key the certificate's
    tls_problem(host, port)             # after start-up: None if the port completes a TLS handshake
    channel_credentials(ca_file)        # for clients: the CA to trust (None: the system's roots)

A joined Ray cluster (`herd serve --address`, KubeRay) starts its proxies with its own environment: there the
gRPC proxy stays plaintext and TLS belongs to the gateway in front of it (docs/security.md).

Imported by every Ray worker of a local session (through the set-up hook): keep the imports light.
"""
from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Any, Optional

from cluster.certificate_files import CertificateFiles, check_pair

CERT_ENV = "HERD_SERVE_GRPC_TLS_CERT"
KEY_ENV = "HERD_SERVE_GRPC_TLS_KEY"
# How long the check after start-up waits for the proxy's handshake.
HANDSHAKE_TIMEOUT_S = 10.0


def tls_env(tls: Any) -> dict[str, str]:
    """The environment that makes the proxy's port TLS (`tls`: the config's TLSConfig, or None: none)."""
    if tls is None:
        return {}
    return {CERT_ENV: os.path.abspath(tls.cert_file), KEY_ENV: os.path.abspath(tls.key_file)}


def server_credentials_from_env():
    """grpc.ServerCredentials from the files the environment names, or None when it names none. A file that
    cannot be read raises: the proxy then fails to start, which herd serve reports, rather than listen in
    plaintext with TLS configured. A renewed certificate is picked up without a restart (CertificateFiles)."""
    cert_file, key_file = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if not cert_file or not key_file:
        return None
    import grpc

    files = CertificateFiles(cert_file, key_file, _grpc_configuration)
    return grpc.dynamic_ssl_server_credentials(files.load(), files.renewed)


def _grpc_configuration(cert_file: str, key_file: str):
    import grpc

    with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
        return grpc.ssl_server_certificate_configuration([(key.read(), cert.read())])


def tls_file_problems(tls: Any) -> list[str]:
    """One line per problem with the config's certificate and key (none when `tls` is None): what the proxies
    would fail on after Ray had started, found in milliseconds before it."""
    if tls is None:
        return []
    missing = [f"tls.{key} {path}: {why}" for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file))
               if (why := _unreadable(path))]
    if missing:
        return missing
    try:
        check_pair(tls.cert_file, tls.key_file)
    except ssl.SSLError as e:
        return [f"tls: {tls.cert_file} and {tls.key_file} are not a PEM certificate and its unencrypted private "
                f"key ({e.reason or e})"]
    return []


def _unreadable(path: str) -> Optional[str]:
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def tls_problem(host: str, port: int, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Optional[str]:
    """None when a TLS handshake with host:port completes (the certificate is not checked: this asks what the
    port speaks, not whom to trust); otherwise what happened instead. A refused connection is retried until
    timeout_s (a proxy may still be starting)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((connect_host(host), port), timeout=timeout_s) as raw:
                with context.wrap_socket(raw):
                    return None
        except ssl.SSLError as e:
            return f"port {port} answered without TLS ({e.reason or e})"
        except ConnectionRefusedError as e:
            if time.monotonic() >= deadline:
                return f"port {port}: {e.strerror or e}"
            time.sleep(0.2)
        except OSError as e:  # a plaintext server that closed on the client's hello, a time-out, ...
            return f"port {port} did not complete a TLS handshake ({e.strerror or e})"


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on `host` (a wildcard: loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def channel_credentials(ca_file: Optional[str] = None):
    """grpc.ChannelCredentials trusting `ca_file`'s certificates (PEM), or the system's roots without one."""
    import grpc

    if ca_file is None:
        return grpc.ssl_channel_credentials()
    with open(ca_file, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())
