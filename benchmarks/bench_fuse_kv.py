"""Microbenchmark of fuse_kv: PyTorch reference (eager and torch.compile) against the op.

Shapes are the ones the cache sees: decode (the M slots plus beta + 1 = 17 new entries) and
prefill (the M slots plus a chunk of B), for SmolLM2-135M (3 KV heads, d 64, M = B = 128) and
Llama-2-7B (32 KV heads, d 128, M = B = 512), kernel 21, rho 0.5. Every provider is checked
against the fp32 reference before it is timed; times are medians with p20/p80 over warmed-up
repeats, taken side by side in one run. Writes CSV and markdown under --out.

    python benchmarks/bench_fuse_kv.py [--device cpu|cuda] [--dtype float32 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lococo
from lococo import reference

KERNEL = 21


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    d: int
    slots: int     # M
    new_len: int   # 17 at decode, B at prefill

    @property
    def fused(self) -> int:
        return self.slots // 2

    def score_flops(self) -> int:
        """Multiply-adds x 2 of the convolution scores: C x 2d x k per position of the rest."""
        rest = self.slots + self.new_len - (self.slots - self.fused)
        return 2 * self.heads * self.fused * 2 * self.d * KERNEL * rest


SHAPES = [
    Shape("smollm2-135m decode", 3, 64, 128, 17),
    Shape("smollm2-135m prefill", 3, 64, 128, 128),
    Shape("llama-2-7b decode", 32, 128, 512, 17),
    Shape("llama-2-7b prefill", 32, 128, 512, 512),
]


def make_args(shape: Shape, device, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    h, d, la, lb = shape.heads, shape.d, shape.slots, shape.new_len
    proj_k = rnd(1, lb, h * d)                      # new entries as views of a projection
    proj_v = rnd(1, lb, h * d)
    args = [rnd(1, h, la, d), rnd(1, h, la, d),
            proj_k.view(1, lb, h, d).transpose(1, 2), proj_v.view(1, lb, h, d).transpose(1, 2),
            torch.rand(1, h, la + lb, generator=g).to(device),
            rnd(shape.fused, 2 * d, KERNEL) / (2 * d * KERNEL) ** 0.5, torch.zeros(shape.fused).to(device, dtype),
            torch.tensor(0.5).to(device, dtype), shape.slots - shape.fused, 0, None]
    if requires_grad:
        for i in (0, 1, 5, 6, 7):
            args[i] = args[i].detach().requires_grad_()
    return args


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, min_repeats: int, budget_s: float) -> list[float]:
    """Milliseconds per call over warmed-up repeats (at least min_repeats, else until budget)."""
    for _ in range(2):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def bf16_matmul_peak_tflops(device) -> float | None:
    """Measured bf16 matrix-product throughput of the card (8192^3, median of 20)."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = measure(lambda: a @ b, device, 20, 2.0)
    return 2 * 8192**3 / (statistics.median(times) * 1e-3) / 1e12


def providers(direction: str):
    ref_compiled = torch.compile(reference.fuse_kv, dynamic=False)
    fns = {"reference eager": reference.fuse_kv, "reference compiled": ref_compiled,
           "lococo op": torch.ops.lococo.fuse_kv}
    if direction == "forward":
        return {name: (lambda f: lambda args: f(*args))(fn) for name, fn in fns.items()}

    def fwd_bwd(f):
        def run(args):
            k, v = f(*args)
            torch.autograd.backward((k, v), (torch.ones_like(k), torch.ones_like(v)))
        return run
    return {name: fwd_bwd(fn) for name, fn in fns.items()}


def check(shape, device, dtype):
    """The op against the fp32 reference (the tolerance of the test suite) before any timing."""
    args = make_args(shape, device, dtype)
    got = torch.ops.lococo.fuse_kv(*args)
    want = reference.fuse_kv(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point()
                               else a for a in args])
    own = reference.fuse_kv(*args)
    for g, w, o in zip(got, want, own):
        err = (g.float() - w).abs().max().item()
        bound = 1e-4 if dtype == torch.float32 else 2 * (o.float() - w).abs().max().item() + 1e-6
        if not err <= bound:
            raise SystemExit(f"{shape.name} {dtype}: op differs from the reference by {err} > {bound}")


def machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="+", default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES],
                        choices=[s.name for s in SHAPES], metavar="SHAPE")
    parser.add_argument("--direction", nargs="+", default=["forward", "backward"],
                        choices=["forward", "backward"], help="backward = forward + backward")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per row")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not lococo.has_kernel(args.device):
        raise SystemExit(f"no compiled fuse_kv kernel for {args.device}: {lococo.kernel_devices()}")
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32"] if args.device == "cpu" else ["bfloat16"]))]
    peak = bf16_matmul_peak_tflops(args.device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{stamp}; {machine(args.device)}; torch {torch.__version__}; lococo {lococo.__version__}; "
              f"python {platform.python_version()}; command: python benchmarks/bench_fuse_kv.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}")
    if peak:
        header += f"; measured bf16 matmul peak {peak:.0f} TFLOP/s"
    rows = []
    for shape in [s for s in SHAPES if s.name in args.shapes]:
        for dtype in dtypes:
            check(shape, args.device, dtype)
            for direction in args.direction:
                results = {}
                for name, run in providers(direction).items():
                    inputs = make_args(shape, args.device, dtype, requires_grad=direction == "backward")
                    results[name] = measure(lambda: run(inputs), args.device, args.min_repeats, args.budget)
                eager = statistics.median(results["reference eager"])
                compiled = statistics.median(results["reference compiled"])
                for name, times in results.items():
                    p50 = statistics.median(times)
                    tflops = shape.score_flops() / (p50 * 1e-3) / 1e12 if direction == "forward" else None
                    rows.append({
                        "kernel": f"fuse_kv {direction}", "provider": name, "shape": shape.name,
                        "dtype": str(dtype).removeprefix("torch."), "device": args.device,
                        "p50_ms": round(p50, 4), "p20_ms": round(quantile(times, 0.2), 4),
                        "p80_ms": round(quantile(times, 0.8), 4), "repeats": len(times),
                        "speedup_vs_eager": round(eager / p50, 2),
                        "speedup_vs_compiled": round(compiled / p50, 2),
                        "score_tflops": None if tflops is None else round(tflops, 3),
                        "pct_of_bf16_peak": None if (tflops is None or not peak) else round(100 * tflops / peak, 1),
                    })
                    print(f"{shape.name:22} {rows[-1]['dtype']:9} {direction:8} {name:19} "
                          f"p50 {p50:9.3f} ms  x{eager / p50:5.2f} vs eager  x{compiled / p50:5.2f} vs compiled",
                          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"fuse_kv_{args.device}"
    with open(args.out / f"{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = ["kernel", "shape", "dtype", "provider", "p50_ms", "p20_ms", "p80_ms",
            "speedup_vs_eager", "speedup_vs_compiled", "score_tflops", "pct_of_bf16_peak"]
    lines = [f"<!-- {header} -->", f"`{header}`", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    (args.out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[1:]))


if __name__ == "__main__":
    main()
