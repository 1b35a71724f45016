"""`scripts/setup.sh` writes `.venv/bin/lococo` from pyproject.toml (it installs the package with a .pth
file, so pip writes no entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_writes_the_console_script():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '"$VENV_PY" scripts/install_entry_points.py' in setup


def test_the_written_lococo_command_runs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "install_entry_points.py"), "--bin", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    script = tmp_path / "lococo"
    assert f"wrote {script}" in done.stdout
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith(f"#!{sys.executable}\n")
    env = os.environ | {"PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("usage: lococo train") and "--resume-with-changes" in ran.stdout
    bad = subprocess.run([str(script), "eval", "-M", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "argument --num-slots/-M" in bad.stderr
