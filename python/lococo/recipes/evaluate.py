"""Perplexity by position of full cache, LoCoCo, H2O, TOVA and StreamingLLM at the same M.

Each document (the held-out test documents of the packaged split, or your own plain-text files
with --docs) is cut to a token range and run chunk by chunk (B tokens per forward, as chunked
prefill does) through each method's cache. The loss of every token is binned by its position
in the range: 0-1K, 1K-2K, 2K-4K, 4K-8K by default. Peak KV memory is the largest size the
stored keys and values of all layers reach between chunks (the slots plus the entries appended
since the last compression; the full cache grows with the text).

Writes into --output: ppl_by_position.csv (one row per method and bucket, plus "all", with a 95%
bootstrap interval over the documents), per_document.csv, methods.csv (memory, speed), results.md
(the tables), ppl_by_position.png and eval_meta.json (the arguments, documents and versions).

``--task passkey`` runs the retrieval task of ``lococo.recipes.passkey`` instead, with the same
methods, M and B.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import passkey
from .argtypes import (
    UsageError,
    add_assets_dir,
    add_slot_storage,
    bucket_edges,
    check_writable,
    choices_list,
    int_at_least,
    non_negative_int,
    positive_int,
    slot_storage,
)
from .methods import (
    BUDGET_SHAPES,
    KEEPS_RECENT,
    METHODS,
    method_cache,
    method_label,
    method_quantization,
    resolve_budgets,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compressor", default=None, metavar="DIR",
                        help="a trained compressor folder (save_pretrained) or the name of a shipped one "
                             "(smollm2-135m-m128, ...); needed for lococo")
    parser.add_argument("--methods", default=None, type=choices_list(lambda: list(METHODS), "methods"),
                        help=f"comma separated, from {','.join(METHODS)} (default: all; without "
                             "--compressor all but lococo)")
    parser.add_argument("--num-slots", "-M", type=positive_int, default=None,
                        help="M for every method, or the mean M of --budgets (default: the compressor's, else 128)")
    parser.add_argument("--budgets", default=None, metavar="FILE",
                        help="per-layer slots of the baselines: a budget file (`lococo calibrate`) or a shipped name, "
                             f"or a shape at the mean M: {' or '.join(BUDGET_SHAPES)} (default: the compressor's "
                             "budgets, else uniform). LoCoCo always keeps its compressor's")
    add_slot_storage(parser, default="the compressor's, else 16")
    parser.add_argument("--chunk-size", "-B", type=positive_int, default=None,
                        help="tokens per forward (default: the compressor's, else 128)")
    parser.add_argument("--beta", type=non_negative_int, default=None,
                        help="slack of the baselines (default: the compressor's, else 16)")
    parser.add_argument("--num-local", type=non_negative_int, default=None,
                        help="recent entries H2O and TOVA always keep (default: the compressor's num_local, "
                             "else 0), so that they keep the same recent window as LoCoCo")
    parser.add_argument("--model", default=None,
                        help="a from_pretrained folder, or a fetched model: smollm2-135m (default) or "
                             "gemma3-270m")
    add_assets_dir(parser)
    parser.add_argument("--docs", nargs="+", metavar="FILE", help="your own plain-text documents")
    parser.add_argument("--split", default="test", choices=["test", "dev"],
                        help="documents of the packaged split (ignored with --docs)")
    parser.add_argument("--split-file", default=None, help="another splits.json")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="leave out, with a warning, split documents whose fetched text fails its checksum "
                             "(default: refuse them)")
    parser.add_argument("--max-docs", type=positive_int, default=None,
                        help="at most N documents, taken in turn from each source")
    parser.add_argument("--start-token", type=non_negative_int, default=0, help="first token of the range")
    parser.add_argument("--max-tokens", type=int_at_least(2), default=8192, help="length of the range")
    parser.add_argument("--buckets", default=[0, 1024, 2048, 4096, 8192], type=bucket_edges,
                        help="bucket edges in tokens, strictly increasing (default: 0,1024,2048,4096,8192)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output", default="lococo-eval", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--task", default="ppl", choices=["ppl", "passkey"],
                        help="ppl: perplexity by position on documents; passkey: retrieval of a number hidden in "
                             "filler text (see --lengths, --depths, --trials)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000,
                        help="resamples of the documents for the 95%% intervals (0: none)")
    passkey.add_arguments(parser.add_argument_group("passkey task"))


def validate(args) -> None:
    """The checks that involve several arguments or the compressor's config, before any model loads."""
    from ..compressor import read_compressor_config

    args.methods = args.methods or [m for m in METHODS if m != "lococo" or args.compressor]
    if "lococo" in args.methods and not args.compressor:
        raise UsageError("the lococo method needs --compressor DIR (a trained compressor, e.g. the output "
                         "folder of `lococo train`)")
    config = None
    if args.compressor:
        try:
            config, geometry = read_compressor_config(args.compressor)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--compressor: {exc}") from None
        check_compressor_fits(geometry, args.model, args.assets_dir)
        mean_slots = round(sum(config.slots_per_layer(geometry.num_layers)) / geometry.num_layers)
        if args.num_slots not in (None, mean_slots):
            raise UsageError(f"--num-slots {args.num_slots} differs from the compressor's M = {mean_slots}"
                             + (" (mean of its per-layer budgets)" if config.per_layer else ""))
    fill_defaults(args, config)
    fill_quantization(args)
    fill_budgets(args, config)
    check_baselines(args)
    if args.task == "passkey":
        passkey.validate(args)
    elif args.buckets[0] >= args.max_tokens:
        raise UsageError(f"--buckets start at {args.buckets[0]}, at or after the end of the range "
                         f"(--max-tokens {args.max_tokens}): no token would be counted")
    for path in args.docs or []:
        if not Path(path).is_file():
            raise UsageError(f"--docs {path}: no such file")
    if args.device is not None:
        check_device(args.device)
    check_writable(Path(args.output), "--output")


