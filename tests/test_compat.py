"""The transformers version check: silent inside the tested range, a clear warning outside it."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lococo.hf import compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["5.17.0", "5.17", "5.20.3", "5.24.0", "5.25.0", "5.25.9", "5.25.0rc1"])
def test_tested_versions_pass_silently(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_transformers_version(version) is True


@pytest.mark.parametrize("version", ["5.16.2", "5.26.0", "5.26.0.dev0", "4.57.1", "6.0.0"])
def test_other_versions_warn_with_the_range_and_the_fix(version):
    with pytest.warns(compat.UntestedTransformersWarning) as record:
        assert compat.check_transformers_version(version) is False
    message = str(record[0].message)
    assert f"transformers {version} is installed" in message
    assert "tested with transformers 5.17 to 5.25" in message
    assert "pip install 'transformers>=5.17,<5.26'" in message


def test_unreadable_version_warns():
    with pytest.warns(compat.UntestedTransformersWarning, match="cannot read the transformers version 'nightly'"):
        assert compat.check_transformers_version("nightly") is False


def test_default_reads_the_installed_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.30.1")
    with pytest.warns(compat.UntestedTransformersWarning, match="transformers 5.30.1 is installed"):
        assert compat.check_transformers_version() is False


def _import_lococo_hf(prelude: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    code = f"{prelude}\nimport warnings\nwarnings.simplefilter('always')\nimport lococo.hf\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_lococo_hf_checks_the_version_once():
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__).release[:2]
    in_range = compat.TESTED_TRANSFORMERS[0] <= installed <= compat.TESTED_TRANSFORMERS[1]
    plain = _import_lococo_hf("import transformers")
    assert plain.returncode == 0, plain.stderr
    assert ("UntestedTransformersWarning" in plain.stderr) is not in_range, plain.stderr

    patched = _import_lococo_hf("import transformers\ntransformers.__version__ = '5.99.0'")
    assert patched.returncode == 0, patched.stderr
    assert patched.stderr.count("UntestedTransformersWarning") == 1, patched.stderr
    assert "transformers 5.99.0 is installed" in patched.stderr
