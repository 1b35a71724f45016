"""One table, the share of the gap LoCoCo closes, and a quality-against-memory plot, from `lococo eval` folders.

Each folder is the --output of one `lococo eval` run (ppl_by_position.csv, methods.csv,
eval_meta.json). Runs on the same documents and token range can be merged: the baselines of one
run, LoCoCo of another, H2O with another recent window of a third, or the same methods at other M.
Folders on different documents, ranges or buckets are refused, so that no number in the table
mixes two sets of text.

For every M where LoCoCo was run and every bucket, the better baseline is the lowest perplexity
among the H2O, TOVA and StreamingLLM rows at that M, and the share of the gap that LoCoCo closes is

    (ppl_better_baseline - ppl_lococo) / (ppl_better_baseline - ppl_full)

(1 is the full cache's quality, 0 the baseline's, negative is worse than the baseline).

Rows with per-layer budgets (`lococo eval --budgets`, or a compressor with budgets) or quantized slots
(`--kv-bits`) are told apart by them; for each of them, the share of the gap between uniform H2O in the
model's dtype (same recent window) and the full cache that they close is tabled too, against the uniform
H2O row that takes the same bytes (within 2%), else the one at the same M. Quantized rows also get their
perplexity change against the same method, slots and budgets in the model's dtype.

The last table and --plot give the perplexity over a span of positions (by default 2K-8K,
merged from its buckets by their NLL and token counts) against memory: the bytes of the compressed
slots of all layers in a bf16 model (quantized slots: their codes and scales, whatever the model's
dtype; the entries appended since the last compression come on top, the same for all methods), one
column (line) per method, budgets and storage, with the full cache as a horizontal line.

    python benchmarks/summarize_evals.py RUN [RUN ...] --output summary.md [--plot quality_vs_memory.png]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from lococo.recipes.evaluate import bucket_label
from lococo.recipes.methods import METHODS, method_label

BASELINES = ("h2o", "tova", "streaming")
BUDGET_NAMES: dict[str, str] = {}   # slots per layer -> the name a run gave those budgets


def label(method: str, local: int, budgets: str = "", storage: str = "") -> str:
    return method_label(method, local, budgets or None, storage or None)


def key_label(key) -> str:
    return label(key[0], key[2], key[3], key[4])


def read_run(folder: Path) -> tuple[dict, dict, dict]:
    """(what the run evaluated: documents, range, buckets), {(method, M, num_local, budgets, storage): {bucket: (nll,
    tokens)}}, and {that key: bytes of the compressed slots of all layers in a bf16 model}."""
    meta = json.loads((folder / "eval_meta.json").read_text())
    args = meta["args"]
    scope = {"documents": meta["documents"], "start_token": args["start_token"], "max_tokens": args["max_tokens"],
             "buckets": args["buckets"], "chunk_size": args["chunk_size"], "beta": args["beta"]}
    with open(folder / "methods.csv") as handle:
        methods = {row["method"]: row for row in csv.DictReader(handle)}
    local = {method: int(row.get("num_local") or 0) for method, row in methods.items()}
    budgets = {method: row.get("budgets") or "" for method, row in methods.items()}
    storage = {method: row.get("kv_storage") or "" for method, row in methods.items()}
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.get("dtype") or "float32"]
    # LoCoCo's budgets are named "compressor's" in its run; rows of other runs with the same slots name them
    for method, row in methods.items():
        if budgets[method] == "compressor's" and row.get("slots_per_layer"):
            budgets[method] = BUDGET_NAMES.get(row["slots_per_layer"], budgets[method])
        elif budgets[method] and row.get("slots_per_layer"):
            BUDGET_NAMES.setdefault(row["slots_per_layer"], budgets[method])
    memory = {}
    for method, row in methods.items():
        if not row["num_slots"]:
            continue
        key = (method, int(row["num_slots"]), local[method], budgets[method], storage[method])
        if row.get("slot_kv_bytes_bf16"):
            memory[key] = int(row["slot_kv_bytes_bf16"])
        elif row.get("slot_kv_bytes"):   # runs before quantized slots: the model's dtype
            memory[key] = int(row["slot_kv_bytes"]) * 2 // dtype_bytes
        elif row.get("peak_kv_bytes"):  # runs before the column: the peak holds M + beta + B entries per layer
            memory[key] = (int(row["peak_kv_bytes"]) * int(row["num_slots"]) // int(row["peak_entries_per_layer"])
                           * 2 // dtype_bytes)
    results: dict = {}
    scope["names"] = []
    with open(folder / "ppl_by_position.csv") as handle:
        for row in csv.DictReader(handle):
            if row["bucket"] != "all" and row["bucket"] not in scope["names"]:
                scope["names"].append(row["bucket"])
            method = row["method"]
            key = (method, int(row["num_slots"]) if row["num_slots"] else None, local.get(method, 0),
                   budgets.get(method, ""), storage.get(method, ""))
            if row["nll"]:
                results.setdefault(key, {})[row["bucket"]] = (float(row["nll"]), int(row["tokens"]))
    return scope, results, memory


def merge(folders: list[Path]) -> tuple[dict, dict, dict]:
    scope, merged, memory = None, {}, {}
    for folder in folders:   # a first pass learns the names of the budgets
        read_run(folder)
    for folder in folders:
        run_scope, results, run_memory = read_run(folder)
        memory.update(run_memory)
        if scope is None:
            scope = run_scope
        for name, value in run_scope.items():
            if value != scope[name]:
                sys.exit(f"summarize_evals: {folder} evaluated other {name} than {folders[0]}; runs on different "
                         "text or settings cannot share a table")
        for key, buckets in results.items():
            if key in merged and any(abs(merged[key][b][0] - nll) > 1e-4 for b, (nll, _) in buckets.items()):
                sys.exit(f"summarize_evals: {key_label(key)} at M = {key[1]} differs between runs")
            merged.setdefault(key, {}).update(buckets)
    return scope, merged, memory


def ppl(buckets: dict, names: list[str]) -> float | None:
    """Perplexity over several buckets together: exp of the token-weighted mean NLL."""
    if not all(name in buckets for name in names):
        return None
    tokens = sum(buckets[n][1] for n in names)
    return math.exp(sum(buckets[n][0] * buckets[n][1] for n in names) / tokens) if tokens else None


def order(key) -> tuple:
    method, slots, local, budgets, storage = key
    return (slots or 0, METHODS.index(method), local, budgets, storage)


def span_names(scope: dict, span: tuple[int, int]) -> list[str]:
    """The buckets that lie within ``span`` (positions), which the span's perplexity merges."""
    edges = scope["buckets"]
    names = [name for name, lo, hi in zip(scope["names"], edges, edges[1:]) if span[0] <= lo and hi <= span[1]]
    if not names:
        sys.exit(f"summarize_evals: no bucket lies within {span[0]}-{span[1]}")
    return names


