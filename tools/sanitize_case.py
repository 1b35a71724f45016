"""Small fuse_kv cases for the CUDA kernels: a run for compute-sanitizer, and a verification.

    python tools/sanitize_case.py                 # forward + backward on every kernel path
    python tools/sanitize_case.py --verify [--out FILE]

The default run is small on purpose: compute-sanitizer (memcheck, racecheck, synccheck) runs
it under instrumentation, which is slow. It covers the selection, the tensor-core forward
(bf16, fp16 and fp32 through 3xTF32), the SIMT forward (float64, and fp32 forced with
LOCOCO_CUDA_PATH=simt), and the backward, with left padding (valid_len) and a local window.

--verify compares each kernel path with the float64 reference over the edge, tensor-core and
model-sized cases of lococo.ops.testing, by its rule (at most twice PyTorch's own error in the
tested dtype): the forward in every dtype, the backward against the reference's autograd, and
bitwise determinism. It prints a markdown table (also written to --out) and exits 1 if a check
fails. tools/emulator/check_emulated.py runs the same checks on the CPU emulation of the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lococo.ops.testing import (
    DIFF_ARGS,
    EDGE_CASES,
    MMA_CASES,
    MODEL_CASES,
    Case,
    compare_backward,
    compare_forward,
    make_args,
)


@contextlib.contextmanager
def kernel_path(path: str):
    """Selects the CUDA forward path through LOCOCO_CUDA_PATH for the duration of the block."""
    old = os.environ.get("LOCOCO_CUDA_PATH")
    os.environ["LOCOCO_CUDA_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOCOCO_CUDA_PATH")
        else:
            os.environ["LOCOCO_CUDA_PATH"] = old


@dataclass
class Row:
    check: str
    case: str
    dtype: str
    path: str
    err: float
    torch_err: float
    ok: bool
    seconds: float
    detail: str = ""


def _timed(fn, device):
    start = time.perf_counter()
    result = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def check_forward(fuse, case: Case, dtype, device, path: str) -> Row:
    args = make_args(case, device, dtype)
    with kernel_path(path):
        got, seconds = _timed(lambda: fuse(*args), device)
    result = compare_forward(got, args)
    return Row("forward", case.name, str(dtype)[6:], path, result.error, result.torch_error, result.ok, seconds,
               result.detail)


def check_backward(fuse_backward, case: Case, dtype, device, path: str) -> Row:
    """Gradients of all seven differentiable inputs against the float64 reference's autograd."""
    args = make_args(case, device, dtype)
    g = torch.Generator().manual_seed(1)
    grad_out = [torch.randn(case.slots(), generator=g).to(device, dtype) for _ in range(2)]
    with kernel_path(path):
        got_all, seconds = _timed(lambda: fuse_backward(*grad_out, *args), device)
    got = [got_all[DIFF_ARGS.index(i)] for i in DIFF_ARGS if args[i] is not None]
    result = compare_backward(got, args, grad_out)
    return Row("backward", case.name, str(dtype)[6:], path, result.error, result.torch_error, result.ok, seconds,
               result.detail)


def check_deterministic(fuse, fuse_backward, case: Case, dtype, device, path: str) -> Row:
    args = make_args(case, device, dtype)
    slots = case.slots()
    grads = [torch.ones(slots, dtype=dtype, device=device), torch.full(slots, 0.5, dtype=dtype, device=device)]
    runs = []
    start = time.perf_counter()
    with kernel_path(path):
        for _ in range(2):
            runs.append([*fuse(*args), *fuse_backward(*grads, *args)])
    seconds = time.perf_counter() - start
    ok = all(torch.equal(a, b) for a, b in zip(*runs))
    return Row("deterministic", case.name, str(dtype)[6:], path, 0.0, 0.0, ok, seconds)


def verify(fuse, fuse_backward, device, model_sized: bool = True, cases=None, dtypes=None):
    """Yields one Row per check, as each finishes. `cases` (names) and `dtypes` narrow the checks."""
    dtypes = dtypes or (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    chosen = [c for c in EDGE_CASES + MMA_CASES + (MODEL_CASES if model_sized else [])
              if cases is None or c.name in cases]

    def paths(case, dtype):
        mma = case.d % 8 == 0 and case.num_fused > 0 and dtype != torch.float64
        return ["simt"] + (["mma"] if mma else [])

    for case in chosen:
        for dtype in dtypes:
            for path in paths(case, dtype):
                yield check_forward(fuse, case, dtype, device, path)
    for case in chosen:
        if case.nonfinite or case.name == MODEL_CASES[-1].name:  # gradients of inf / NaN are not compared
            continue
        for dtype in dtypes:
            for path in paths(case, dtype):
                yield check_backward(fuse_backward, case, dtype, device, path)
    det = MODEL_CASES[0] if model_sized else MMA_CASES[0]
    for dtype, path in ((torch.bfloat16, "mma"), (torch.float32, "mma"), (torch.float32, "simt")):
        if dtype in dtypes:
            yield check_deterministic(fuse, fuse_backward, det, dtype, device, path)


def table(rows: list[Row]) -> str:
    lines = ["| check | case | dtype | path | error | torch's own error | ok | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.case} | {r.dtype} | {r.path} | {r.err:.2e} | {r.torch_err:.2e} | "
              f"{'yes' if r.ok else '**NO** ' + r.detail} | {r.seconds:.3f} |" for r in rows]
    failed = sum(not r.ok for r in rows)
    lines.append("")
    lines.append(f"{len(rows) - failed} of {len(rows)} checks passed")
    return "\n".join(lines)


def sanitize_run(device) -> None:
    """One forward and backward per kernel path on small inputs (for compute-sanitizer)."""
    fuse, fuse_backward = torch.ops.lococo.fuse_kv, torch.ops.lococo.fuse_kv_backward
    case = Case(2, 2, 70, 13, 16, 20, 9, 5, num_local=2, layout="strided", valid_len=(83, 40), name="sanitize")
    runs = [(torch.bfloat16, "mma"), (torch.float16, "mma"), (torch.float32, "mma"),
            (torch.float32, "simt"), (torch.float64, "simt")]
    for dtype, path in runs:
        args = make_args(case, device, dtype)
        slots = case.slots()
        with kernel_path(path):
            k, v = fuse(*args)
            fuse_backward(torch.ones(slots, dtype=dtype, device=device), torch.ones(slots, dtype=dtype, device=device),
                          *args)
        torch.cuda.synchronize()
        print(f"sanitize case: {str(dtype)[6:]} {path} ok, |k| = {k.float().abs().sum().item():.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", action="store_true", help="compare every kernel path with the reference")
    parser.add_argument("--out", type=Path, help="write the verification table here (markdown)")
    opts = parser.parse_args(argv)
    import lococo

    if not torch.cuda.is_available() or not lococo.has_kernel("cuda"):
        print(f"sanitize_case: needs a GPU and the CUDA kernels (kernels on {lococo.kernel_devices()})")
        return 1
    if not opts.verify:
        sanitize_run("cuda")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    header = f"{torch.cuda.get_device_name()}; torch {torch.__version__}; lococo {lococo.__version__}\n\n"
    rows = []
    for row in verify(torch.ops.lococo.fuse_kv, torch.ops.lococo.fuse_kv_backward, "cuda"):
        rows.append(row)
        print(table([row]).splitlines()[2], flush=True)
        if opts.out:  # rewritten after every check: a run cut short keeps what it checked
            opts.out.parent.mkdir(parents=True, exist_ok=True)
            opts.out.write_text(header + table(rows) + "\n")
    print(table(rows).splitlines()[-1])
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
