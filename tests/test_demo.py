"""`lococo demo` on the real model, when the assets and the shipped compressor are present."""

import os
import subprocess
import sys

import pytest

from lococo.recipes import assets
from lococo.recipes.demo import DEFAULT_COMPRESSOR


def _assets_present() -> bool:
    try:
        assets.model_dir()
        assets.read_document(assets.load_split()["test"][0].id)
    except assets.AssetError:
        return False
    return True


@pytest.mark.skipif(not _assets_present(), reason="assets not fetched: python -m lococo assets fetch")
@pytest.mark.skipif(not (DEFAULT_COMPRESSOR / "lococo_config.json").is_file(),
                    reason="no shipped compressor")
def test_demo_reads_a_document_and_generates():
    out = subprocess.run([sys.executable, "-m", "lococo", "demo", "--tokens", "400", "--generate", "5"],
                         capture_output=True, text=True, timeout=600,
                         env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    full = next(line for line in lines if line.strip().startswith("full (Dynamic)"))
    lococo_line = next(line for line in lines if line.strip().startswith("LoCoCo M=128"))
    # 400 tokens fit in M + B = 256 stored entries only after compression: the row reports 256
    assert lococo_line.split()[-2] == "256" and full.split()[-2] == "400"
    assert "continued from the 128-slot cache (404 tokens seen)" in out.stdout
