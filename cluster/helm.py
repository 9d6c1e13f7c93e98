"""herd's one manifest renderer is its Helm chart (helm/herd); this module runs `helm template` on it.

`herd k8s render` prints what `helm template` prints and `herd k8s apply` applies it, so the chart's checks
(GPU fit, secure defaults, ClusterConfig's cross-field rules) hold for every path to a cluster.

The helm binary is, in this order: the one given (--helm), $HERD_HELM, `helm` on PATH. The chart is the one
given (--chart), else helm/herd beside this package in a source checkout (it is not part of the wheel).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

HELM_INSTALL_HINT = ("install helm (https://helm.sh/docs/intro/install/), or point --helm or $HERD_HELM at a "
                     "helm binary")
SOURCE_CHART = Path(__file__).resolve().parents[1] / "helm" / "herd"
TEMPLATE_TIMEOUT_S = 120


class HelmError(Exception):
    """helm is missing, or it refused the values; the message says which and what to do."""


def find_helm(explicit: str | None = None) -> str:
    """The helm binary to run."""
    candidate = explicit or os.environ.get("HERD_HELM")
    if candidate:
        if not (Path(candidate).is_file() and os.access(candidate, os.X_OK)):
            raise HelmError(f"helm not found at {candidate}; {HELM_INSTALL_HINT}")
        return candidate
    found = shutil.which("helm")
    if found is None:
        raise HelmError(f"helm is not on PATH; {HELM_INSTALL_HINT}")
    return found


def find_chart(explicit: str | None = None) -> Path:
    """The chart folder: the one given, else the source checkout's helm/herd."""
    chart = Path(explicit) if explicit else SOURCE_CHART
    if not (chart / "Chart.yaml").is_file():
        where = f"{chart} has no Chart.yaml" if explicit else "this herd install has no helm/herd chart beside it"
        raise HelmError(f"{where}; pass --chart PATH to the herd repository's helm/herd")
    return chart


def template_command(release: str, chart: Path, *, values_files: Sequence[str] = (), set_values: Sequence[str] = (),
                     namespace: str | None = None, helm: str | None = None) -> list[str]:
    """The `helm template` command line; `herd k8s render` runs exactly this."""
    argv = [find_helm(helm), "template", release, str(chart)]
    if namespace:
        argv += ["--namespace", namespace]
    for f in values_files:
        argv += ["--values", f]
    for s in set_values:
        argv += ["--set", s]
    return argv


def helm_template(release: str, *, values_files: Sequence[str] = (), set_values: Sequence[str] = (),
                  namespace: str | None = None, chart: str | None = None, helm: str | None = None) -> str:
    """The chart's manifests as `helm template` prints them (a multi-document YAML string)."""
    argv = template_command(release, find_chart(chart), values_files=values_files, set_values=set_values,
                            namespace=namespace, helm=helm)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TEMPLATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HelmError(f"helm template did not finish in {TEMPLATE_TIMEOUT_S} s") from None
    except OSError as e:
        raise HelmError(f"cannot run {argv[0]}: {e.strerror}; {HELM_INSTALL_HINT}") from None
    if proc.returncode != 0:
        raise HelmError(f"helm template refused the values: {_helm_message(proc.stderr)}")
    return proc.stdout


def _helm_message(stderr: str) -> str:
    """helm's error on one line, without its `Error: ` prefix, its warnings and its advice to use --debug."""
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith(("WARNING", "Use --debug flag"))]
    text = " ".join(lines) or "(no message)"
    return text.removeprefix("Error: ")
