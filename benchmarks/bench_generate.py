"""Decode speed and memory against context length: the LoCoCo cache against the full cache.

Model: SmolLM2-135M's architecture (Llama: 30 layers, hidden 576, 9 heads over 3 KV heads,
head_dim 64, vocab 49152, tied embeddings) with random weights. Throughput and memory do not
depend on the weights, only on the shapes, so no checkpoint is needed.

For every context T and cache, a fresh process builds the model, brings the cache to the state a
T-token prefill leaves it in, then times greedy decoding of --decode-tokens tokens through the
model (every forward, attention, cache update and, for LoCoCo, the compressions every
beta + 1 = 17 tokens). Two ways to reach that state (--prefill):
  model      the real chunked prefill through the model (chunk B); cost grows with T (and T^2
             for the full cache), so on a small CPU it is only practical for short contexts;
  synthetic  the cache is fed random keys/values as the prefill would store them: T entries per
             layer for the full cache; for LoCoCo, chunks of B through its real update and
             compression path until it is in its steady state (M slots + B entries), then its
             token counter is set to T so that positions continue at T.
Decode cost and memory are the same either way: they depend on the stored shapes only.

--kv-bits 16 8 4 runs each fixed-slot cache with its slots in the model's dtype and quantized to 8 and
4 bits (docs/design.md#quantized-slots; the lococo attention then reads them in blocks); the full cache
runs once.

Reported per (cache, storage, T): bytes of the stored keys and values after decoding (`lococo.hf.caches.kv_bytes`,
the count `lococo eval` reports), the process's peak RSS (CPU) or torch's peak allocated memory
(CUDA), decode tokens/s over all timed tokens (compressions included), and the median per-token
latency with p20/p80. Writes generate.{csv,md,png} under
--out (generate_model_prefill.* with --prefill model).

    python benchmarks/bench_generate.py [--contexts 1024 2048 ...] [--prefill synthetic|model]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                    tie_word_embeddings=True, max_position_embeddings=65536, rms_norm_eps=1e-5)
# two layers of Llama-2-7B: its attention shapes (32 KV heads of 128) at a size that fits any machine
LLAMA2_7B_2LAYERS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=1e4,
                         max_position_embeddings=65536, rms_norm_eps=1e-5)
MODELS = {"smollm2-135m": ("SmolLM2-135M architecture", SMOLLM2_135M),
          "llama-2-7b-2layers": ("Llama-2-7B shapes, 2 layers", LLAMA2_7B_2LAYERS)}
CACHES = ("full", "lococo", "h2o")
LABELS = {"full": "full cache", "lococo": "LoCoCo", "h2o": "H2O"}
FIELDS = ["model", "cache", "context", "prefill", "decode_tokens", "tokens_per_s", "latency_ms_p50", "latency_ms_p20",
          "latency_ms_p80", "kv_cache_mb", "stored_entries", "peak_mem_mb", "model_mem_mb", "prefill_s",
          "num_slots", "chunk", "device", "dtype", "threads", "kv_bits"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_one(args) -> dict:
    """One (cache, context) measurement; runs in its own process so that peak memory is its own."""
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import lococo
    from lococo.hf.caches import kv_bytes

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[args.model][1])
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    compressor = lococo.LoCoCoCompressor.for_model(model, num_slots=args.num_slots, chunk_size=args.chunk)
    if args.cache == "lococo":
        lococo.apply_lococo(model, compressor)
        cache = lococo.LoCoCoCache(compressor, quantization=args.bits)
    elif args.cache == "h2o":
        lococo.apply_lococo(model)
        cache = lococo.H2OCache(config.num_hidden_layers, args.num_slots, quantization=args.bits)
    else:
        cache = DynamicCache(config=config)
    kw = {lococo.cache_kwarg(model): cache}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model_mem = torch.cuda.memory_allocated() / 2**20
    else:
        model_mem = _rss_mb()

    gen = torch.Generator().manual_seed(1)
    T, B = args.context, args.chunk
    start = time.perf_counter()
    with torch.no_grad():
        if args.prefill == "model":
            ids = torch.randint(0, config.vocab_size, (1, T), generator=gen).to(device)
            for s in range(0, T, B):
                out = model(input_ids=ids[:, s:s + B], logits_to_keep=1, **kw)
            token = out.logits[:, -1:].argmax(-1)
        else:
            shape = (1, config.num_key_value_heads, 0, config.head_dim)
            rnd = lambda n: torch.randn(shape[:2] + (n, shape[3]), generator=gen).to(device, dtype)  # noqa: E731
            if args.cache == "full":
                for i in range(config.num_hidden_layers):
                    cache.update(rnd(T), rnd(T), i)
            else:
                steady = min(T, args.num_slots + 3 * B)
                for s in range(0, steady, B):
                    n = min(B, steady - s)
                    for layer in cache.layers:
                        layer.update(rnd(n), rnd(n))
                        layer.record_scores(torch.rand(1, config.num_key_value_heads, layer.stored_length,
                                                       generator=gen).to(device))
                for layer in cache.layers:
                    layer.cumulative_length = T
            token = torch.randint(0, config.vocab_size, (1, 1), generator=gen).to(device)
        sync()
        prefill_s = time.perf_counter() - start

        latencies = []
        for step in range(args.warmup + args.decode_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=token, **kw)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            if step >= args.warmup:
                latencies.append(time.perf_counter() - t0)
    assert cache.get_seq_length() == T + args.warmup + args.decode_tokens
    q = statistics.quantiles(latencies, n=10)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return {
        "model": args.model, "cache": args.cache, "context": T, "prefill": args.prefill,
        "decode_tokens": len(latencies),
        "tokens_per_s": round(len(latencies) / sum(latencies), 2),
        "latency_ms_p50": round(1e3 * statistics.median(latencies), 2),
        "latency_ms_p20": round(1e3 * q[1], 2), "latency_ms_p80": round(1e3 * q[7], 2),
        "kv_cache_mb": round(kv_bytes(cache) / 2**20, 2), "stored_entries": stored_entries(cache.layers[0]),
        "peak_mem_mb": round(peak, 1), "model_mem_mb": round(model_mem, 1), "prefill_s": round(prefill_s, 2),
        "num_slots": args.num_slots, "chunk": B, "device": args.device, "dtype": args.dtype,
        "threads": args.threads, "kv_bits": args.bits,
    }


def stored_entries(layer) -> int:
    """Entries a layer stores: a fixed-slot layer's slots (quantized or not) and appended entries; else its keys."""
    return layer.stored_length if hasattr(layer, "stored_length") else layer.keys.shape[-2]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def environment(args) -> str:
    import torch
    import transformers

    import lococo

    device = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    return (f"{datetime.date.today()}, {device}, {os.cpu_count()} cores "
            f"({args.threads} torch threads), python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, lococo {lococo.__version__} "
            f"(kernels: {lococo.kernel_devices() or 'none, reference'})")


