"""Without an extra, the feature that needs it says which extra to install (transformers made unimportable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lococo import extras

ROOT = Path(__file__).resolve().parent.parent

# Makes the named top-level modules unimportable, as if they were not installed: a meta-path finder
# that refuses them (and anything under them) before any other finder looks.
BLOCK = """
import sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def run_without(blocked: list[str], code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=set(blocked)) + code], capture_output=True,
                          text=True, env=env, timeout=300)


def test_lococo_imports_without_transformers_and_lococo_hf_names_the_hf_extra():
    done = run_without(["transformers"], """
import lococo, torch
from lococo import extras
assert lococo.LoCoCoCompressor and lococo.fuse_kv    # the op and the compressor need only torch
for attempt in ("import lococo.hf", "from lococo import apply_lococo", "from lococo.hf.compat import cache_kwarg"):
    try:
        exec(attempt)
    except ModuleNotFoundError as exc:
        assert isinstance(exc, extras.MissingExtraError) and exc.name == "transformers", repr(exc)
        print(attempt, "->", exc)
    else:
        raise AssertionError(attempt + " worked without transformers")
""")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert "lococo.hf needs the 'hf' extra of lococo: 'transformers' is not installed" in line
        assert "pip install 'lococo[hf]'" in line


@pytest.mark.parametrize("blocked, missing", [(["transformers"], "transformers"), (["tqdm"], "tqdm")])
def test_a_command_without_its_packages_names_the_train_extra(tmp_path, blocked, missing):
    pytest.importorskip("transformers")
    from hf_models import save_byte_level_model

    save_byte_level_model(tmp_path / "model", seed=3)
    argv = ["passkey", "--model", str(tmp_path / "model"), "--methods", "full", "-M", "16", "--lengths", "200",
            "--depths", "0", "--trials", "1", "--output", str(tmp_path / "out"), "--no-progress"]
    done = run_without(blocked, f"from lococo.recipes import cli\nraise SystemExit(cli.main({argv!r}))")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"lococo passkey: error: lococo passkey needs the 'train' extra of lococo: {missing!r} is not installed. "
        "Install it with: pip install 'lococo[train]' (from a wheel file: pip install '<the .whl file>[train]')")


def test_the_command_line_itself_needs_no_extra():
    done = run_without(["transformers", "tqdm", "matplotlib", "peft", "safetensors", "accelerate"], """
from lococo.recipes import cli
for argv in (["--version"], ["passkey", "--help"], ["eval", "--help"]):
    try:
        cli.main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
""")
    assert done.returncode == 0, done.stderr
    assert "usage: lococo passkey" in done.stdout and "usage: lococo eval" in done.stdout


def test_an_error_that_is_not_a_missing_extra_is_left_alone():
    assert extras.missing_extra(ModuleNotFoundError("No module named 'nothing'", name="nothing"), "x") is None
    assert extras.missing_extra(ImportError("cannot import name 'y'", name="transformers"), "x") is None
    error = extras.missing_extra(ModuleNotFoundError("", name="transformers.models.llama"), "lococo eval", "train")
    assert error.extra == "train" and error.name == "transformers"
    again = extras.missing_extra(extras.MissingExtraError("lococo.hf", "transformers", "hf"), "lococo eval", "train")
    assert again.extra == "train" and "lococo eval needs the 'train' extra" in str(again)


def test_pyproject_extras_are_the_ones_named_and_allow_the_tested_transformers():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(optional) == set(extras.EXTRAS)
    (first_major, first_minor), (last_major, last_minor) = extras.TESTED_TRANSFORMERS
    pin = f"transformers>={first_major}.{first_minor},<{last_major}.{last_minor + 1}"
    assert pin == "transformers>=5.17,<5.26"
    assert pin in optional["hf"] and pin in optional["train"]
    assert pin in (ROOT / "requirements-dev.txt").read_text().splitlines()
    names = {extra: {req.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for req in reqs}
             for extra, reqs in optional.items()}
    assert names["hf"] <= names["train"]            # train includes hf
    for module, extra in extras.MODULE_EXTRA.items():
        assert module in names[extra], (module, extra)
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):]
    install = install[:install.index("\n## ", 1)]
    for extra in extras.EXTRAS:
        assert f"[{extra}]" in install, extra