def model_config(model: str | None, assets_dir: str | None):
    """The model's transformers config (read without its weights): --model, else the fetched SmolLM2."""
    from transformers import AutoConfig

    from . import assets

    path = assets.resolve_model(model, assets_dir)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {path}: {exc}") from None


def check_compressor_fits(geometry, model: str | None, assets_dir: str | None) -> None:
    """The compressor's layers and head_dim against the model's config (read without its weights)."""
    try:
        geometry.require_fit(model_config(model, assets_dir), "--compressor")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def fill_defaults(args, config) -> None:
    """M, B, beta and the num_local of H2O and TOVA not given: the compressor's, else 128, 128, 16 and 0."""
    for name, default in (("num_slots", 128), ("chunk_size", 128), ("beta", 16), ("num_local", 0)):
        if getattr(args, name) is None:
            value = getattr(config, name) if config is not None else default
            if name == "num_slots" and isinstance(value, tuple):   # per-layer budgets: their mean
                value = round(sum(value) / len(value))
            setattr(args, name, value)


def fill_quantization(args) -> None:
    """args.quantization: None (no --kv-bits: the compressor's storage), False (16) or a SlotQuantization."""
    from ..compressor import ModelGeometry

    head_dim = None
    if args.kv_bits in (8, 4):
        try:
            head_dim = ModelGeometry.of(model_config(args.model, args.assets_dir)).head_dim
        except TypeError as exc:
            raise UsageError(f"--model: {exc}") from None
    args.quantization = slot_storage(args, head_dim)


