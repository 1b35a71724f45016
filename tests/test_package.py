"""The package as users meet it: info, the fallback without the compiled library, the showcase."""

import subprocess
import sys

import lococo


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_info_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "lococo.info"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert f"lococo            {lococo.__version__}" in out
    assert "fuse_kv on cpu" in out and "fuse_kv on cuda" in out


def test_import_falls_back_to_the_reference_without_the_library():
    result = run_python(
        "import sys, warnings, torch\n"
        "sys.modules['lococo._C'] = None  # as if the build were missing\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import lococo\n"
        "assert any('falling back to the PyTorch reference' in str(w.message) for w in caught)\n"
        "assert not lococo.compiled() and lococo.kernel_devices() == []\n"
        "x = torch.randn(1, 2, 12, 8)\n"
        "k, v = lococo.fuse_kv(x, x, x[:, :, :3], x[:, :, :3], torch.rand(1, 2, 15),\n"
        "                      torch.randn(4, 16, 3), None, torch.tensor(0.5), 4)\n"
        "assert k.shape == (1, 2, 8, 8)\n"
        "try:\n"
        "    lococo.fuse_kv(x, x, x, x, torch.rand(1, 2, 3), torch.randn(4, 16, 3), None,\n"
        "                  torch.tensor(0.5), 4)\n"
        "except ValueError as e:\n"
        "    assert 'scores must be' in str(e)\n"
        "else:\n"
        "    raise AssertionError('bad scores accepted')\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_showcase_runs_and_kernel_agrees_with_reference():
    out = subprocess.run([sys.executable, "-m", "lococo.recipes.showcase", "--tokens", "300"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "at most 145 entries stored per head" in out
    if lococo.has_kernel("cpu"):
        diff = float(out.rsplit("max |diff| = ", 1)[1])
        assert diff < 1e-4
