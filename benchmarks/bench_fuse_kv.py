"""Microbenchmark of fuse_kv: PyTorch reference (eager and torch.compile) against the op.

Shapes are the ones the cache sees: decode (the M slots plus beta + 1 = 17 new entries) and
prefill (the M slots plus a chunk of B), for SmolLM2-135M (3 KV heads, d 64, M = B = 128) and
Llama-2-7B (32 KV heads, d 128, M = B = 512), kernel 21, rho 0.5. The op is checked against
the float64 reference (the rule of lococo.ops.testing) before it is timed; times are medians
with p20/p80 over warmed-up repeats, taken side by side in one run. On CUDA, --valid-len and
--cuda-graph add the op as the cache calls it (with the lengths tensor), eagerly and replayed
from a CUDA graph, and --attribution the time per op call of each CUDA kernel (torch.profiler).
Writes CSV and markdown under --out, rewritten after every row.

    python benchmarks/bench_fuse_kv.py [--device cpu|cuda] [--dtype float32 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lococo
from lococo import reference
from lococo.ops.testing import compare_forward

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


def make_args(shape: Shape, device, dtype, requires_grad=False, valid_len=False):
    """The op's arguments at this shape; with valid_len, the lengths tensor the cache passes (all full)."""
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
    if valid_len:
        args[10] = torch.full((1,), la + lb, dtype=torch.long, device=device)
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


def providers(direction: str, compiled: bool, extra: tuple[str, ...] = ()) -> dict:
    """name -> (run(args), make_args keywords). `extra` adds forward-only variants of the op:
    "valid_len" (the lengths tensor given, as the cache calls it) and "cuda graph" (replays)."""
    fns = {"reference eager": reference.fuse_kv, "lococo op": torch.ops.lococo.fuse_kv}
    if compiled:
        fns["reference compiled"] = torch.compile(reference.fuse_kv, dynamic=False)
    if direction == "forward":
        runs = {name: ((lambda f: lambda args: f(*args))(fn), {}) for name, fn in fns.items()}
        if "valid_len" in extra:
            runs["lococo op, valid_len"] = (lambda args: torch.ops.lococo.fuse_kv(*args), {"valid_len": True})
        if "cuda graph" in extra:
            runs["lococo op, valid_len, CUDA graph"] = (graph_replay, {"valid_len": True})
        return runs

    def fwd_bwd(f):
        def run(args):
            k, v = f(*args)
            torch.autograd.backward((k, v), (torch.ones_like(k), torch.ones_like(v)))
        return run
    return {name: (fwd_bwd(fn), {"requires_grad": True}) for name, fn in fns.items()}


_GRAPHS: dict[int, tuple] = {}


