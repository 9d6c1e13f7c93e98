"""What `herd serve` prints while it starts, and the summary once it serves.

Ray and Serve write hundreds of INFO lines while a cluster starts; `herd serve` sends them to Ray's log files
(cluster.serve_cli) and shows instead, on stderr:

    herd: deploying 3 models: llama2-70b-mini (TP2xPP2 shard group, 1 replica of 4 shards), ...
    herd:   llama32-1b-mini: replicas 0/1 running, 1 starting
    herd:   llama2-70b-mini [uk9fjhjd]: loading /cache/llama2-70b-mini on 4 shards (TP2 × PP2, gloo)
    herd:   llama2-70b-mini [uk9fjhjd]: model llama2-70b-mini: loaded in 3.1s; max_model_len 1024, ...
    herd:   llama32-1b-mini: replicas 1/1 running
    herd: ready in 21.4s
      gRPC       127.0.0.1:9000  (herd.v1.Inference, grpc.health.v1.Health)
      ...

`DeployProgress` watches the deployment from a thread while cluster.app_deploy waits for it: each model
deployment's replica counts and the replicas Serve cannot place (Serve's status), and the weight-loading lines
each model replica writes to its Serve log file (cluster.deployment, workers.parallel). `summary_lines` is the
block printed once everything runs; `deploy_failures` says why a deployment failed (each deployment's own
error, not Serve's traceback).
"""
from __future__ import annotations

import glob
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

from cluster.status import MODEL_PREFIX, status_name

# Messages of a model replica's log that tell how its start-up goes (the Serve log line's text after " -- ").
_PROGRESS = re.compile(r"^(model \S+: loading|loading .* on \d+ shards|shard group ready|model \S+: loaded in)")


def describe_model(model: Any) -> str:
    """One model's shape, as the start-up names it: layout, replicas, shards."""
    tp, pp = model.tensor_parallel_size, model.pipeline_parallel_size
    if model.autoscaling_config is not None:
        a = model.autoscaling_config
        replicas = f"autoscaled, {a.min_replicas}-{a.max_replicas} replicas"
    else:
        n = model.num_replicas or 1
        replicas = f"{n} replica{'s' if n != 1 else ''}"
    if tp * pp > 1:
        return f"{model.name} (TP{tp}xPP{pp} shard group, {replicas} of {tp * pp} shards)"
    return f"{model.name} ({replicas})"


# Serve's deployment message for replicas it cannot place ("... has 1 replicas that have taken more than 30s to
# be scheduled ... Resources required for each replica: {...}, total resources available: {...}. ..."); a
# TP x PP replica's requirement is its placement group's bundles, a list ([{...}, {...}, ...]).
_UNSCHEDULED = re.compile(r"has (\d+) replicas that have taken more than (\d+)s to be scheduled.*"
                          r"Resources required for each replica: (\[.*?\]|\{.*?\}), "
                          r"total resources available: (\{.*?\})", re.DOTALL)


def waiting_for_resources(message: str) -> Optional[str]:
    """What Serve's message says of replicas that wait for room (None when it says nothing of that)."""
    m = _UNSCHEDULED.search(message or "")
    if m is None:
        return None
    count, waited, required, available = m.groups()
    needs = f"a placement group of {required}" if required.startswith("[") else required
    return (f"{count} replica(s) not placed after {waited}+ s: each needs {needs}, the cluster has {available} "
            "available (`ray status` shows why; a rolling update's surge needs room too)")


@dataclass
class _Seen:
    counts: Optional[tuple] = None
    waiting: Optional[str] = None
    log_offsets: dict[str, int] = field(default_factory=dict)


