"""Named in Ray's `preload_python_modules`: every Ray worker imports it before it takes work, so that Serve's gRPC
proxy, when this worker builds one, has herd's connection options (cluster.grpc_proxy_connections)."""
from cluster.grpc_proxy_connections import install

install()
