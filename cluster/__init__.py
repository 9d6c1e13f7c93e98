"""The Ray Serve application and the operator's tools (see cluster/logs.py for where herd.* logs go)."""
from cluster.logs import log_through_serve

log_through_serve()
