"""Where herd's log records go: every module logs under `herd.<module>` (`logging.getLogger(f"herd.{__name__}")`).

In a Serve replica only Serve's own logger ("ray.serve") has handlers: the replica's log file and stderr, with
Serve's format, its replica / request context and herd's request-id filter. So the "herd" logger hangs below
"ray.serve" in the logging tree: herd.* records go where Serve's own go, at Serve's level, and no call site
configures anything. The `herd` command itself prints them with its own handler on the root logger
(`log_through_root`, from cluster.cli.main): in its process Ray's "ray" logger would otherwise take them, in
Ray's format and at INFO even under -v.
"""
from __future__ import annotations

import logging

HERD_LOGGER = "herd"
SERVE_LOGGER = "ray.serve"           # ray.serve._private.constants.SERVE_LOGGER_NAME


def log_through_serve() -> None:
    """Make "ray.serve" the parent of the "herd" logger (idempotent). Importing `cluster` does it."""
    logging.getLogger(HERD_LOGGER).parent = logging.getLogger(SERVE_LOGGER)


def log_through_root() -> None:
    """Make the root logger the parent of the "herd" logger again (the CLI's process)."""
    logging.getLogger(HERD_LOGGER).parent = logging.getLogger()
