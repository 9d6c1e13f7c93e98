"""How a streaming gRPC call ends with the status already set on its Serve gRPC context, cheaply.

Serve applies a streaming method's context status only when the method raises. Two costs come with that, and
both are avoided here:
- Serve's proxy unpickles whatever the method raised. `StatusSet` lives in this module, which imports
  nothing, so the proxy never imports herd (whose engine package pulls in torch) to read a refusal.
- Serve's replica and proxy each log the raised exception at ERROR with its formatted traceback, on their
  event loops: a burst of refusals waited in line behind one another's tracebacks (figures:
  docs/benchmarks.md), and an overloaded server wrote two ERROR lines for every request it refused.
  `StatusLogFilter` keeps the log line of a request that ended with StatusSet and drops its traceback; when
  the status is the client's to act on (a refusal, bad input, no key, its own deadline or cancel) the line
  is INFO, not ERROR: such a request was answered with a precise status, it is not a failure of the server,
  and an alert on the ERROR rate must not fire on back-pressure. UNAVAILABLE and INTERNAL stay as Serve logs
  them (herd logs the cause of an INTERNAL itself). Every Ray worker of a local `herd serve` or of the chart,
  the proxy included, installs it from the module it preloads (cluster.grpc_proxy_preload); the ingress
  installs it in its replica as well, for a joined cluster whose workers do not preload it.
"""
import logging


# The codes that say what the client is to do about its call (back off, fix its input, authenticate...): a call
# that ended with one was served as designed. (grpc.StatusCode names; grpc is not imported here.)
ANSWERED_CODES = frozenset({"CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                            "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                            "UNAUTHENTICATED"})


class StatusSet(Exception):
    """Raised (with the status message) after the code and details were set on the gRPC context; `code` is
    that code's name (grpc.StatusCode.X.name)."""

    def __init__(self, message: str = "", code: str = ""):
        super().__init__(message)
        self.code = code

    def __reduce__(self):   # Serve's proxy unpickles it: keep the code
        return type(self), (str(self), self.code)


class StatusLogFilter(logging.Filter):
    """Strips the traceback from a log record about a call that ended with StatusSet (the line stays), and
    makes the line INFO when the call's code is one of ANSWERED_CODES."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        for _ in range(4):  # Serve wraps it (gRPCStatusError, RayTaskError) a level or two deep
            if exc is None:
                break
            if isinstance(exc, StatusSet):
                record.exc_info, record.exc_text = None, None
                if exc.code in ANSWERED_CODES and record.levelno > logging.INFO:
                    record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
                break
            exc = getattr(exc, "original_exception", None) or getattr(exc, "cause", None) or exc.__cause__
        return True


def install_status_log_filter(logger_name: str = "ray.serve") -> None:
    """Add StatusLogFilter to Serve's logger in this process (once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, StatusLogFilter) for f in logger.filters):
        logger.addFilter(StatusLogFilter())
