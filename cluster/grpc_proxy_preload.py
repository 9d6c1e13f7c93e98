"""Named in Ray's `preload_python_modules`: every Ray worker imports it before it takes work, so that Serve's gRPC
proxy, when this worker builds one, has herd's connection options (cluster.grpc_proxy_connections), and Serve's
log lines of calls herd answered with a precise status carry no traceback and are INFO when the status is the
client's to act on (cluster.grpc_status). Both imports are light (grpc's aio server module, logging)."""
from cluster.grpc_proxy_connections import install
from cluster.grpc_status import install_status_log_filter

install()
install_status_log_filter()
