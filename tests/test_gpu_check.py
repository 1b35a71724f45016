"""tools/gpu_check.sh: its plan on machines without a GPU, and its bookkeeping with a stand-in GPU."""

import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
# The order of the issue that asked for the check: what later steps need, then correctness,
# speed, the tests, and the sanitizer tools last.
STEPS = ["build", "import", "verify", "benchmark", "generate", "bench_generate", "pytest", "memcheck",
         "racecheck", "synccheck"]
FILES = ["summary.md", "verify.md", "fuse_kv_cuda.csv", "fuse_kv_cuda.md", "logs.tgz"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(env_update, tmp_path, timeout=120):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path), **env_update}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def plan_of(stdout: str) -> tuple[list[tuple[str, int]], list[str], int]:
    """(step, limit) pairs, file names and the budget from the printed plan."""
    budget = int(re.search(r"budget (\d+)s", stdout).group(1))
    steps = [(m.group(1), int(m.group(2))) for m in re.finditer(r"^  (\w+) +(\d+)s  ", stdout, re.M)]
    files = re.findall(r"^  (\S+\.(?:md|csv|tgz)) ", stdout, re.M)
    return steps, files, budget


def stand_in_gpu(tmp_path, python_script: str) -> dict:
    """A PATH with a stand-in nvidia-smi and compute-sanitizer, and PYTHON set to a stub."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", '#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: Stand-in"\nexit 0\n')
    executable(bin_dir / "compute-sanitizer", '#!/bin/sh\necho "  --kernel-name"\nexit 0\n')
    python = executable(bin_dir / "python-stub", python_script)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), "CUDA_VISIBLE_DEVICES": "0"}


def summary_rows(out: Path) -> dict[str, str]:
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STEPS:
            rows[cells[0]] = cells[1]
    return rows


def test_hidden_devices_print_the_plan_and_run_nothing(tmp_path):
    result = run({"CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no GPU" in result.stdout
    assert not (tmp_path / "out").exists()
    steps, files, budget = plan_of(result.stdout)
    assert [name for name, _ in steps] == STEPS
    assert sum(limit for _, limit in steps) <= budget <= 480
    assert f"sum of the step limits: {sum(limit for _, limit in steps)}s" in result.stdout
    assert files == FILES and len(files) <= 8


def test_no_nvidia_smi_means_no_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "grep"):  # a PATH with the basics and no nvidia-smi
        os.symlink(shutil.which(tool), bin_dir / tool)
    result = run({"PATH": str(bin_dir), "CUDA_VISIBLE_DEVICES": "0"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no GPU found" in result.stdout
    assert plan_of(result.stdout)[0]


def test_failed_build_stops_and_reports(tmp_path):
    """A failed build ends the run (nothing can run without it): exit 1, its log in logs.tgz."""
    env = stand_in_gpu(tmp_path, '#!/bin/sh\necho "stub $*"\ncase "$*" in *setup.py*) exit 7;; esac\nexit 0\n')
    result = run(env, tmp_path)
    out = tmp_path / "out"
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary_rows(out) == {"build": "**FAILED** (exit 7)"}
    with tarfile.open(out / "logs.tgz") as tar:
        assert "stub setup.py build_ext --inplace" in tar.extractfile("./build.log").read().decode()
    assert not list(tmp_path.glob("gpu_check.*")), "the log folder is removed at the end"


def test_a_failing_step_does_not_stop_the_later_ones(tmp_path):
    env = stand_in_gpu(tmp_path, '#!/bin/sh\necho "stub $*"\ncase "$*" in *--verify*) exit 3;; esac\nexit 0\n')
    result = run(env, tmp_path)
    out = tmp_path / "out"
    assert result.returncode == 1
    rows = summary_rows(out)
    assert list(rows) == STEPS
    assert rows["verify"] == "**FAILED** (exit 3)"
    assert all(rows[s] == "ok" for s in STEPS if s != "verify")
    assert {p.name for p in out.iterdir()} <= set(FILES)
    with tarfile.open(out / "logs.tgz") as tar:
        names = set(tar.getnames())
    assert {"./verify.log", "./pytest.log", "./sanitizer_synccheck.log", "./versions.txt"} <= names


def test_steps_never_run_past_the_budget(tmp_path):
    """A step that hangs is cut at what is left of the budget; the steps after it are skipped."""
    env = stand_in_gpu(tmp_path, '#!/bin/sh\ncase "$*" in *--verify*) sleep 60;; esac\nexit 0\n')
    result = run({**env, "GPU_CHECK_BUDGET_S": "12"}, tmp_path)
    rows = summary_rows(tmp_path / "out")
    assert result.returncode == 1
    assert rows["build"] == "ok" and rows["verify"].startswith("**TIMEOUT**")
    assert rows["synccheck"] == "skipped: out of time"


def test_without_ninja_the_build_gets_more_time(tmp_path):
    """torch compiles the sources one after another without ninja: the build may use 330 s."""
    env = stand_in_gpu(tmp_path, '#!/bin/sh\ncase "$*" in *is_ninja_available*) exit 1;; *setup.py*) exit 7;; esac\n'
                                 'exit 0\n')
    result = run(env, tmp_path)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert result.returncode == 1
    assert "| build | **FAILED** (exit 7) | 0 | 330 | build.log |" in summary
    assert "- ninja: no" in summary
