"""The installable package (what the Docker image installs with `pip install .`) carries what herd loads at run
time besides Python modules: the CPU kernels' C++ sources and the gRPC proto."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_kernel_sources_and_proto(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                            ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("herd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"workers/csrc/{p.name}" for p in (ROOT / "workers" / "csrc").iterdir()}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert "proto/herd/v1/inference.proto" in names
    assert "cluster/cli.py" in names and "workers/engine.py" in names


# Imported only inside a benchmark that compares herd's grammar engine with it where it is installed (a GPU
# host's own environment); herd never needs it.
OPTIONAL_IMPORTS = {"xgrammar"}


def test_every_third_party_import_is_pinned():
    """Each package herd's code imports by name (cluster, workers, benchmarks) is pinned in pyproject.toml (in
    the dependencies or an extra), not only pulled in by another package: herd patches and subclasses some of
    them (Serve's proxies, Starlette's error handling), so a new release must not arrive unasked."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values() for s in extra)]
    pinned = set()
    for spec in specs:
        name, _, rest = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?(.*)", spec.split(";")[0].strip()).groups()
        if "==" in rest or "<" in rest:   # an exact pin, or a range with an upper bound
            pinned.add(_normalized(name))

    imported = set()
    for package in ("cluster", "workers", "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    ours = {"cluster", "workers", "benchmarks", "proto", "tests"}   # gpu_check runs in the tree: tests' checkpoints
    third_party = sorted(imported - ours - set(sys.stdlib_module_names) - OPTIONAL_IMPORTS)
    distributions = importlib.metadata.packages_distributions()
    unpinned = {module: distributions.get(module) for module in third_party
                if not any(_normalized(d) in pinned for d in distributions.get(module) or ())}
    assert not unpinned, f"imported but not pinned in pyproject.toml: {unpinned}"


def _normalized(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()