class DeployProgress:
    """Prints the deployment's progress until `stop()` (call `start()` before the application is submitted)."""

    def __init__(self, cfg: Any, app_name: str, logs_dir: Optional[str], out: Optional[TextIO] = None,
                 period_s: float = 0.5, *, from_now: bool = False):
        """out: stderr as it is now (not as it was at import); from_now: leave out the replica log lines written
        before (a reload's progress, not the start's)."""
        self.cfg, self.app_name, self.logs_dir, self.period_s = cfg, app_name, logs_dir, period_s
        self.out = out if out is not None else sys.stderr
        self._seen = {m.name: _Seen() for m in cfg.models}
        self._ingress = _Seen()
        if from_now:
            for name, seen in self._seen.items():
                seen.log_offsets = {path: os.path.getsize(path) for path in self._log_files(name)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="herd-deploy-progress", daemon=True)
        self.started_at = time.monotonic()

    def say(self, line: str) -> None:
        print(f"herd: {line}", file=self.out, flush=True)

    def start(self) -> "DeployProgress":
        self.say(f"deploying {len(self.cfg.models)} model(s): "
                 + ", ".join(describe_model(m) for m in self.cfg.models))
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.poll()   # the last lines (e.g. "1/1 running") before the summary
        except Exception:  # noqa: BLE001 - stopping because start-up failed or was interrupted
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - progress is a courtesy: app_deploy reports real failures
                pass

    def poll(self) -> None:
        from ray import serve

        from cluster.app import INGRESS_NAME

        app = serve.status().applications.get(self.app_name)
        deployments = app.deployments if app is not None else {}
        for model in self.cfg.models:
            seen = self._seen[model.name]
            self._log_lines(model.name, seen)
            d = deployments.get(MODEL_PREFIX + model.name)
            if d is None:
                continue
            states = {status_name(k): v for k, v in d.replica_states.items()}
            counts = (states.get("RUNNING", 0), states.get("STARTING", 0), states.get("UNHEALTHY", 0))
            if counts != seen.counts and sum(counts):
                seen.counts = counts
                text = f"replicas {counts[0]}/{sum(states.values())} running"
                text += f", {counts[1]} starting" if counts[1] else ""
                text += f", {counts[2]} unhealthy" if counts[2] else ""
                self.say(f"  {model.name}: {text}")
            self._waiting(model.name, d, seen)
        ingress = deployments.get(INGRESS_NAME)
        if ingress is not None:
            self._waiting("ingress", ingress, self._ingress)

    def _waiting(self, label: str, deployment: Any, seen: _Seen) -> None:
        """Replicas Serve cannot place (no room: a GPU short, a surge on a full cluster): said once per change,
        since the deployment otherwise only looks slow."""
        waiting = waiting_for_resources(deployment.message)
        if waiting is not None and waiting != seen.waiting:
            self.say(f"  {label}: {waiting}")
        seen.waiting = waiting

    def _log_files(self, name: str) -> list[str]:
        if not self.logs_dir:
            return []
        pattern = os.path.join(self.logs_dir, "serve", f"replica_{self.app_name}_{MODEL_PREFIX}{name}_*.log")
        return sorted(glob.glob(pattern))

    def _log_lines(self, name: str, seen: _Seen) -> None:
        """New progress lines in the model's replica log files (Serve names them replica_<app>_<deployment>_<id>)."""
        for path in self._log_files(name):
            replica = path.rsplit("_", 1)[-1].removesuffix(".log")
            try:
                with open(path, errors="replace") as f:
                    f.seek(seen.log_offsets.get(path, 0))
                    chunk = f.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind("\n") + 1]   # a line still being written waits for the next poll
            seen.log_offsets[path] = seen.log_offsets.get(path, 0) + len(complete.encode("utf-8", "replace"))
            for line in complete.splitlines():
                message = line.split(" -- ", 1)[-1].strip()
                if _PROGRESS.match(message):
                    self.say(f"  {name} [{replica}]: {message}")


def summary_lines(cfg: Any, *, elapsed_s: float, dashboard_url: Optional[str], metrics_urls: list[str],
                  logs_dir: Optional[str], joined: bool) -> list[str]:
    """The block `herd serve` prints once every model runs (docs: README, Serving a cluster)."""
    host = cfg.host
    # TLS on the gRPC proxy is herd's own doing, on a local Ray only (cluster.grpc_tls); Serve's HTTPS is anywhere.
    grpc_tls = "TLS; " if cfg.tls is not None and not joined else ""
    scheme = "https" if cfg.tls is not None else "http"
    lines = [f"herd: ready in {elapsed_s:.1f}s",
             f"  gRPC       {host}:{cfg.grpc_port}  ({grpc_tls}herd.v1.Inference, grpc.health.v1.Health)",
             f"  HTTP       {scheme}://{host}:{cfg.http_port}/v1  (OpenAI-compatible)",
             f"  dashboard  {dashboard_url or 'not running'}",
             f"  metrics    {', '.join(metrics_urls) or '-'}  (Prometheus; vLLM names as ray_vllm_*)"]
    if logs_dir:
        where = "this machine's " if joined else ""
        lines.append(f"  logs       {logs_dir}  ({where}Ray session logs; serve/ holds each replica's)")
    lines.append(f"  status     herd status{'' if not joined else ' --address auto'};  "
                 f"try: herd client models --address {host}:{cfg.grpc_port}"
                 f"{' --tls (or --tls-ca CA.pem)' if grpc_tls else ''}")
    lines.append("  Ctrl-C stops")
    return lines


# Serve's deployment states that say it failed: to deploy, or its replicas' health checks.
FAILED_STATES = ("DEPLOY_FAILED", "UNHEALTHY")


def deploy_failures(app_name: str) -> list[str]:
    """Why `app_name` failed to deploy, one line per failed deployment ("model a: <its error>"), from Serve's
    status; [] when it did not fail. Serve's message for a replica whose constructor raised ends with that
    exception's traceback: its last line (the exception itself) is what the operator needs; the traceback
    stays in the replica's log file."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or status_name(app.status) != "DEPLOY_FAILED":
        return []
    lines = []
    for name, dep in sorted(app.deployments.items()):
        if status_name(dep.status) in FAILED_STATES:
            label = f"model {name[len(MODEL_PREFIX):]}" if name.startswith(MODEL_PREFIX) else name
            lines.append(f"{label}: {failure_reason(dep.message)}")
    return lines or [app.message]


def failure_reason(message: str) -> str:
    """The exception line at the end of a Serve deployment message (the whole message when it has none)."""
    last = next((ln.strip() for ln in reversed((message or "").splitlines()) if ln.strip()), "")
    return last or "no reason given (see the replicas' logs)"
