"""Perplexity by position of full cache, LoCoCo, H2O and StreamingLLM at the same M.

Each document (the held-out test documents of the packaged split, or your own plain-text files
with --docs) is cut to a token range and run chunk by chunk (B tokens per forward, as chunked
prefill does) through each method's cache. The loss of every token is binned by its position
in the range: 0-1K, 1K-2K, 2K-4K, 4K-8K by default. Peak KV memory is the largest size the
stored keys and values of all layers reach between chunks (the slots plus the entries appended
since the last compression; the full cache grows with the text).

Writes into --output: ppl_by_position.csv (one row per method and bucket, plus "all"),
methods.csv (memory, speed), results.md (the table), ppl_by_position.png and eval_meta.json
(the arguments, documents and versions).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

METHODS = ("full", "lococo", "h2o", "streaming")
METHOD_LABELS = {"full": "full cache", "lococo": "LoCoCo", "h2o": "H2O",
                 "streaming": "StreamingLLM"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compressor", default=None, metavar="DIR",
                        help="a trained compressor folder (save_pretrained); needed for lococo")
    parser.add_argument("--methods", default=None,
                        help=f"comma separated, from {','.join(METHODS)} (default: all; without "
                             "--compressor all but lococo)")
    parser.add_argument("--num-slots", "-M", type=int, default=None,
                        help="M for every method (default: the compressor's, else 128)")
    parser.add_argument("--chunk-size", "-B", type=int, default=None,
                        help="tokens per forward (default: the compressor's, else 128)")
    parser.add_argument("--beta", type=int, default=None,
                        help="slack of the baselines (default: the compressor's, else 16)")
    parser.add_argument("--model", default=None,
                        help="a from_pretrained folder (default: the fetched SmolLM2-135M)")
    parser.add_argument("--cache", default=None, help="asset cache folder")
    parser.add_argument("--docs", nargs="+", metavar="FILE", help="your own plain-text documents")
    parser.add_argument("--split", default="test", choices=["test", "dev"],
                        help="documents of the packaged split (ignored with --docs)")
    parser.add_argument("--split-file", default=None, help="another splits.json")
    parser.add_argument("--max-docs", type=int, default=None,
                        help="at most N documents, taken in turn from each source")
    parser.add_argument("--start-token", type=int, default=0, help="first token of the range")
    parser.add_argument("--max-tokens", type=int, default=8192, help="length of the range")
    parser.add_argument("--buckets", default="0,1024,2048,4096,8192",
                        help="bucket edges in tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output", default="lococo-eval", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


# ----------------------------------------------------------------------------------------
# Chunked forward through a cache
# ----------------------------------------------------------------------------------------

def kv_bytes(cache) -> int:
    """Bytes of the keys and values stored by every layer of a cache."""
    total = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True):
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def stored_entries(cache) -> int:
    """Entries stored by the first layer (every layer stores as many)."""
    layer = cache.layers[0]
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or not getattr(layer, "is_initialized", True) else keys.shape[-2]


def token_losses(model, ids, cache, chunk_size: int) -> tuple[list[float], int, int]:
    """Per-token NLL of ids[0, 1:], chunk by chunk; the peak KV bytes and stored entries."""
    import torch

    from ..hf.chunked import iter_chunks

    losses: list[float] = []
    peak_bytes = peak_entries = 0
    with torch.no_grad():
        for chunk in iter_chunks(model, ids, cache, chunk_size):
            losses += chunk.nll[0].tolist()
            peak_bytes = max(peak_bytes, kv_bytes(cache))
            peak_entries = max(peak_entries, stored_entries(cache))
    return losses, peak_bytes, peak_entries


# ----------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------

def round_robin(documents: list, key) -> list:
    """Documents interleaved across sources (in id order within each)."""
    by_source: dict[str, list] = {}
    for doc in documents:
        by_source.setdefault(key(doc), []).append(doc)
    queues = [sorted(docs, key=lambda d: d.id) for _, docs in sorted(by_source.items())]
    out = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def select_documents(args) -> list[tuple[str, str]]:
    """(name, text) of the documents to evaluate."""
    from . import assets

    if args.docs:
        docs = [(path, Path(path).read_text(encoding="utf-8", errors="replace"))
                for path in args.docs]
        return docs[:args.max_docs]
    split = assets.load_split(args.split_file)
    wanted = args.start_token + args.max_tokens
    long_enough = [doc for doc in split[args.split] if doc.tokens >= wanted]
    if not long_enough:
        raise ValueError(f"no {args.split} document has {wanted} tokens")
    chosen = round_robin(long_enough, key=lambda d: d.source)[:args.max_docs]
    return [(doc.id, assets.read_document(doc.id, args.cache)) for doc in chosen]


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------

def bucket_label(lo: int, hi: int) -> str:
    def short(n: int) -> str:
        return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)
    return f"{short(lo)}-{short(hi)}"


def write_results(output: Path, rows: list[dict], methods_rows: list[dict],
                  labels: list[str], num_slots: int) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "ppl_by_position.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(output / "methods.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(methods_rows[0]))
        writer.writeheader()
        writer.writerows(methods_rows)

    ppl = {(r["method"], r["bucket"]): r["ppl"] for r in rows}
    lines = ["| method | M | " + " | ".join(labels) + " | all | peak KV (MiB) |",
             "|---|---:|" + "---:|" * (len(labels) + 2)]
    for m in methods_rows:
        cells = [f"{ppl[(m['method'], b)]:.2f}" if ppl.get((m["method"], b)) is not None
                 else "-" for b in labels + ["all"]]
        lines.append(f"| {METHOD_LABELS[m['method']]} | {m['num_slots'] or 'all'} | "
                     + " | ".join(cells) + f" | {m['peak_kv_bytes'] / 2**20:.2f} |")
    (output / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in methods_rows:
        ys = [ppl.get((m["method"], b)) for b in labels]
        ax.plot(labels, [math.nan if y is None else y for y in ys], marker="o",
                label=f"{METHOD_LABELS[m['method']]} ({m['peak_kv_bytes'] / 2**20:.1f} MiB KV)")
    ax.set(xlabel="token position", ylabel="perplexity",
           title=f"perplexity by position, M = {num_slots}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "ppl_by_position.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lococo

    from . import assets
    from ..hf.caches import build_cache
    from ..compressor import LoCoCoCompressor
    from ..hf.patching import apply_lococo

    methods = (args.methods.split(",") if args.methods
               else [m for m in METHODS if m != "lococo" or args.compressor])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"lococo eval: unknown methods {unknown}; choose from {METHODS}")
    if "lococo" in methods and not args.compressor:
        raise SystemExit("lococo eval: the lococo method needs --compressor DIR (a trained "
                         "compressor, e.g. the output folder of `lococo train`)")
    edges = [int(x) for x in args.buckets.split(",")]
    if edges != sorted(edges) or len(edges) < 2:
        raise SystemExit(f"lococo eval: --buckets must be increasing edges, got {args.buckets}")
    labels = [bucket_label(lo, hi) for lo, hi in zip(edges, edges[1:])]

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = args.model or assets.model_dir(args.cache)
    docs = select_documents(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
    model.to(device).eval()

    compressor = None
    if args.compressor:
        compressor = LoCoCoCompressor.from_pretrained(args.compressor).to(device)
        if args.num_slots not in (None, compressor.config.num_slots):
            raise SystemExit(f"lococo eval: --num-slots {args.num_slots} differs from the "
                             f"compressor's M = {compressor.config.num_slots}")
    config = compressor.config if compressor is not None else None
    num_slots = args.num_slots or (config.num_slots if config else 128)
    chunk_size = args.chunk_size or (config.chunk_size if config else 128)
    beta = args.beta if args.beta is not None else (config.beta if config else 16)
    apply_lococo(model, compressor if "lococo" in methods else None)

    token_ids = []
    for name, text in docs:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ids = ids[args.start_token:args.start_token + args.max_tokens]
        if len(ids) < 2:
            raise SystemExit(f"lococo eval: {name} has no tokens in the range")
        token_ids.append(torch.tensor([ids], device=device))

    sums = {m: [0.0] * len(labels) for m in methods}
    counts = {m: [0] * len(labels) for m in methods}
    peaks = {m: (0, 0) for m in methods}
    seconds = {m: 0.0 for m in methods}
    bar = tqdm(total=len(docs) * len(methods), disable=args.no_progress, desc="lococo eval",
               unit="run")
    for (name, _), ids in zip(docs, token_ids):
        for method in methods:
            cache = build_cache(method, model, compressor if method == "lococo" else None,
                                num_slots=None if method in ("full", "lococo") else num_slots,
                                beta=beta)
            start = time.perf_counter()
            losses, peak_bytes, peak_entries = token_losses(model, ids, cache, chunk_size)
            seconds[method] += time.perf_counter() - start
            peaks[method] = (max(peaks[method][0], peak_bytes),
                             max(peaks[method][1], peak_entries))
            for position, loss in enumerate(losses, start=1):  # position of the target token
                for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
                    if lo <= position < hi:
                        sums[method][b] += loss
                        counts[method][b] += 1
                        break
            bar.set_postfix(doc=Path(name).name[:24], method=method)
            bar.update(1)
    bar.close()

    rows, method_rows = [], []
    for method in methods:
        m_slots = None if method == "full" else num_slots
        for label, lo, hi, total, n in zip(labels + ["all"], edges[:-1] + [edges[0]],
                                           edges[1:] + [edges[-1]],
                                           sums[method] + [sum(sums[method])],
                                           counts[method] + [sum(counts[method])]):
            nll = total / n if n else None
            rows.append({"method": method, "num_slots": m_slots, "bucket": label, "start": lo,
                         "end": hi, "tokens": n, "nll": None if nll is None else round(nll, 5),
                         "ppl": None if nll is None else round(math.exp(nll), 4)})
        tokens = sum(counts[method])
        method_rows.append({"method": method, "num_slots": m_slots, "chunk_size": chunk_size,
                            "beta": beta, "peak_kv_bytes": peaks[method][0],
                            "peak_entries_per_layer": peaks[method][1],
                            "tokens": tokens, "seconds": round(seconds[method], 2),
                            "tokens_per_second": round(tokens / max(seconds[method], 1e-9), 1)})
    output = Path(args.output)
    write_results(output, rows, method_rows, labels, num_slots)
    (output / "eval_meta.json").write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "documents": [name for name, _ in docs], "model": str(model_path),
        "device": str(device), "lococo": lococo.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__}, indent=1, default=str) + "\n")
    print((output / "results.md").read_text(), end="")
    print(f"results in {output}/")
    return 0