def label(cache: str, bits: int) -> str:
    return LABELS[cache] + ("" if bits == 16 else f" int{bits}")


def write_outputs(rows: list[dict], args, env: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "generate" if args.prefill == "synthetic" else "generate_model_prefill"
    if args.model != "smollm2-135m":
        stem += f"-{args.model}"
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    by = {(r["cache"], r["kv_bits"], r["context"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    caches = [(c, bits) for c in CACHES for bits in (16, 8, 4) if any(r["cache"] == c and r["kv_bits"] == bits
                                                                      for r in rows)]
    lines = [
        f"{MODELS[args.model][0]}, random weights (throughput and memory depend on shapes, not weights); "
        f"M = {args.num_slots}, beta = 16, B = {args.chunk}; batch 1, {args.dtype} on {args.device}; "
        f"{args.decode_tokens} timed greedy decode tokens after {args.warmup} warm-up; prefill: {args.prefill}.",
        f"Machine: {env}. Memory after building the model (the floor of the peak column): "
        f"{min(r['model_mem_mb'] for r in rows)} MB.", "",
        "| context | cache | KV cache MB | peak MB | decode tok/s | vs full | latency ms p50 [p20, p80] |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for T in contexts:
        full = by.get(("full", 16, T))
        for cache, bits in caches:
            r = by.get((cache, bits, T))
            if r is None:
                continue
            speed = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x" if full else "-"
            lines.append(f"| {T} | {label(cache, bits)} | {r['kv_cache_mb']} | {r['peak_mem_mb']} "
                         f"| {r['tokens_per_s']} | {speed} | {r['latency_ms_p50']} "
                         f"[{r['latency_ms_p20']}, {r['latency_ms_p80']}] |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (cache, bits), style in zip(caches, ("o-", "s-", "^-", "v-", "D-", "x-", "+-")):
        pts = [by[(cache, bits, T)] for T in contexts if (cache, bits, T) in by]
        xs = [r["context"] for r in pts]
        name = label(cache, bits) + ("" if cache == "full" else f" (M = {args.num_slots})")
        axes[0].plot(xs, [r["kv_cache_mb"] for r in pts], style, label=name)
        axes[1].plot(xs, [r["peak_mem_mb"] for r in pts], style, label=name)
        axes[2].plot(xs, [r["tokens_per_s"] for r in pts], style, label=name)
    titles = ("KV cache (MB)", "peak memory (MB): " + ("torch allocated" if args.device == "cuda" else "process RSS"),
              "decode tokens/s")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{T // 1024}K" for T in contexts])
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{MODELS[args.model][0]} (random weights), batch 1, " + args.device, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m",
                        help="the architecture (random weights)")
    parser.add_argument("--prefill", choices=("synthetic", "model"), default="synthetic")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--num-slots", type=int, default=128)
    parser.add_argument("--kv-bits", type=int, nargs="+", choices=(16, 8, 4), default=[16],
                        help="the fixed-slot caches' slot storage: 16 (the model's dtype), 8, 4 bits; each one given")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    # One thread by default: on a CPU shared with other jobs, OpenMP threads spin-wait on siblings
    # that the OS has descheduled, and decode latency becomes scheduler noise.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker mode: "cache:context"
    args = parser.parse_args()

    if args.one is not None:
        args.cache, bits, context = args.one.split(":")
        args.bits, args.context = int(bits), int(context)
        print(json.dumps(run_one(args)))
        return

    rows = []
    worker = [sys.executable, __file__, *[a for a in sys.argv[1:]]]
    for T in args.contexts:           # caches side by side at each context, so that both see the same load
        for cache, bits in [(c, b) for c in args.caches for b in (args.kv_bits if c != "full" else [16])]:
            result = subprocess.run(worker + ["--one", f"{cache}:{bits}:{T}"], capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{cache} ({bits} bits) at {T} failed:\n{result.stderr}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{label(cache, bits):>14} {T:>6}: {row['tokens_per_s']:8.2f} tok/s, "
                  f"KV {row['kv_cache_mb']:8.2f} MB, peak {row['peak_mem_mb']:8.1f} MB, "
                  f"prefill {row['prefill_s']:.1f} s", flush=True)
        write_outputs(rows, args, environment(args))   # after every context: a run cut short keeps its rows


if __name__ == "__main__":
    main()