def graph_replay(args) -> None:
    """Replays a CUDA graph of the op captured on these arguments (captured on the first call,
    after a warm-up on a side stream); the first replay must equal an eager call bit for bit."""
    key = id(args)
    if key not in _GRAPHS:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                torch.ops.lococo.fuse_kv(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = torch.ops.lococo.fuse_kv(*args)
        graph.replay()
        eager = torch.ops.lococo.fuse_kv(*args)
        if not all(torch.equal(a, b) for a, b in zip(out, eager)):
            raise RuntimeError("the CUDA graph's replay differs from an eager call")
        _GRAPHS[key] = (graph, out, args)  # args kept alive: their id stays theirs
    _GRAPHS[key][0].replay()


def kernel_times(shape: Shape, dtype, calls: int = 20) -> list[tuple[str, float, float]]:
    """(kernel, microseconds per op call, launches per op call) of the op with valid_len, from
    the profiler's CUDA activity, largest first."""
    from torch.profiler import ProfilerActivity, profile

    args = make_args(shape, "cuda", dtype, valid_len=True)
    for _ in range(3):
        torch.ops.lococo.fuse_kv(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.ops.lococo.fuse_kv(*args)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0 and event.count > 0:
            rows.append((event.key, total / calls, event.count / calls))
    return sorted(rows, key=lambda r: -r[1])


def check(shape, device, dtype) -> str | None:
    """The op against the float64 reference (the rule of lococo.ops.testing) before any timing;
    what differs, or None."""
    args = make_args(shape, device, dtype)
    result = compare_forward(torch.ops.lococo.fuse_kv(*args), args)
    return None if result.ok else f"{shape.name} {dtype}: the op differs from the float64 reference: {result.detail}"


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
    parser.add_argument("--compile-shapes", nargs="+", default=None, choices=[s.name for s in SHAPES],
                        metavar="SHAPE", help="time torch.compile of the reference only at these shapes (default: all)")
    parser.add_argument("--valid-len", action="store_true", help="also time the op with valid_len given")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time replays of a CUDA graph of the op (with valid_len); checks the replay")
    parser.add_argument("--attribution", nargs="+", default=None, choices=[s.name for s in SHAPES], metavar="SHAPE",
                        help="per-kernel times of the op at these shapes (CUDA, torch.profiler)")
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
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"fuse_kv_{args.device}"
    extra = tuple(name for name, on in (("valid_len", args.valid_len), ("cuda graph", args.cuda_graph)) if on)
    rows, notes, attribution = [], [], []
    if args.attribution and args.device != "cuda":
        parser.error("--attribution needs --device cuda")
    failures = []
    for shape in [s for s in SHAPES if s.name in (args.attribution or [])]:  # first: quick, and kept if cut short
        for dtype in dtypes:
            try:
                times = kernel_times(shape, dtype)
            except RuntimeError as error:  # the profiler's CUDA activity may be unavailable
                notes.append(f"per-kernel times of {shape.name} {dtype}: {str(error).splitlines()[0]}")
                continue
            for kernel, us, launches in times:
                attribution.append({"shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "kernel": kernel,
                                    "us_per_call": round(us, 2), "launches_per_call": round(launches, 2)})
    write_results(args.out, tag, header, rows, notes, attribution)
    for shape in [s for s in SHAPES if s.name in args.shapes]:
        for dtype in dtypes:
            failure = check(shape, args.device, dtype)
            if failure:  # reported, and the exit status says so; the timing still runs
                failures.append(failure)
                notes.append(f"CHECK FAILED: {failure}")
                print(notes[-1], flush=True)
            for direction in args.direction:
                compiled = args.compile_shapes is None or shape.name in args.compile_shapes
                results = {}
                for name, (run, make_kw) in providers(direction, compiled, extra).items():
                    inputs = make_args(shape, args.device, dtype, **make_kw)
                    try:
                        call = functools.partial(run, inputs)
                        results[name] = measure(call, args.device, args.min_repeats, args.budget)
                    except RuntimeError as error:  # e.g. a capture that fails: reported, not fatal
                        notes.append(f"{shape.name} {dtype} {name}: {str(error).splitlines()[0]}")
                        print(notes[-1], flush=True)
                eager = statistics.median(results["reference eager"])
                compiled_ms = statistics.median(results["reference compiled"]) if compiled else None
                for name, times in results.items():
                    p50 = statistics.median(times)
                    tflops = shape.score_flops() / (p50 * 1e-3) / 1e12 if direction == "forward" else None
                    rows.append({
                        "kernel": f"fuse_kv {direction}", "provider": name, "shape": shape.name,
                        "dtype": str(dtype).removeprefix("torch."), "device": args.device,
                        "p50_ms": round(p50, 4), "p20_ms": round(quantile(times, 0.2), 4),
                        "p80_ms": round(quantile(times, 0.8), 4), "repeats": len(times),
                        "speedup_vs_eager": round(eager / p50, 2),
                        "speedup_vs_compiled": None if compiled_ms is None else round(compiled_ms / p50, 2),
                        "score_tflops": None if tflops is None else round(tflops, 3),
                        "pct_of_bf16_peak": None if (tflops is None or not peak) else round(100 * tflops / peak, 1),
                    })
                    print(f"{shape.name:22} {rows[-1]['dtype']:9} {direction:8} {name:33} p50 {p50:9.3f} ms  "
                          f"x{eager / p50:5.2f} vs eager", flush=True)
                    write_results(args.out, tag, header, rows, notes, attribution)
    print((args.out / f"{tag}.md").read_text())
    if failures:
        raise SystemExit(1)


CSV_FIELDS = ["kernel", "provider", "shape", "dtype", "device", "p50_ms", "p20_ms", "p80_ms", "repeats",
              "speedup_vs_eager", "speedup_vs_compiled", "score_tflops", "pct_of_bf16_peak"]
COLUMNS = ["kernel", "shape", "dtype", "provider", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_eager",
           "speedup_vs_compiled", "score_tflops", "pct_of_bf16_peak"]


def write_results(out: Path, tag: str, header: str, rows: list[dict], notes: list[str], attribution: list[dict]):
    """CSV and markdown of what is measured so far (rewritten after every row). The per-kernel
    times go into the CSV as rows with provider "profiler" and p50_ms the mean time per call."""
    csv_rows = rows + [{"kernel": a["kernel"], "provider": "profiler", "shape": a["shape"], "dtype": a["dtype"],
                        "device": "cuda", "p50_ms": round(a["us_per_call"] / 1e3, 5), "repeats": a["launches_per_call"]}
                       for a in attribution]
    if csv_rows:
        with open(out / f"{tag}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
            writer.writeheader()
            writer.writerows(csv_rows)
    lines = [f"<!-- {header} -->", f"`{header}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in COLUMNS) + " |" for r in rows]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    if attribution:
        lines += ["", "Time per op call by CUDA kernel (torch.profiler, op with valid_len, mean of 20 calls):", "",
                  "| shape | dtype | kernel | us per call | launches per call |", "|---|---|---|---|---|"]
        lines += [f"| {a['shape']} | {a['dtype']} | `{a['kernel'][:100]}` | {a['us_per_call']} | "
                  f"{a['launches_per_call']} |" for a in attribution]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