def fill_budgets(args, config) -> None:
    """args.num_slots becomes the baselines' slots (an int, or one per layer) and args.budgets_label their name.

    Without --budgets the baselines keep the compressor's budgets (the same memory as LoCoCo), else M everywhere.
    """
    args.mean_slots = args.num_slots
    args.budgets_label = None
    if args.budgets is None and config is not None and config.per_layer:
        args.num_slots, args.budgets_label = list(config.num_slots), "compressor's"
        return
    if args.budgets is None:
        return
    from ..compressor import ModelGeometry

    try:
        num_layers = ModelGeometry.of(model_config(args.model, args.assets_dir)).num_layers
    except TypeError as exc:
        raise UsageError(f"--model: {exc}") from None
    try:
        args.num_slots, args.budgets_label = resolve_budgets(args.budgets, num_layers, args.num_slots,
                                                             floor=max(args.num_local + 1, 4))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--budgets: {exc}") from None
    if isinstance(args.num_slots, list):
        args.mean_slots = round(sum(args.num_slots) / num_layers)
    if "lococo" in args.methods and config is not None and config.slots_per_layer(num_layers) != (
            args.num_slots if isinstance(args.num_slots, list) else [args.num_slots] * num_layers):
        raise UsageError(f"--budgets {args.budgets} differ from the compressor's slots per layer; LoCoCo keeps its "
                         "compressor's: run LoCoCo and the baselines at other budgets in two evaluations")


def check_baselines(args) -> None:
    """The baselines' own checks of M and beta (StreamingLLM keeps 4 sinks, so M >= 4)."""
    from ..hf.caches.baselines import H2OLayer, StreamingLLMLayer, TOVALayer

    slots = sorted(set(args.num_slots)) if isinstance(args.num_slots, list) else [args.num_slots]
    given = f"--budgets {args.budgets} (M = {slots[0]} in some layer)" if args.budgets else f"--num-slots {slots[0]}"
    for method, make_layer, flags in (
            ("h2o", lambda m: H2OLayer(m, args.beta, args.num_local),
             f"{given} and --num-local {args.num_local} do not"),
            ("tova", lambda m: TOVALayer(m, args.beta, args.num_local),
             f"{given} and --num-local {args.num_local} do not"),
            ("streaming", lambda m: StreamingLLMLayer(m, args.beta), f"{given} does not")):
        if method in args.methods:
            try:
                for m in slots:
                    make_layer(m)
            except ValueError as exc:
                raise UsageError(f"{flags} suit the {method} method: {exc}") from None


def check_device(name: str) -> None:
    """A device torch can name and, for CUDA, sees."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")


# ----------------------------------------------------------------------------------------
# Chunked forward through a cache
# ----------------------------------------------------------------------------------------

def stored_entries(cache) -> int:
    """Entries stored per layer, on average over the layers (with per-layer budgets they differ)."""
    from ..hf.caches.fixed_slot import layer_stored_length

    return round(sum(layer_stored_length(layer) for layer in cache.layers) / len(cache.layers))


def token_losses(model, ids, cache, chunk_size: int) -> tuple[list[float], int, int]:
    """Per-token NLL of ids[0, 1:], chunk by chunk; the peak KV bytes and stored entries."""
    import torch

    from ..hf.caches import kv_bytes
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


def select_documents(args) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, text) of the documents to evaluate, and the split's documents left out as missing.

    Files of --docs must be text; a fetched document whose file is damaged is refused (left out with a
    warning when ``args.skip_damaged``)."""
    from . import assets

    if args.docs:
        return [(path, assets.read_text_file(path)) for path in args.docs][:args.max_docs], []
    split = assets.load_split(args.split_file)
    wanted = args.start_token + args.max_tokens
    long_enough = [doc for doc in split[args.split] if doc.tokens >= wanted]
    if not long_enough:
        raise UsageError(f"no {args.split} document has {wanted} tokens (--start-token + --max-tokens)")
    problems = assets.check_documents(long_enough, args.assets_dir)
    assets.refuse_damaged(problems, args.assets_dir, skip=getattr(args, "skip_damaged", None))
    usable = [doc for doc in long_enough if doc.id not in problems]
    if not usable:
        raise assets.AssetMissingError(f"The {args.split} text", assets.cache_dir(args.assets_dir), "eval-text")
    if problems:
        print(f"lococo eval: warning: {len(problems)} {args.split} documents are left out, they are not as the "
              f"split recorded them in the fetched text (first: {next(iter(problems))}); see eval_meta.json",
              file=sys.stderr, flush=True)
    chosen = round_robin(usable, key=lambda d: d.source)[:args.max_docs]
    return [(doc.id, assets.read_document(doc.id, args.assets_dir)) for doc in chosen], sorted(problems)


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------

