"""Runs the CUDA kernels of fuse_kv on the CPU (emulation.h) and compares them with the reference.

For machines without a GPU: it checks the index math, the selection, the barriers (threads run
in order between barriers; --reverse runs them backwards) and both kernel paths (tensor-core
and SIMT) against ``lococo.reference``, forward in every dtype and backward in float64. It does
not check speed, memory coalescing, or anything the emulation cannot see (real warp timing,
shared-memory bank conflicts, the hardware MMA layouts).

    python csrc/cuda/emulation/check_emulated.py [--reverse] [--only generic|backward|mma]

Needs the CUDA headers (cuda_fp16.h, cuda_bf16.h): from $CUDA_HOME/include or torch's nvidia
wheels. Builds into build/emulation. Exit status 1 when a case fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "python"))
warnings.filterwarnings("ignore", message="lococo: the compiled kernels")
from lococo import reference  # noqa: E402


def cuda_include_dirs() -> list[str]:
    dirs = []
    if os.environ.get("CUDA_HOME"):
        dirs.append(Path(os.environ["CUDA_HOME"]) / "include")
    dirs.append(Path("/usr/local/cuda/include"))
    dirs += sorted((Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include"))
    found = [str(d) for d in dirs if (d / "cuda_bf16.h").exists()]
    if not found:
        raise SystemExit("check_emulated: no CUDA headers (cuda_bf16.h) found; set CUDA_HOME")
    return found[:1]


def build() -> None:
    from torch.utils.cpp_extension import load

    build_dir = ROOT / "build" / "emulation"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-DLOCOCO_HOST_EMULATION", "-O1", "-Wno-unknown-pragmas"]
    flags += [f"-I{d}" for d in cuda_include_dirs()]
    load(name="lococo_emu", sources=[str(HERE / "emulated_ops.cpp"), str(ROOT / "csrc" / "fuse_kv_checks.cpp")],
         extra_cflags=flags, is_python_module=False, build_directory=str(build_dir))


def make_inputs(b, h, la, lb, d, C, H, k, dtype, seed=0, strided=False, scores="rand", bias=True, alpha=0.5):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mem_k, mem_v = randn(b, h, la, d), randn(b, h, la, d)
    if strided:  # views of a [b, Lb, h, 3d] projection output, as in a real model
        proj = randn(b, lb, h, 3 * d)
        new_k, new_v = proj[..., :d].transpose(1, 2), proj[..., d:2 * d].transpose(1, 2)
    else:
        new_k, new_v = randn(b, h, lb, d), randn(b, h, lb, d)
    L = la + lb
    if scores == "rand":
        s = torch.rand(b, h, L, generator=g, dtype=torch.float64)
    elif scores == "ties":
        s = torch.randint(0, 3, (b, h, L), generator=g).double()
    elif scores == "nan":
        s = torch.rand(b, h, L, generator=g, dtype=torch.float64)
        s[s < 0.3] = float("nan")
        s[..., 0], s[..., 1], s[..., 2] = float("-inf"), -0.0, 0.0
    else:
        s = torch.zeros(b, h, L, dtype=torch.float64)
    weight = randn(C, 2 * d, k) * 3 / (2 * d * k) ** 0.5
    bias_t = randn(C) if bias else None
    a = torch.tensor(alpha, dtype=torch.float64)

    def cast(t):
        return None if t is None else t.to(dtype)

    return [cast(mem_k), cast(mem_v), cast(new_k), cast(new_v), s.float(), cast(weight), cast(bias_t), cast(a)]


def max_err(x, y) -> float:
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def to64(args):
    return [a.double() if a is not None else None for a in args]


def check_forward(name, args, H, l=0, valid_len=None, path="auto") -> bool:
    os.environ["LOCOCO_FUSE_KV_PATH"] = path
    dtype = args[0].dtype
    start = time.time()
    out = torch.ops.lococo_emu.fuse_kv(*args, H, l, valid_len)
    seconds = time.time() - start
    exact = reference.fuse_kv(*to64(args), H, l, valid_len)
    torch_same = reference.fuse_kv(*args, H, l, valid_len)
    err = max(max_err(o, r) for o, r in zip(out, exact))
    torch_err = max(max_err(o, r) for o, r in zip(torch_same, exact))
    nan_ok = all(torch.equal(torch.isnan(o), torch.isnan(r)) for o, r in zip(out, exact))
    if dtype == torch.float64:
        ok = err < 1e-9
    elif dtype == torch.float32:  # the CPU kernel and the reference differ by a few ulp too
        ok = err <= max(1e-5, 4 * torch_err)
    else:  # STYLE.md: at most about twice PyTorch's own error in the dtype
        ok = err <= max(2 * torch_err, 1e-6)
    ok = ok and nan_ok
    print(f"{'ok  ' if ok else 'FAIL'} forward  {name:16s} {str(dtype)[6:]:9s} {path:5s} "
          f"err {err:.2e} torch {torch_err:.2e} {seconds:5.1f}s", flush=True)
    return ok


def check_backward(name, args, H, l=0, valid_len=None) -> bool:
    os.environ["LOCOCO_FUSE_KV_PATH"] = "auto"
    args = to64(args)
    differentiable = [0, 1, 2, 3, 5, 6, 7]
    leaves = [a.clone().requires_grad_(True) if i in differentiable and a is not None else a
              for i, a in enumerate(args)]
    out = reference.fuse_kv(*leaves, H, l, valid_len)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    used = [i for i in differentiable if args[i] is not None]
    expected = torch.autograd.grad(out, [leaves[i] for i in used], grads, allow_unused=True)
    start = time.time()
    got = torch.ops.lococo_emu.fuse_kv_backward(*grads, *args, H, l, valid_len)
    seconds = time.time() - start
    got = [got[differentiable.index(i)] for i in used]
    errs = [max_err(o, torch.zeros_like(o) if e is None else e.reshape(o.shape)) for o, e in zip(got, expected)]
    ok = max(errs) < 1e-9
    print(f"{'ok  ' if ok else 'FAIL'} backward {name:16s} float64   max err {max(errs):.2e} {seconds:5.1f}s",
          flush=True)
    return ok


SMALL = dict(b=2, h=2, la=15, lb=6, d=3, C=4, H=5, k=3)
GENERIC_CASES = [
    ("small", SMALL, {}),
    ("strided", dict(SMALL, strided=True), {}),
    ("ties", dict(SMALL, scores="ties"), {}),
    ("nan_scores", dict(SMALL, scores="nan"), {}),
    ("k1", dict(SMALL, k=1), {}),
    ("L_eq_M", dict(SMALL, la=5, lb=4), {}),
    ("mem_empty", dict(SMALL, la=0, lb=12), {}),
    ("new_empty", dict(SMALL, la=12, lb=0), {}),
    ("local2", SMALL, dict(l=2)),
    ("local_all", SMALL, dict(l=5)),
    ("valid_len", SMALL, dict(valid_len=torch.tensor([21, 7]))),
    ("valid_len0", SMALL, dict(valid_len=torch.tensor([0, 9]))),
    ("rho1_alpha1", dict(SMALL, H=0, scores="zeros", alpha=1.0), {}),
    ("alpha0", dict(SMALL, alpha=0.0), {}),
    ("no_bias", dict(SMALL, bias=False), {}),
    ("long_k", dict(SMALL, la=40, lb=10, k=9), {}),
    ("many_tiles", dict(b=1, h=1, la=300, lb=20, d=2, C=3, H=7, k=5), {}),
]
MMA_CASES = [  # d % 8 == 0: the tensor-core path; several tiles, slot blocks, padding of C
    ("mma_d8", dict(b=1, h=2, la=50, lb=30, d=8, C=20, H=10, k=5), {}),
    ("mma_d16_multi", dict(b=1, h=1, la=100, lb=60, d=16, C=70, H=20, k=7, strided=True), dict(l=3)),
    ("mma_valid_nan", dict(b=2, h=1, la=90, lb=10, d=8, C=17, H=9, k=3, scores="nan"),
     dict(valid_len=torch.tensor([100, 40]))),
    ("mma_d136", dict(b=1, h=1, la=70, lb=10, d=136, C=5, H=4, k=3), {}),  # 2d > 256: 32 slots a block
    ("mma_rho1", dict(b=1, h=1, la=60, lb=20, d=8, C=40, H=0, k=21, scores="zeros", alpha=1.0), {}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reverse", action="store_true", help="run threads in reverse order between barriers")
    parser.add_argument("--only", choices=["generic", "backward", "mma"])
    opts = parser.parse_args()
    if opts.reverse:
        os.environ["EMU_REVERSE"] = "1"
    build()
    results = []
    if opts.only in (None, "generic"):
        for name, kw, extra in GENERIC_CASES:
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                results.append(check_forward(name, make_inputs(dtype=dtype, **kw), kw["H"], **extra))
    if opts.only in (None, "backward"):
        for name, kw, extra in GENERIC_CASES:
            results.append(check_backward(name, make_inputs(dtype=torch.float64, **kw), kw["H"], **extra))
    if opts.only in (None, "mma"):
        for name, kw, extra in MMA_CASES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for path in ("auto", "simt"):
                    results.append(check_forward(name, make_inputs(dtype=dtype, **kw), kw["H"], path=path, **extra))
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
