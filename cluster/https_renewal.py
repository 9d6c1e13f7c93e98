"""Serve's HTTPS proxy serves a renewed certificate without a restart, as the gRPC proxy does
(cluster.grpc_tls).

Serve's HTTP proxy is uvicorn, which reads `ssl_certfile` / `ssl_keyfile` once, in `uvicorn.Config.load()`.
cert-manager renews a Secret's files in place, and Kubernetes updates the mounted files without restarting
the pod: without this, the proxy went on serving the old certificate until it expired. `install_https_renewal`
is a gRPC servicer function that adds no service, like cluster.proxy_not_serving's: Serve calls every one in
each proxy process, on any cluster (local, joined, KubeRay), before its HTTP server has loaded its config
(the servers start in tasks that run after it). It wraps `uvicorn.Config.load` so that a config with a
certificate gets a task that looks at the two files every RENEWAL_CHECK_S and loads a changed pair into the
same SSLContext, which the next handshakes use (cluster.certificate_files checks the pair first, so a
half-written renewal never reaches the live context).

    grpc_servicer_functions: [..., "cluster.https_renewal.install_https_renewal"]

Runs in Serve's proxy process: keep the imports light.
"""
from __future__ import annotations

import asyncio

# How often the files are looked at (a stat of two files); cert-manager renews days before expiry.
RENEWAL_CHECK_S = 10.0


def install_https_renewal(servicer=None, server=None) -> None:
    """A gRPC servicer function that adds no service: uvicorn configs loaded in this process from now on renew
    their certificate (module doc). Serve calls it with its mock servicer and its gRPC server."""
    import uvicorn

    load = uvicorn.Config.load
    if getattr(load, "herd_renews", False):
        return

    def load_and_renew(config) -> None:
        load(config)
        if config.ssl is not None and config.ssl_certfile and config.ssl_keyfile:
            config.herd_renewal = asyncio.get_running_loop().create_task(_renew(config))   # kept: tasks are weak

    load_and_renew.herd_renews = True
    uvicorn.Config.load = load_and_renew


async def _renew(config) -> None:
    from cluster.certificate_files import CertificateFiles

    context = config.ssl

    def into_context(cert_file: str, key_file: str) -> bool:
        context.load_cert_chain(cert_file, key_file, password=config.ssl_keyfile_password)
        return True

    files = CertificateFiles(config.ssl_certfile, config.ssl_keyfile, into_context)
    while True:
        await asyncio.sleep(RENEWAL_CHECK_S)
        files.renewed()
