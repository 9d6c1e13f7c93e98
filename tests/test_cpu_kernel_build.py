"""Where herd's CPU kernels are built: a directory named by what the build depends on (the sources, Python,
torch, the CPU), holding its own copy of the sources, so any checkout of the same sources reuses one build."""
import shutil
import threading

import pytest

from workers import cpu_kernels


@pytest.fixture
def csrc_copy(tmp_path, monkeypatch):
    """workers/csrc copied to a checkout of its own, and torch's extension root in tmp_path."""
    src = tmp_path / "checkout" / "csrc"
    shutil.copytree(cpu_kernels._CSRC, src)
    monkeypatch.setattr(cpu_kernels, "_CSRC", src)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    return src


def test_the_digest_does_not_depend_on_where_the_checkout_is(csrc_copy, monkeypatch):
    here = cpu_kernels._build_digest(cpu_kernels._csrc_files())
    monkeypatch.setattr(cpu_kernels, "_CSRC", cpu_kernels.Path(__file__).parents[1] / "workers" / "csrc")
    assert cpu_kernels._build_digest(cpu_kernels._csrc_files()) == here


@pytest.mark.parametrize("change", ["edit a kernel", "edit a header", "add a file"])
def test_the_digest_changes_with_any_source_file(csrc_copy, change):
    before = cpu_kernels._build_digest(cpu_kernels._csrc_files())
    if change == "edit a kernel":
        (csrc_copy / "layer_ops_cpu.cpp").write_text((csrc_copy / "layer_ops_cpu.cpp").read_text() + "\n// x\n")
    elif change == "edit a header":
        (csrc_copy / "convert.h").write_text((csrc_copy / "convert.h").read_text() + "\n// x\n")
    else:
        (csrc_copy / "extra.h").write_text("#pragma once\n")
    assert cpu_kernels._build_digest(cpu_kernels._csrc_files()) != before


def test_the_build_directory_holds_a_whole_copy_of_the_sources(csrc_copy, tmp_path):
    files = cpu_kernels._csrc_files()
    directory = cpu_kernels._build_directory("d1", files)
    assert directory == tmp_path / "extensions" / "herd_cpu_kernels-d1"
    copied = sorted(p.name for p in (directory / "src").iterdir())
    assert copied == sorted(p.name for p in csrc_copy.iterdir())
    for name in copied:
        assert (directory / "src" / name).read_bytes() == (csrc_copy / name).read_bytes()
    assert cpu_kernels._build_directory("d1", files) == directory    # a second call keeps the copy
    assert [p.name for p in directory.iterdir()] == ["src"]          # and leaves no staging directory


def test_processes_that_start_together_leave_one_copy(csrc_copy, tmp_path):
    barrier, results, errors = threading.Barrier(8), [], []
    files = cpu_kernels._csrc_files()

    def one():
        try:
            barrier.wait()
            results.append(cpu_kernels._build_directory("d2", files))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    directory = results[0]
    assert [p.name for p in directory.iterdir()] == ["src"]
    assert sorted(p.name for p in (directory / "src").iterdir()) == sorted(p.name for p in csrc_copy.iterdir())


def test_a_build_lock_left_by_a_killed_process_does_not_hang_later_loads(tmp_path):
    """torch's `lock` file, as a process killed while loading the kernels leaves it: a new process loads the
    kernels anyway (it waited forever before) and removes the file. The machine's usual build directory is used
    (the kernels are built there once per machine), in a process of its own (the module is cached per process)."""
    import os
    import subprocess
    import sys

    files = cpu_kernels._csrc_files()
    directory = cpu_kernels._build_directory(cpu_kernels._build_digest(files), files)
    (directory / "lock").touch()
    code = "from workers.cpu_kernels import cpu_kernel_module; assert cpu_kernel_module() is not None"
    env = {**os.environ, "HERD_CPU_KERNELS": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=cpu_kernels.Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (directory / "lock").exists()
