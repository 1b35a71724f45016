"""`python -m lococo.info`: what this build of lococo contains and what it can run on.

Versions (lococo, Python, torch and its CUDA, transformers), the ranges lococo is tested with,
which extras are installed, the kernels, the compressors and budget files shipped in the package,
and the assets of the `lococo` command (the model and the documents that `lococo assets fetch`
caches; `lococo assets status` has the details). Imports neither transformers nor the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
from pathlib import Path

import torch

from . import __version__
from .compressor import CONFIG_FILE, PRETRAINED_DIR
from .extras import (
    EXTRAS,
    MODULE_EXTRA,
    TESTED_TRANSFORMERS,
    install_command,
    installed_version,
    tested_transformers_text,
)
from .ops import library as _library


def _built_against() -> tuple[str | None, str | None]:
    """(the torch version this build was compiled against, its CUDA variant label), from _version.py."""
    try:
        from . import _version
    except ImportError:   # a source tree that was never built
        return None, None
    return getattr(_version, "torch_version", None), getattr(_version, "cuda_variant", None)


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def transformers_status() -> str:
    """The installed transformers and whether it is in the tested range."""
    version = installed_version("transformers")
    if version is None:
        return f"not installed (the hf extra: {install_command('hf')})"
    try:
        from packaging.version import Version

        major_minor = (Version(version).release + (0,))[:2]
    except Exception:   # packaging absent or an unreadable version
        return f"{version} (untested: cannot read it)"
    tested = TESTED_TRANSFORMERS[0] <= major_minor <= TESTED_TRANSFORMERS[1]
    return f"{version} ({'tested' if tested else 'untested: lococo warns on import'})"


def extras_status() -> dict[str, str]:
    """Each extra: installed, or which of its modules are missing (found without importing them)."""
    out = {}
    for extra in EXTRAS:
        modules = [m for m, e in MODULE_EXTRA.items() if e == extra or (extra == "train" and e == "hf")]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        out[extra] = "installed" if not missing else f"missing {', '.join(missing)} ({install_command(extra)})"
    return out


def _budget_summary(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
        slots = data.get("num_slots") if isinstance(data, dict) else None
        if isinstance(slots, list) and slots and all(isinstance(s, int) for s in slots):
            return f"{len(slots)} layers, M from {min(slots)} to {max(slots)} (mean {sum(slots) / len(slots):g})"
    except (OSError, ValueError):
        return "unreadable"
    return "budget file"


def shipped(folder: Path | None = None) -> dict[str, dict]:
    """The compressors shipped in lococo/pretrained/ (M, model) and the budget files (*budgets*.json) there.

    The compressors are the folders that ``LoCoCoCompressor.from_pretrained`` takes by name.
    """
    folder = PRETRAINED_DIR if folder is None else Path(folder)
    compressors = {}
    for name in sorted(p.name for p in folder.glob("*") if (p / CONFIG_FILE).is_file()):
        try:
            meta = json.loads((folder / name / CONFIG_FILE).read_text())
            config, model = meta["config"], meta["model"]
            windowed = len(model.get("windowed_layers", []))
            compressed = f" ({model['num_layers'] - windowed} compressed)" if windowed else ""
            compressors[name] = (f"M = {config['num_slots']}, B = {config['chunk_size']}, for {model['model_type']} "
                                 f"with {model['num_layers']} layers{compressed}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            compressors[name] = f"unreadable ({exc})"
    budgets = {}
    for path in sorted(folder.glob("*/*.json")):
        if "budget" in path.name or path.parent.name == "budgets":
            budgets[str(path.relative_to(folder))] = _budget_summary(path)
    return {"compressors": compressors, "budgets": budgets}


def assets_status(cache: str | None = None) -> dict[str, str]:
    """The `lococo assets status` report (its cheap check, no checksums), one line per asset."""
    from .recipes import assets

    try:
        report = assets.status(cache)
    except Exception as exc:   # an unreadable cache must not stop the rest of the report
        return {"cache": f"unreadable ({exc})"}
    out = {"cache": report.get("cache", "?")}
    for name, entry in report.items():
        if not isinstance(entry, dict):
            continue
        if not entry.get("ok"):
            only = f" --only {name}" if entry.get("optional") else ""
            out[name] = f"{'not fetched' if only else 'missing'} ({assets.FETCH_COMMAND}{only})"
        elif "documents" in entry:
            out[name] = f"ok ({entry['documents']} documents, version {entry.get('version', '?')})"
        else:
            out[name] = f"ok ({entry.get('path', '')})" if entry.get("path") else "ok"
    return out


def collect(*, assets_dir: str | None = None, with_assets: bool = True) -> dict:
    built_torch, variant = _built_against()
    info = {
        "lococo": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "GPU": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "transformers": transformers_status(),
        "tested with": f"transformers {tested_transformers_text()}",
        "built against": "-" if built_torch is None else (
            f"torch {built_torch} (the {variant or 'cpu'} build; its library needs torch {_minor(built_torch)}.x"
            + ("" if _minor(built_torch) == _minor(torch.__version__) else
               f", not this torch {torch.__version__}: it may not load") + ")"),
        "compiled library": "loaded" if _library.compiled() else f"missing ({_library.load_error()})",
    }
    if _library.compiled():
        from . import _C

        info["built with CUDA"] = _C.built_with_cuda()
        info["CUDA archs"] = _C.cuda_archs() or "-"
        info["compiler"] = _C.compiler()
    for device in ("cpu", "cuda"):
        info[f"fuse_kv on {device}"] = ("compiled kernel" if _library.has_kernel(device)
                                        else "PyTorch reference (fallback)")
    info["extras"] = extras_status()
    info.update(shipped())
    if with_assets:
        info["assets"] = assets_status(assets_dir)
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lococo.info", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="one line")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.add_argument("--assets-dir", default=None, metavar="DIR",
                        help="the assets cache to report on (default: $LOCOCO_CACHE, else ~/.cache/lococo)")
    parser.add_argument("--no-assets", action="store_true", help="leave out the assets")
    args = parser.parse_args(argv)
    if args.short:
        print("lococo", __version__, "| torch", torch.__version__, "| transformers",
              installed_version("transformers") or "-", "| kernels:", ", ".join(_library.kernel_devices()) or "none")
        return
    info = collect(assets_dir=args.assets_dir, with_assets=not args.no_assets)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    plain = {key: value for key, value in info.items() if not isinstance(value, dict)}
    width = max(map(len, plain))
    for key, value in info.items():   # the sections (dicts) indented, each with its own column
        if not isinstance(value, dict):
            print(f"{key:<{width}}  {value}")
        elif not value:
            print(f"{key + ':':<{width}}  none")
        else:
            print(f"{key}:")
            inner = max(map(len, value))
            for name, text in value.items():
                print(f"  {name:<{inner}}  {text}")


if __name__ == "__main__":
    main()
