"""Writes the console scripts of pyproject.toml's [project.scripts] into a virtual environment's bin folder.

`scripts/setup.sh` puts the source tree on the path with a .pth file instead of `pip install -e`
(which would rebuild the extension every time), so pip never writes the entry points; this does,
from the same table, so that `.venv/bin/lococo` works like an installed package's.

    python scripts/install_entry_points.py [--bin DIR]   (default: the bin folder of this interpreter)
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """#!{python}
# Written by scripts/install_entry_points.py from pyproject.toml ([project.scripts] {name}).
import sys

from {module} import {function}

if __name__ == "__main__":
    sys.exit({function}())
"""


def console_scripts(pyproject: Path) -> dict[str, str]:
    """name -> "module:function" from [project.scripts]."""
    text = pyproject.read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the one flat table by hand
        table = re.search(r"^\[project\.scripts\]\s*\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
        pairs = re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', table.group(1) if table else "", re.M)
        return dict(pairs)
    return dict(tomllib.loads(text).get("project", {}).get("scripts", {}))


def install(bin_dir: Path, python: str) -> list[Path]:
    written = []
    for name, target in console_scripts(ROOT / "pyproject.toml").items():
        module, _, function = target.partition(":")
        path = bin_dir / name
        path.write_text(SCRIPT.format(python=python, name=name, module=module, function=function))
        path.chmod(0o755)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", type=Path, default=Path(sysconfig.get_path("scripts")),
                        help="where to write the scripts (default: this interpreter's bin folder)")
    args = parser.parse_args(argv)
    for path in install(args.bin, sys.executable):
        print(f"setup: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
