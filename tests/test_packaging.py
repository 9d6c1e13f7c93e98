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
