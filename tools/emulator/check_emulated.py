"""Runs the CUDA kernels of fuse_kv on the CPU (emulation.h) and checks them against the reference.

For machines without a GPU. It runs the checks of tools/sanitize_case.py --verify (each kernel
path against the float64 reference by the rule of lococo.ops.testing: the forward in every
dtype, the backward, determinism) on the emulated kernels, on the edge and tensor-core cases
(not the model-sized ones). That covers the index math, the selection, both forward paths
and the barriers (threads run in order between barriers; --reverse runs them backwards, so a
missing barrier shows one way or the other). It cannot see what only hardware shows: timing,
bank conflicts, the real MMA register layouts and rounding, or anything about speed.

    python tools/emulator/check_emulated.py [--reverse] [--fast]

--fast is the subset `make test` runs: every kernel and path once, in float32 and bfloat16, on
a few cases. Needs the CUDA headers (cuda_fp16.h, cuda_bf16.h) from $CUDA_HOME/include,
/usr/local/cuda or torch's nvidia wheels, but no GPU and no CUDA build. Builds into
build/emulator; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tools")]
warnings.filterwarnings("ignore", message="lococo: the compiled kernels")

from lococo.ops.testing import MMA_CASES, compare_forward, make_args  # noqa: E402

import sanitize_case  # noqa: E402

FAST_CASES = ("small", "ties", "valid_len", "local2", "nonfinite", "many_tiles", "mma_d8", "mma_valid_nan",
              "mma_d16_multi")


def cuda_include_dir() -> str:
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates.append(Path("/usr/local/cuda/include"))
    candidates += sorted((Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include"))
    for path in candidates:
        if (path / "cuda_bf16.h").exists():
            return str(path)
    raise SystemExit("check_emulated: no CUDA headers (cuda_bf16.h) found; set CUDA_HOME")


def build() -> None:
    """Compiles emulated_ops.cpp into torch.ops.lococo_emu (once; later runs reuse the build)."""
    from torch.utils.cpp_extension import load

    build_dir = ROOT / "build" / "emulator"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O1", "-Wno-unknown-pragmas", "-Wno-attributes", f"-I{ROOT / 'csrc'}", f"-I{cuda_include_dir()}"]
    load(name="lococo_emu", sources=[str(HERE / "emulated_ops.cpp"), str(ROOT / "csrc" / "fuse_kv_checks.cpp")],
         extra_cflags=flags, is_python_module=False, build_directory=str(build_dir))


def limit_check() -> sanitize_case.Row:
    """2^31 entries (stride-0 views: no memory) exceed the kernels' 32-bit positions: a ValueError."""
    L = 2**31
    entries = torch.zeros(1, 1, 1, 1).expand(1, 1, L, 1)
    empty = torch.zeros(1, 1, 0, 1)
    try:
        torch.ops.lococo_emu.fuse_kv(entries, entries, empty, empty, torch.zeros(1).expand(1, 1, L),
                                     torch.zeros(1, 2, 1), None, torch.tensor(0.5), 1, 0, None)
        ok, detail = False, "no error"
    except ValueError as error:
        ok, detail = "32-bit integers" in str(error), str(error).splitlines()[0]
    except Exception as error:  # the wrong kind of error is what this check reports
        ok, detail = False, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return sanitize_case.Row("32-bit limit", "2^31 entries", "float32", "-", 0.0, 0.0, ok, 0.0, detail)


def weight_update_check() -> sanitize_case.Row:
    """The launcher keeps rearranged weights between calls: an in-place update must be seen."""
    case = MMA_CASES[0]
    args = make_args(case, "cpu", torch.bfloat16)
    torch.ops.lococo_emu.fuse_kv(*args)
    args[5].mul_(-1.5)
    result = compare_forward(torch.ops.lococo_emu.fuse_kv(*args), args)
    return sanitize_case.Row("weight update", case.name, "bfloat16", "mma", result.error, result.torch_error,
                             result.ok, 0.0, result.detail)


def unsplit_forward_checks(fast: bool):
    """The tensor-core forward with one block per slot group (EMU_SM_COUNT=1): by default the
    emulated GPU has 132 multiprocessors, so these small cases split their positions."""
    os.environ["EMU_SM_COUNT"] = "1"
    try:
        for case in MMA_CASES:
            for dtype in (torch.float32, torch.bfloat16) if fast else (torch.float32, torch.bfloat16, torch.float16):
                row = sanitize_case.check_forward(torch.ops.lococo_emu.fuse_kv, case, dtype, "cpu", "mma")
                row.check = "forward, unsplit"
                yield row
    finally:
        del os.environ["EMU_SM_COUNT"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reverse", action="store_true", help="run threads in reverse order between barriers")
    parser.add_argument("--fast", action="store_true", help="the subset of `make test`")
    opts = parser.parse_args(argv)
    if opts.reverse:
        os.environ["EMU_REVERSE"] = "1"
    build()
    checks = sanitize_case.verify(torch.ops.lococo_emu.fuse_kv, torch.ops.lococo_emu.fuse_kv_backward, "cpu",
                                  model_sized=False,
                                  cases=FAST_CASES if opts.fast else None,
                                  dtypes=(torch.float32, torch.bfloat16) if opts.fast else None)
    rows = []
    for row in itertools.chain([limit_check(), weight_update_check()], checks, unsplit_forward_checks(opts.fast)):
        rows.append(row)
        print(sanitize_case.table([row]).splitlines()[2], flush=True)
    print(sanitize_case.table(rows).splitlines()[-1])
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
