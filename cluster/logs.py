"""Where herd's log records go: every module logs under `herd.<module>` (`logging.getLogger(f"herd.{__name__}")`).

In a Serve replica only Serve's own logger ("ray.serve") has handlers: the replica's log file and stderr, with
Serve's format, its replica / request context and herd's request-id filter. So the "herd" logger hangs below
"ray.serve" in the logging tree: herd.* records go where Serve's own go, at Serve's level, and no call site
configures anything. Outside Serve (the `herd` CLI, tests) "ray.serve" has no handlers of its own and passes
the records on to its parents ("ray", then the root logger) as before.
"""
from __future__ import annotations

import logging

HERD_LOGGER = "herd"
SERVE_LOGGER = "ray.serve"           # ray.serve._private.constants.SERVE_LOGGER_NAME


def log_through_serve() -> None:
    """Make "ray.serve" the parent of the "herd" logger (idempotent). Importing `cluster` does it."""
    logging.getLogger(HERD_LOGGER).parent = logging.getLogger(SERVE_LOGGER)
