"""Runs the CUDA kernels of fuse_kv on the CPU (emulation.h) and checks them against the reference.

For machines without a GPU. It runs the checks of benchmarks/sanitize_case.py --verify (each
kernel path against lococo.reference: the forward in every dtype, the backward, determinism)
on the emulated kernels, on the small and odd shapes only. That covers the index math, the
selection, both forward paths and the barriers (threads run in order between barriers;
--reverse runs them backwards, so a missing barrier shows one way or the other). It cannot
see what only hardware shows: timing, bank conflicts, the real MMA register layouts and
rounding, or anything about speed.

    python csrc/cuda/emulation/check_emulated.py [--reverse]

Needs the CUDA headers (cuda_fp16.h, cuda_bf16.h) from $CUDA_HOME/include, /usr/local/cuda or
torch's nvidia wheels, but no GPU and no CUDA build. Builds into build/emulation; exit status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "benchmarks")]
warnings.filterwarnings("ignore", message="lococo: the compiled kernels")

import sanitize_case  # noqa: E402


def cuda_include_dir() -> str:
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates.append(Path("/usr/local/cuda/include"))
    candidates += sorted((Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include"))
    for path in candidates:
        if (path / "cuda_bf16.h").exists():
            return str(path)
    raise SystemExit("check_emulated: no CUDA headers (cuda_bf16.h) found; set CUDA_HOME")


def build() -> None:
    """Compiles emulated_ops.cpp into torch.ops.lococo_emu."""
    from torch.utils.cpp_extension import load

    build_dir = ROOT / "build" / "emulation"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-DLOCOCO_HOST_EMULATION", "-O1", "-Wno-unknown-pragmas", f"-I{cuda_include_dir()}"]
    load(name="lococo_emu", sources=[str(HERE / "emulated_ops.cpp"), str(ROOT / "csrc" / "fuse_kv_checks.cpp")],
         extra_cflags=flags, is_python_module=False, build_directory=str(build_dir))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reverse", action="store_true", help="run threads in reverse order between barriers")
    opts = parser.parse_args()
    if opts.reverse:
        os.environ["EMU_REVERSE"] = "1"
    build()
    rows = sanitize_case.verify(torch.ops.lococo_emu.fuse_kv, torch.ops.lococo_emu.fuse_kv_backward, "cpu",
                                model_sized=False)
    print(sanitize_case.table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
