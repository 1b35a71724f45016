"""Small fuse_kv cases for the CUDA kernels: a run for compute-sanitizer, and a verification.

    python benchmarks/sanitize_case.py                 # forward + backward on every kernel path
    python benchmarks/sanitize_case.py --verify [--out FILE]

The default run is small on purpose: compute-sanitizer (memcheck, racecheck, synccheck) runs
it under instrumentation, which is slow. It covers the selection, the tensor-core forward
(bf16, fp16 and fp32 through 3xTF32), the SIMT forward (float64, and fp32 forced with
LOCOCO_CUDA_PATH=simt), and the backward, with left padding (valid_len) and a local window.

--verify compares each kernel path with lococo.reference over odd shapes and model-sized
ones: the forward in every dtype (fp32/fp64 against the float64 reference, fp16/bf16 by the
rule of STYLE.md: at most twice PyTorch's own error in that dtype), the backward against the
reference's autograd, and bitwise determinism. It prints a markdown table (also written to
--out) and exits 1 if a check fails. csrc/cuda/emulation/check_emulated.py runs the same
checks on the CPU emulation of the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lococo import reference


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    mem_len: int
    new_len: int
    d: int
    num_fused: int
    num_heavy: int
    kernel: int
    num_local: int = 0
    alpha: float = 0.5
    bias: bool = True
    strided: bool = False
    scores: str = "rand"  # rand, ties, nan, zeros
    valid_len: tuple[int, ...] | None = None
    weight_scale: float = 3.0  # weight std times sqrt(2d k): ~3 gives peaked but finite softmaxes
    nonfinite: bool = False  # a NaN in the memory keys and an inf in the new keys


def make_args(case: Case, dtype: torch.dtype, device, seed: int = 0) -> list:
    """Positional arguments of fuse_kv for `case` (new entries as views of a projection if strided)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b, h, la, lb, d = case.batch, case.heads, case.mem_len, case.new_len, case.d
    mem_k, mem_v = randn(b, h, la, d), randn(b, h, la, d)
    if case.nonfinite:
        mem_k[0, 0, la // 2, d - 1] = float("nan")
        mem_k[0, -1, 0, 0] = float("-inf")
    if case.strided:
        proj = randn(b, lb, h, 3 * d)
        new_k, new_v = proj[..., :d].transpose(1, 2), proj[..., d:2 * d].transpose(1, 2)
    else:
        new_k, new_v = randn(b, h, lb, d), randn(b, h, lb, d)
    if case.nonfinite and lb > 0:
        new_k[0, -1, lb // 2, 0] = float("inf")
    L = la + lb
    if case.scores == "ties":
        scores = torch.randint(0, 3, (b, h, L), generator=g).double()
    elif case.scores == "zeros":
        scores = torch.zeros(b, h, L, dtype=torch.float64)
    else:
        scores = torch.rand(b, h, L, generator=g, dtype=torch.float64)
        if case.scores == "nan":
            scores[scores < 0.3] = float("nan")
            scores[..., 0], scores[..., 1], scores[..., 2] = float("-inf"), -0.0, 0.0
    weight = randn(case.num_fused, 2 * d, case.kernel) * case.weight_scale / (2 * d * case.kernel) ** 0.5
    bias = randn(case.num_fused) if case.bias else None
    alpha = torch.tensor(case.alpha, dtype=torch.float64)

    def put(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    if case.strided:  # views of the projection on the device, not copies
        proj = put(proj)
        new_k, new_v = proj[..., :d].transpose(1, 2), proj[..., d:2 * d].transpose(1, 2)
    else:
        new_k, new_v = put(new_k), put(new_v)
    valid_len = None if case.valid_len is None else torch.tensor(case.valid_len, device=device)
    return [put(mem_k), put(mem_v), new_k, new_v, scores.float().to(device), put(weight), put(bias), put(alpha),
            case.num_heavy, case.num_local, valid_len]


def upcast(args, dtype=torch.float64) -> list:
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def max_err(got, want) -> float:
    """Largest absolute difference; equal infinities and NaN against NaN count as equal."""
    if got.numel() == 0:
        return 0.0
    g, w = got.double(), want.double()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    return (g - w).abs().masked_fill(same, 0).nan_to_num(nan=float("inf")).max().item()


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


def check_forward(fuse, case: Case, dtype, device, path: str) -> Row:
    args = make_args(case, dtype, device)
    start = time.perf_counter()
    with kernel_path(path):
        got = fuse(*args)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    exact = reference.fuse_kv(*upcast(args))
    own = reference.fuse_kv(*args)
    err = max(max_err(g, e) for g, e in zip(got, exact))
    torch_err = max(max_err(o, e) for o, e in zip(own, exact))
    nan_ok = all(torch.equal(torch.isnan(g), torch.isnan(e)) for g, e in zip(got, exact))
    if dtype == torch.float64:
        ok = err <= 1e-9
    elif dtype == torch.float32:  # the test suite's bound: atol 1e-5 plus rtol 1e-5
        scale = max((e.abs().nan_to_num(posinf=0).max().item() if e.numel() else 0.0) for e in exact)
        ok = err <= 1e-5 * (1 + scale)
    else:
        ok = err <= 2 * torch_err + 1e-6
    return Row("forward", case.name, str(dtype)[6:], path, err, torch_err, ok and nan_ok, seconds)


def check_backward(fuse_backward, case: Case, dtype, device, path: str) -> Row:
    """Gradients of all seven differentiable inputs against the reference's autograd.

    Errors are relative to the largest gradient entry. float64 must agree to 1e-9, fp32 to
    1e-4 (the test suite's bound) or four times the reference's own error in fp32, fp16 and
    bf16 to twice the reference's own error in that dtype.
    """
    args = make_args(case, dtype, device)
    g = torch.Generator().manual_seed(1)
    slots = (case.batch, case.heads, case.num_heavy + case.num_fused, case.d)
    grad_out = [torch.randn(slots, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    diff = [i for i in (0, 1, 2, 3, 5, 6, 7) if args[i] is not None]

    def reference_grads(inputs):
        leaves = [a.detach().clone().requires_grad_(i in diff) if isinstance(a, torch.Tensor) else a
                  for i, a in enumerate(inputs)]
        out = reference.fuse_kv(*leaves)
        grads = torch.autograd.grad(out, [leaves[i] for i in diff], [x.to(out[0].dtype) for x in grad_out],
                                    allow_unused=True)
        return [torch.zeros_like(leaves[i]) if gr is None else gr for i, gr in zip(diff, grads)]

    exact = reference_grads(upcast(args))
    own = reference_grads(args)
    start = time.perf_counter()
    with kernel_path(path):
        got_all = fuse_backward(*[x.to(dtype) for x in grad_out], *args)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    got = [got_all[(0, 1, 2, 3, 5, 6, 7).index(i)] for i in diff]
    err = torch_err = 0.0
    for o, e, s in zip(got, exact, own):
        scale = max(e.abs().max().item(), 1e-30) if e.numel() else 1.0
        err = max(err, max_err(o, e.reshape(o.shape)) / scale)
        torch_err = max(torch_err, max_err(s, e) / scale)
    if dtype == torch.float64:
        ok = err <= 1e-9
    elif dtype == torch.float32:  # the test suite allows 1e-4
        ok = err <= max(1e-4, 4 * torch_err)
    else:
        ok = err <= 2 * torch_err + 1e-3
    return Row("backward", case.name, str(dtype)[6:], path, err, torch_err, ok, seconds)


def check_deterministic(fuse, fuse_backward, case: Case, dtype, device, path: str) -> Row:
    args = make_args(case, dtype, device)
    slots = (case.batch, case.heads, case.num_heavy + case.num_fused, case.d)
    grads = [torch.ones(slots, dtype=dtype, device=device), torch.full(slots, 0.5, dtype=dtype, device=device)]
    runs = []
    start = time.perf_counter()
    with kernel_path(path):
        for _ in range(2):
            runs.append([*fuse(*args), *fuse_backward(*grads, *args)])
    seconds = time.perf_counter() - start
    ok = all(torch.equal(a, b) for a, b in zip(*runs))
    return Row("deterministic", case.name, str(dtype)[6:], path, 0.0, 0.0, ok, seconds)


SMALL = Case("small", 2, 2, 15, 6, 3, 4, 5, 3)
ODD_CASES = [
    SMALL,
    replace(SMALL, name="strided", strided=True),
    replace(SMALL, name="ties", scores="ties"),
    replace(SMALL, name="nan_scores", scores="nan"),
    replace(SMALL, name="k1", kernel=1),
    replace(SMALL, name="L_eq_M", mem_len=5, new_len=4),
    replace(SMALL, name="mem_empty", mem_len=0, new_len=12),
    replace(SMALL, name="new_empty", mem_len=12, new_len=0),
    replace(SMALL, name="local2", num_local=2),
    replace(SMALL, name="local_all", num_local=5),
    replace(SMALL, name="valid_len", valid_len=(21, 7)),
    replace(SMALL, name="valid_len0", valid_len=(0, 9)),
    replace(SMALL, name="rho1_alpha1", num_heavy=0, scores="zeros", alpha=1.0),
    replace(SMALL, name="alpha0", alpha=0.0),
    replace(SMALL, name="no_bias", bias=False),
    replace(SMALL, name="C0", num_fused=0),
    replace(SMALL, name="nonfinite", nonfinite=True),
    replace(SMALL, name="long_k", mem_len=40, new_len=10, kernel=9),
    Case("many_tiles", 1, 1, 300, 20, 2, 3, 7, 5),
]
MMA_CASES = [  # d % 8 == 0: the tensor-core forward; several tiles and slot blocks, C padded
    Case("mma_d8", 1, 2, 50, 30, 8, 20, 10, 5),
    Case("mma_d16_multi", 1, 1, 100, 60, 16, 70, 20, 7, num_local=3, strided=True),
    Case("mma_valid_nan", 2, 1, 90, 10, 8, 17, 9, 3, scores="nan", valid_len=(100, 40)),
    Case("mma_d136", 1, 1, 70, 10, 136, 5, 4, 3),  # 2d > 256: 32 slots per block
    Case("mma_rho1", 1, 1, 60, 20, 8, 40, 0, 21, scores="zeros", alpha=1.0),
    Case("mma_nonfinite", 2, 2, 40, 10, 8, 6, 6, 5, nonfinite=True),
]
MODEL_CASES = [  # model-sized: GPU only (slow in the CPU emulation)
    Case("smollm2_decode", 2, 3, 145, 0, 64, 64, 64, 21, strided=True, valid_len=(145, 90)),
    Case("llama_prefill", 1, 4, 512, 256, 128, 256, 256, 21, strided=True),
    Case("d256_k63", 1, 2, 300, 40, 256, 96, 100, 63),
]


def verify(fuse, fuse_backward, device, model_sized: bool = True) -> list[Row]:
    rows = []
    mma_ok = lambda c: c.d % 8 == 0 and c.num_fused > 0  # noqa: E731
    cases = ODD_CASES + MMA_CASES + (MODEL_CASES if model_sized else [])
    for case in cases:
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            paths = ["simt"] + (["mma"] if mma_ok(case) and dtype != torch.float64 else [])
            for path in paths:
                rows.append(check_forward(fuse, case, dtype, device, path))
    for case in ODD_CASES + MMA_CASES + (MODEL_CASES[:2] if model_sized else []):
        if case.nonfinite:  # the forward's inf / NaN pattern is checked; gradients are not
            continue
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            paths = ["simt"] + (["mma"] if mma_ok(case) and dtype != torch.float64 else [])
            for path in paths:
                rows.append(check_backward(fuse_backward, case, dtype, device, path))
    det = MODEL_CASES[0] if model_sized else MMA_CASES[0]
    for dtype, path in ((torch.bfloat16, "mma"), (torch.float32, "mma"), (torch.float32, "simt")):
        rows.append(check_deterministic(fuse, fuse_backward, det, dtype, device, path))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| check | case | dtype | path | error | torch's own error | ok | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.case} | {r.dtype} | {r.path} | {r.err:.2e} | {r.torch_err:.2e} | "
              f"{'yes' if r.ok else '**NO**'} | {r.seconds:.3f} |" for r in rows]
    failed = sum(not r.ok for r in rows)
    lines.append("")
    lines.append(f"{len(rows) - failed} of {len(rows)} checks passed")
    return "\n".join(lines)


def sanitize_run(device) -> None:
    """One forward and backward per kernel path on small inputs (for compute-sanitizer)."""
    fuse, fuse_backward = torch.ops.lococo.fuse_kv, torch.ops.lococo.fuse_kv_backward
    case = Case("sanitize", 2, 2, 70, 13, 16, 20, 9, 5, num_local=2, strided=True, valid_len=(83, 40))
    runs = [(torch.bfloat16, "mma"), (torch.float16, "mma"), (torch.float32, "mma"),
            (torch.float32, "simt"), (torch.float64, "simt")]
    for dtype, path in runs:
        args = make_args(case, dtype, device)
        slots = (case.batch, case.heads, case.num_heavy + case.num_fused, case.d)
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
    rows = verify(torch.ops.lococo.fuse_kv, torch.ops.lococo.fuse_kv_backward, "cuda")
    text = f"{torch.cuda.get_device_name()}; torch {torch.__version__}; lococo {lococo.__version__}\n\n" + table(rows)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(text + "\n")
    print(text)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