def bucket_label(lo: int, hi: int) -> str:
    """ "0-1K", "1K-2K", "1.5K-2K", "0-32": the token positions of a bucket, in short."""
    def short(n: int) -> str:
        if n and n % 1024 == 0:
            return f"{n // 1024}K"
        return f"{n / 1024:.1f}K" if n >= 1024 else str(n)
    return f"{short(lo)}-{short(hi)}"


def bin_losses(losses: list[float], edges: list[int]) -> tuple[list[float], list[int]]:
    """Sums and counts of the losses per bucket [edges[i], edges[i+1]) of target position (index + 1)."""
    sums, counts = [0.0] * (len(edges) - 1), [0] * (len(edges) - 1)
    for position, loss in enumerate(losses, start=1):
        bucket = bisect.bisect_right(edges, position) - 1
        if 0 <= bucket < len(sums):
            sums[bucket] += loss
            counts[bucket] += 1
    return sums, counts


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

    def name(m: dict) -> str:
        return method_label(m["method"], m["num_local"], m["budgets"], m["kv_storage"])

    lines = ["| method | M | " + " | ".join(labels) + " | all | peak KV (MiB) |",
             "|---|---:|" + "---:|" * (len(labels) + 2)]
    for m in methods_rows:
        cells = [f"{ppl[(m['method'], b)]:.2f}" if ppl.get((m["method"], b)) is not None
                 else "-" for b in labels + ["all"]]
        lines.append(f"| {name(m)} | {m['num_slots'] or 'all'} | "
                     + " | ".join(cells) + f" | {m['peak_kv_bytes'] / 2**20:.2f} |")
    if any(r["ppl_low"] is not None for r in rows):
        bounds = {(r["method"], r["bucket"]): (r["ppl_low"], r["ppl_high"]) for r in rows}
        lines += ["", "95% bootstrap interval of the perplexity, resampling the documents:", "",
                  "| method | " + " | ".join(labels) + " | all |", "|---|" + "---:|" * (len(labels) + 1)]
        for m in methods_rows:
            cells = [f"{lo:.2f}-{hi:.2f}" if (lo, hi) != (None, None) else "-"
                     for lo, hi in (bounds.get((m["method"], b), (None, None)) for b in labels + ["all"])]
            lines.append(f"| {name(m)} | " + " | ".join(cells) + " |")
    (output / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in methods_rows:
        ys = [ppl.get((m["method"], b)) for b in labels]
        ax.plot(labels, [math.nan if y is None else y for y in ys], marker="o",
                label=f"{name(m)} "
                      f"({m['peak_kv_bytes'] / 2**20:.1f} MiB KV)")
    ax.set(xlabel="token position", ylabel="perplexity",
           title=f"perplexity by position, M = {num_slots}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "ppl_by_position.png", dpi=120)
    plt.close(fig)


def bootstrap_intervals(per_document: list[tuple[list[float], list[int]]], resamples: int,
                        seed: int) -> list[tuple[float | None, float | None]]:
    """95% percentile intervals of each bucket's perplexity (and of "all", last) over document resamples.

    A resample draws as many documents as there are, with replacement, and pools their tokens, as the
    point estimate does; (None, None) without resamples or with fewer than two documents.
    """
    import random

    buckets = len(per_document[0][0]) if per_document else 0
    if resamples < 1 or len(per_document) < 2:
        return [(None, None)] * (buckets + 1)
    with_all = [(sums + [sum(sums)], counts + [sum(counts)]) for sums, counts in per_document]
    rng = random.Random(seed)
    draws: list[list[float]] = [[] for _ in range(buckets + 1)]
    for _ in range(resamples):
        chosen = [with_all[rng.randrange(len(with_all))] for _ in with_all]
        for b in range(buckets + 1):
            loss = sum(sums[b] for sums, _ in chosen)
            count = sum(counts[b] for _, counts in chosen)
            if count:
                draws[b].append(math.exp(loss / count))
    out = []
    for values in draws:
        values.sort()
        if not values:
            out.append((None, None))
            continue
        out.append((round(values[int(0.025 * (len(values) - 1))], 4), round(values[int(0.975 * (len(values) - 1))], 4)))
    return out


def write_per_document(output: Path, totals: dict, docs: list[tuple[str, str]], labels: list[str]) -> None:
    """per_document.csv: every document's perplexity per bucket and method."""
    with open(output / "per_document.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["document", "method", *labels])
        for method, total in totals.items():
            for (name, _), (sums, counts) in zip(docs, total.per_document):
                writer.writerow([name, method] + [round(math.exp(s / n), 4) if n else "" for s, n in zip(sums, counts)])


# ----------------------------------------------------------------------------------------
# Set-up, the runs and the report
# ----------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """The model, the compressor and the tokenized documents, built by ``set_up``."""

    model: object
    tokenizer: object
    model_path: object
    device: object
    compressor: object
    docs: list[tuple[str, str]]
    token_ids: list
    left_out: list[str]


@dataclass
class Totals:
    """Loss sums and counts per bucket, peak memory and time of one method over all documents."""

    sums: list[float]
    counts: list[int]
    per_document: list[tuple[list[float], list[int]]] = field(default_factory=list)
    peak_bytes: int = 0
    peak_entries: int = 0
    seconds: float = 0.0


def set_up(args) -> Evaluation:
    """Documents first (a missing one fails before the model loads), then the model and the compressor."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..compressor import LoCoCoCompressor
    from ..hf.patching import apply_lococo
    from . import assets

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_path = assets.resolve_model(args.model, args.assets_dir)
    docs, left_out = select_documents(args) if args.task == "ppl" else ([], [])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype))
    model.to(device).eval()
    compressor = None
    if args.compressor:
        compressor = LoCoCoCompressor.from_pretrained(args.compressor, model=model).to(device)
    apply_lococo(model, compressor if "lococo" in args.methods else None)

    token_ids = []
    for name, text in docs:
        ids = assets.encode(tokenizer, text)
        ids = ids[args.start_token:args.start_token + args.max_tokens]
        if len(ids) < 2:
            raise UsageError(f"{name} has fewer than 2 tokens from --start-token {args.start_token} on")
        token_ids.append(torch.tensor([ids], device=device))
    return Evaluation(model, tokenizer, model_path, device, compressor, docs, token_ids, left_out)


def run_methods(args, ev: Evaluation) -> dict[str, Totals]:
    """Every document through every method's cache."""
    from tqdm.auto import tqdm

    totals = {m: Totals([0.0] * (len(args.buckets) - 1), [0] * (len(args.buckets) - 1)) for m in args.methods}
    bar = tqdm(total=len(ev.docs) * len(args.methods), disable=args.no_progress, desc="lococo eval", unit="run")
    for (name, _), ids in zip(ev.docs, ev.token_ids):
        for method in args.methods:
            cache = method_cache(method, args, ev)
            start = time.perf_counter()
            losses, peak_bytes, peak_entries = token_losses(ev.model, ids, cache, args.chunk_size)
            total = totals[method]
            total.seconds += time.perf_counter() - start
            total.peak_bytes = max(total.peak_bytes, peak_bytes)
            total.peak_entries = max(total.peak_entries, peak_entries)
            sums, counts = bin_losses(losses, args.buckets)
            total.per_document.append((sums, counts))
            total.sums = [a + b for a, b in zip(total.sums, sums)]
            total.counts = [a + b for a, b in zip(total.counts, counts)]
            bar.set_postfix(doc=Path(name).name[:24], method=method)
            bar.update(1)
    bar.close()
    return totals


def method_slots(method: str, args, ev: Evaluation, num_layers: int) -> list[int] | None:
    """Slots per layer of a method's cache (None: the full cache keeps everything)."""
    if method == "full":
        return None
    if method == "lococo":
        return ev.compressor.config.slots_per_layer(num_layers)
    return list(args.num_slots) if isinstance(args.num_slots, list) else [args.num_slots] * num_layers


def slot_bytes(slots: list[int], geometry, quantization, dtype: str) -> int:
    """Bytes at rest of the compressed slots (keys and values, all KV heads) in a ``dtype`` model, ``slots`` one M per
    compressed layer:
    quantized slots count their codes and scales, whatever the model's dtype."""
    import torch

    if quantization is not None:
        per_entry = quantization.entry_bytes(geometry.head_dim)
    else:
        per_entry = 2 * geometry.head_dim * torch.finfo(getattr(torch, dtype)).bits // 8
    return round(sum(slots) * geometry.num_kv_heads * per_entry)


def report(args, ev: Evaluation, totals: dict[str, Totals]) -> None:
    """The CSV files, the table, the plot and the metadata in --output."""
    import torch
    import transformers

    import lococo

    from ..compressor import ModelGeometry
    from . import assets

    edges = args.buckets
    labels = [bucket_label(lo, hi) for lo, hi in zip(edges, edges[1:])]
    rows, method_rows = [], []
    geometry = ModelGeometry.of(ev.model)
    for method, total in totals.items():
        slots = method_slots(method, args, ev, geometry.num_layers)
        if slots is not None:   # the compressed layers only: a mixed model's sliding-window layers keep their window
            slots = [slots[i] for i in geometry.compressed_layers]
        spec = method_quantization(method, args, ev)
        m_slots = None if slots is None else round(sum(slots) / len(slots))
        # per-layer slots always come with a label, but LoCoCo's own when the baselines were given none
        budgets = None if slots is None or len(set(slots)) == 1 else args.budgets_label or "compressor's"
        intervals = bootstrap_intervals(total.per_document, args.bootstrap, seed=0)
        for label, lo, hi, loss_sum, n, (ppl_low, ppl_high) in zip(
                labels + ["all"], edges[:-1] + [edges[0]], edges[1:] + [edges[-1]],
                total.sums + [sum(total.sums)], total.counts + [sum(total.counts)], intervals):
            nll = loss_sum / n if n else None
            rows.append({"method": method, "num_slots": m_slots, "bucket": label, "start": lo,
                         "end": hi, "tokens": n, "nll": None if nll is None else round(nll, 5),
                         "ppl": None if nll is None else round(math.exp(nll), 4),
                         "ppl_low": ppl_low, "ppl_high": ppl_high})
        tokens = sum(total.counts)
        num_local = (args.num_local if method in KEEPS_RECENT else
                     ev.compressor.config.num_local if method == "lococo" and ev.compressor is not None else 0)
        method_rows.append({"method": method, "num_slots": m_slots, "budgets": budgets,
                            "slots_per_layer": None if slots is None else " ".join(map(str, slots)),
                            "kv_storage": spec.label() if spec else "",
                            "slot_kv_bytes": None if slots is None else slot_bytes(slots, geometry, spec, args.dtype),
                            "slot_kv_bytes_bf16": None if slots is None else slot_bytes(slots, geometry, spec,
                                                                                        "bfloat16"),
                            "num_local": num_local,
                            "chunk_size": args.chunk_size, "beta": args.beta, "peak_kv_bytes": total.peak_bytes,
                            "peak_entries_per_layer": total.peak_entries,
                            "tokens": tokens, "seconds": round(total.seconds, 2),
                            "tokens_per_second": round(tokens / max(total.seconds, 1e-9), 1)})
    output = Path(args.output)
    write_results(output, rows, method_rows, labels, args.mean_slots)
    write_per_document(output, totals, ev.docs, labels)
    (output / "eval_meta.json").write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "validate")},
        "documents": [name for name, _ in ev.docs], "left_out_documents": ev.left_out,
        "model": assets.shared_path(ev.model_path), "device": str(ev.device), "lococo": lococo.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__}, indent=1, default=str) + "\n")
    print((output / "results.md").read_text(), end="")
    print(f"results in {output}/")


def main(args) -> int:
    """`lococo eval`, with arguments that ``validate`` has checked and completed."""
    ev = set_up(args)
    if args.task == "passkey":
        passkey.main(args, ev)
        return 0
    report(args, ev, run_methods(args, ev))
    return 0
