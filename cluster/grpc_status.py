"""How a streaming gRPC call ends with the status already set on its Serve gRPC context, cheaply.

Serve applies a streaming method's context status only when the method raises. Two costs come with that, and
both are avoided here:
- Serve's proxy unpickles whatever the method raised. `StatusSet` lives in this module, which imports
  nothing, so the proxy never imports herd (whose engine package pulls in torch) to read a refusal.
- Serve's replica and proxy each log the raised exception with its formatted traceback, on their event loops:
  a burst of refusals waited in line behind one another's tracebacks (figures: docs/benchmarks.md). `StatusLogFilter` keeps the log line of a request that ended with StatusSet and drops its
  traceback: such a request was answered with a precise status, it is not a failure of the server. The
  ingress installs it in its replica; a local `herd serve` installs it in every Ray worker, the proxy
  included (cluster.local_ray).
"""
import logging


class StatusSet(Exception):
    """Raised (with the status message) after the code and details were set on the gRPC context."""


class StatusLogFilter(logging.Filter):
    """Strips the traceback from a log record about a call that ended with StatusSet (the line stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        for _ in range(4):  # Serve wraps it (gRPCStatusError, RayTaskError) a level or two deep
            if exc is None:
                break
            if isinstance(exc, StatusSet):
                record.exc_info, record.exc_text = None, None
                break
            exc = getattr(exc, "original_exception", None) or getattr(exc, "cause", None) or exc.__cause__
        return True


def install_status_log_filter(logger_name: str = "ray.serve") -> None:
    """Add StatusLogFilter to Serve's logger in this process (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, StatusLogFilter) for f in logger.filters):
        logger.addFilter(StatusLogFilter())