def against_memory(scope: dict, merged: dict, memory: dict, span: tuple[int, int]) -> str:
    """The plot's numbers: perplexity over the span and the slots' memory, one row per M, one column per method."""
    names = span_names(scope, span)
    methods = sorted({(k[0], k[2], k[3], k[4]) for k in merged if k[0] != "full"},
                     key=lambda m: (METHODS.index(m[0]), m[1], m[2], m[3]))
    full = next((ppl(v, names) for k, v in merged.items() if k[0] == "full"), None)
    lines = [f"Perplexity over tokens {bucket_label(*span)} against M (and the compressed slots' KV MiB in a bf16 "
             "model):", "",
             "| M | full cache | " + " | ".join(label(*m) for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for slots in sorted({k[1] for k in merged if k[1] is not None}):
        cells = []
        for m, local, budgets, storage in methods:
            key = (m, slots, local, budgets, storage)
            value = ppl(merged[key], names) if key in merged else None
            cells.append("-" if value is None else f"{value:.2f}" + (f" ({memory[key] / 2**20:.2f})" if key in memory
                                                                      else ""))
        lines.append(f"| {slots} | {'-' if full is None else f'{full:.2f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_h2o(key, merged: dict, memory: dict):
    """The uniform H2O row in the model's dtype (same recent window for H2O and TOVA) that takes the same bytes as
    ``key`` (within 2%), else the one at the same M; None when there is neither."""
    uniform = [k for k in merged if k[0] == "h2o" and not k[3] and not k[4]
               and (k[2] == key[2] or key[0] not in ("h2o", "tova"))]
    mine = memory.get(key)
    same_bytes = [k for k in uniform if mine and memory.get(k) and abs(memory[k] - mine) <= 0.02 * memory[k]]
    same_m = [k for k in uniform if k[1] == key[1]]
    return (same_bytes or same_m or [None])[0]


def gap_shares(names: list[str], merged: dict, memory: dict) -> list[str]:
    """For every row with per-layer budgets or quantized slots: the share of the gap between uniform H2O (same bytes,
    else same M) and the full cache it closes, and the perplexity change of quantized slots alone."""
    full = next((v for k, v in merged.items() if k[0] == "full"), None)
    lines, changes = [], []
    for key in sorted((k for k in merged if (k[3] or k[4]) and k[0] != "full"), key=order):
        uniform = reference_h2o(key, merged, memory)
        if full is not None and uniform is not None:
            shares = []
            for name in names:
                f, b, x = ppl(full, [name]), ppl(merged[uniform], [name]), ppl(merged[key], [name])
                shares.append("-" if None in (f, b, x) or b == f else f"{100 * (b - x) / (b - f):.0f}%")
            lines.append(f"| {key_label(key)} | {key[1]} | {key_label(uniform)}, M = {uniform[1]} | "
                         + " | ".join(shares) + " |")
        unquantized = (*key[:4], "")
        if key[4] and unquantized in merged:
            cells = []
            for name in names:
                a, b = ppl(merged[unquantized], [name]), ppl(merged[key], [name])
                cells.append("-" if None in (a, b) else f"{100 * (b - a) / a:+.2f}%")
            changes.append(f"| {key_label(key)} | {key[1]} | " + " | ".join(cells) + " |")
    out = []
    if lines:
        out += ["", "Share of the gap between uniform H2O (the model's dtype, same recent window, the same bytes or "
                "else the same M) and the full cache that each run with per-layer budgets or quantized slots closes:",
                "", "| method | M | against | " + " | ".join(names) + " |", "|---|---:|---|" + "---:|" * len(names),
                *lines]
    if changes:
        out += ["", "Perplexity change of quantized slots against the same method, slots and budgets in the model's "
                "dtype:", "", "| method | M | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names),
                *changes]
    return out


def tables(scope: dict, merged: dict, memory: dict, span: tuple[int, int] = (2048, 8192)) -> str:
    names = scope["names"]
    lines = [f"{len(scope['documents'])} documents, tokens {scope['start_token']}-"
             f"{scope['start_token'] + scope['max_tokens']}, B = {scope['chunk_size']}, beta = {scope['beta']}", "",
             "| method | M | " + " | ".join(names) + " | all |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for key in sorted(merged, key=order):
        cells = [ppl(merged[key], [n]) for n in names] + [ppl(merged[key], names)]
        lines.append(f"| {key_label(key)} | {key[1] or 'all'} | "
                     + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    full = next((v for k, v in merged.items() if k[0] == "full"), None)
    for key in sorted((k for k in merged if k[0] == "lococo"), key=order):
        rivals = {k: v for k, v in merged.items()
                  if k[0] in BASELINES and k[1] == key[1] and k[3] == key[3] and k[4] == key[4]}
        if full is None or not rivals:
            continue
        lines += ["", f"Share of the gap between the better baseline (same budgets) and the full cache that "
                      f"{key_label(key)} closes, M = {key[1]}:", "",
                  "| bucket | full | LoCoCo | better baseline | share |", "|---|---:|---:|---|---:|"]
        for name in names:
            best_key = min(rivals, key=lambda k: ppl(rivals[k], [name]) or math.inf)
            f, lo, b = ppl(full, [name]), ppl(merged[key], [name]), ppl(rivals[best_key], [name])
            if None in (f, lo, b):
                continue
            share = (b - lo) / (b - f) if b != f else math.nan
            lines.append(f"| {name} | {f:.2f} | {lo:.2f} | {key_label(best_key)} {b:.2f} | "
                         f"{100 * share:.0f}% |")
    lines += gap_shares(names, merged, memory)
    return "\n".join(lines) + "\n\n" + against_memory(scope, merged, memory, span)


def plot(scope: dict, merged: dict, memory: dict, path: Path, span: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = span_names(scope, span)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lines: dict = {}
    for key in sorted(merged, key=order):
        value = ppl(merged[key], names)
        if key[0] == "full" and value is not None:
            ax.axhline(value, color="black", linestyle="--", label=f"full cache ({value:.2f})")
        elif value is not None and key in memory:
            lines.setdefault((key[0], key[2], key[3], key[4]), []).append((memory[key] / 2**20, value))
    for (method, local, budgets, storage), points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if not storage else "s",
                label=label(method, local, budgets, storage), linestyle="-" if not budgets else "--")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="KV MiB of the compressed slots, all layers, in a bf16 model (quantized: codes and scales)",
           ylabel=f"perplexity, tokens {bucket_label(*span)}",
           title=f"quality against memory ({len(scope['documents'])} documents)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="lococo eval --output folders")
    parser.add_argument("--output", type=Path, default=None, help="write the tables here (default: print)")
    parser.add_argument("--plot", type=Path, default=None, help="quality-against-memory PNG")
    parser.add_argument("--span", type=int, nargs=2, default=(2048, 8192), metavar=("START", "END"),
                        help="positions that the plot's perplexity and the table against M cover "
                             "(default: 2048 8192)")
    args = parser.parse_args(argv)
    for folder in args.runs:
        if not (folder / "eval_meta.json").is_file():
            parser.error(f"{folder}: not a lococo eval output folder (no eval_meta.json)")
    scope, merged, memory = merge(args.runs)
    text = tables(scope, merged, memory, tuple(args.span))
    if args.output:
        args.output.write_text(text)
    print(text, end="")
    if args.plot:
        plot(scope, merged, memory, args.plot, tuple(args.span))
    return 0


if __name__ == "__main__":
    sys.exit(main())
