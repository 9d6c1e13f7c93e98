"""cluster.https_renewal on uvicorn's own Config: a renewed certificate reaches the next TLS handshakes of the
context the server listens with, without a restart; a half-written renewal keeps the current one."""
from __future__ import annotations

import asyncio
import os
import shutil
import ssl


from cluster import https_renewal
from tests.tls_certs import write_self_signed


def _replace(path, source) -> None:   # as Kubernetes and cert-manager do: a new file moved into place
    shutil.copy(source, f"{path}.new")
    os.replace(f"{path}.new", path)


async def _handshake(port: int, ca_file) -> bool:
    """Whether a TLS client that trusts only `ca_file` completes a handshake with the server."""
    client = ssl.create_default_context(cafile=str(ca_file))
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
    except ssl.SSLError:
        return False
    writer.close()
    return True


def test_a_renewed_certificate_reaches_the_next_handshakes(tmp_path, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Config, "load", uvicorn.Config.load)   # restored after the test
    monkeypatch.setattr(https_renewal, "RENEWAL_CHECK_S", 0.02)
    https_renewal.install_https_renewal(object(), None)
    installed = uvicorn.Config.load
    https_renewal.install_https_renewal(object(), None)               # a second proxy start: wrapped once
    assert uvicorn.Config.load is installed and installed.herd_renews

    first_cert, first_key = write_self_signed(tmp_path, "first")
    renewed_cert, renewed_key = write_self_signed(tmp_path, "renewed")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)

    async def scenario() -> list[bool]:
        config = uvicorn.Config(lambda: None, ssl_certfile=str(cert), ssl_keyfile=str(key))
        config.load()                                      # as uvicorn's Server.serve does, in the event loop
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=config.ssl)
        port = server.sockets[0].getsockname()[1]
        try:
            seen = [await _handshake(port, first_cert), await _handshake(port, renewed_cert)]
            _replace(cert, renewed_cert)                   # the certificate first, its key not yet
            await asyncio.sleep(0.3)                       # many looks at the files
            seen += [await _handshake(port, first_cert)]   # kept: the pair does not load
            _replace(key, renewed_key)
            for _ in range(500):                           # a guard against a hang, not a timing
                if await _handshake(port, renewed_cert):
                    break
                await asyncio.sleep(0.02)
            seen += [await _handshake(port, renewed_cert), await _handshake(port, first_cert)]
            return seen
        finally:
            config.herd_renewal.cancel()
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == [True, False, True, True, False]


def test_a_plain_http_config_gets_no_renewal_task(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Config, "load", uvicorn.Config.load)
    https_renewal.install_https_renewal(object(), None)

    async def load() -> object:
        config = uvicorn.Config(lambda: None)
        config.load()
        return config

    config = asyncio.run(load())
    assert config.ssl is None and not hasattr(config, "herd_renewal")
