"""benchmarks/gpu_check.sh on machines without a GPU, and its bookkeeping with a stand-in GPU."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(env_update, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), **env_update}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_hidden_devices_mean_no_gpu(tmp_path):
    result = run({"CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no GPU" in result.stdout
    assert not (tmp_path / "out").exists()


def test_no_nvidia_smi_means_no_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "grep"):  # a PATH with the basics and no nvidia-smi
        os.symlink(shutil.which(tool), bin_dir / tool)
    result = run({"PATH": str(bin_dir), "CUDA_VISIBLE_DEVICES": "0"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no GPU found" in result.stdout


def test_failed_build_stops_and_reports(tmp_path):
    """With a stand-in GPU and a python whose build fails: exit 1, the table printed last."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", '#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: Stand-in"\n'
               'case "$1" in --query*) echo "Stand-in, 0";; esac\nexit 0\n')
    python = executable(bin_dir / "python-stub", "#!/bin/sh\necho stub build fails\nexit 7\n")
    result = run({"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python),
                  "CUDA_VISIBLE_DEVICES": "0"}, tmp_path)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("| build | FAILED (exit 7) |") and lines[-1].endswith("| build.log |")
    assert "stub build fails" in (tmp_path / "out" / "build.log").read_text()
    assert (tmp_path / "out" / "summary.md").read_text().strip().endswith(lines[-1])
