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

The last table and --plot give the perplexity over a span of positions (by default 2K-8K,
merged from its buckets by their NLL and token counts) against M, one column (line) per method,
with the full cache as a horizontal line.

    python benchmarks/summarize_evals.py RUN [RUN ...] --output summary.md [--plot quality_vs_memory.png]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from lococo.recipes.evaluate import METHODS, bucket_label, method_label as label

BASELINES = ("h2o", "tova", "streaming")


def read_run(folder: Path) -> tuple[dict, dict]:
    """(what the run evaluated: documents, range, buckets), {(method, M, num_local): {bucket: (nll, tokens)}}."""
    meta = json.loads((folder / "eval_meta.json").read_text())
    args = meta["args"]
    scope = {"documents": meta["documents"], "start_token": args["start_token"], "max_tokens": args["max_tokens"],
             "buckets": args["buckets"], "chunk_size": args["chunk_size"], "beta": args["beta"]}
    with open(folder / "methods.csv") as handle:
        local = {row["method"]: int(row.get("num_local") or 0) for row in csv.DictReader(handle)}
    results: dict = {}
    scope["names"] = []
    with open(folder / "ppl_by_position.csv") as handle:
        for row in csv.DictReader(handle):
            if row["bucket"] != "all" and row["bucket"] not in scope["names"]:
                scope["names"].append(row["bucket"])
            method = row["method"]
            key = (method, int(row["num_slots"]) if row["num_slots"] else None, local.get(method, 0))
            if row["nll"]:
                results.setdefault(key, {})[row["bucket"]] = (float(row["nll"]), int(row["tokens"]))
    return scope, results


def merge(folders: list[Path]) -> tuple[dict, dict]:
    scope, merged = None, {}
    for folder in folders:
        run_scope, results = read_run(folder)
        if scope is None:
            scope = run_scope
        for name, value in run_scope.items():
            if value != scope[name]:
                sys.exit(f"summarize_evals: {folder} evaluated other {name} than {folders[0]}; runs on different "
                         "text or settings cannot share a table")
        for key, buckets in results.items():
            if key in merged and any(abs(merged[key][b][0] - nll) > 1e-4 for b, (nll, _) in buckets.items()):
                sys.exit(f"summarize_evals: {label(key[0], key[2])} at M = {key[1]} differs between runs")
            merged.setdefault(key, {}).update(buckets)
    return scope, merged


def ppl(buckets: dict, names: list[str]) -> float | None:
    """Perplexity over several buckets together: exp of the token-weighted mean NLL."""
    if not all(name in buckets for name in names):
        return None
    tokens = sum(buckets[n][1] for n in names)
    return math.exp(sum(buckets[n][0] * buckets[n][1] for n in names) / tokens) if tokens else None


def order(key) -> tuple:
    method, slots, local = key
    return (slots or 0, METHODS.index(method), local)


def span_names(scope: dict, span: tuple[int, int]) -> list[str]:
    """The buckets that lie within ``span`` (positions), which the span's perplexity merges."""
    edges = scope["buckets"]
    names = [name for name, lo, hi in zip(scope["names"], edges, edges[1:]) if span[0] <= lo and hi <= span[1]]
    if not names:
        sys.exit(f"summarize_evals: no bucket lies within {span[0]}-{span[1]}")
    return names


def against_memory(scope: dict, merged: dict, span: tuple[int, int]) -> str:
    """The plot's numbers: perplexity over the span, one row per M, one column per method."""
    names = span_names(scope, span)
    methods = sorted({(k[0], k[2]) for k in merged if k[0] != "full"}, key=lambda m: (METHODS.index(m[0]), m[1]))
    full = next((ppl(v, names) for k, v in merged.items() if k[0] == "full"), None)
    lines = [f"Perplexity over tokens {bucket_label(*span)} against M:", "",
             "| M | full cache | " + " | ".join(label(*m) for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for slots in sorted({k[1] for k in merged if k[1] is not None}):
        cells = [ppl(merged[(m, slots, local)], names) if (m, slots, local) in merged else None
                 for m, local in methods]
        lines.append(f"| {slots} | {'-' if full is None else f'{full:.2f}'} | "
                     + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def tables(scope: dict, merged: dict, span: tuple[int, int] = (2048, 8192)) -> str:
    names = scope["names"]
    lines = [f"{len(scope['documents'])} documents, tokens {scope['start_token']}-"
             f"{scope['start_token'] + scope['max_tokens']}, B = {scope['chunk_size']}, beta = {scope['beta']}", "",
             "| method | M | " + " | ".join(names) + " | all |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for key in sorted(merged, key=order):
        cells = [ppl(merged[key], [n]) for n in names] + [ppl(merged[key], names)]
        lines.append(f"| {label(key[0], key[2])} | {key[1] or 'all'} | "
                     + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    full = next((v for k, v in merged.items() if k[0] == "full"), None)
    for key in sorted((k for k in merged if k[0] == "lococo"), key=order):
        rivals = {k: v for k, v in merged.items() if k[0] in BASELINES and k[1] == key[1]}
        if full is None or not rivals:
            continue
        lines += ["", f"Share of the gap between the better baseline and the full cache that LoCoCo closes, "
                      f"M = {key[1]}:", "", "| bucket | full | LoCoCo | better baseline | share |",
                  "|---|---:|---:|---|---:|"]
        for name in names:
            best_key = min(rivals, key=lambda k: ppl(rivals[k], [name]) or math.inf)
            f, lo, b = ppl(full, [name]), ppl(merged[key], [name]), ppl(rivals[best_key], [name])
            if None in (f, lo, b):
                continue
            share = (b - lo) / (b - f) if b != f else math.nan
            lines.append(f"| {name} | {f:.2f} | {lo:.2f} | {label(best_key[0], best_key[2])} {b:.2f} | "
                         f"{100 * share:.0f}% |")
    return "\n".join(lines) + "\n\n" + against_memory(scope, merged, span)


def plot(scope: dict, merged: dict, path: Path, span: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = span_names(scope, span)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lines: dict = {}
    for key in sorted(merged, key=order):
        value = ppl(merged[key], names)
        if key[0] == "full" and value is not None:
            ax.axhline(value, color="black", linestyle="--", label=f"full cache ({value:.2f})")
        elif value is not None:
            lines.setdefault((key[0], key[2]), []).append((key[1], value))
    for (method, local), points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label(method, local))
    ax.set_xscale("log", base=2)
    ax.set(xlabel="M, slots per layer and KV head (KV memory grows with M)",
           ylabel=f"perplexity, tokens {bucket_label(*span)}",
           title=f"quality against memory ({len(scope['documents'])} documents)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
    scope, merged = merge(args.runs)
    text = tables(scope, merged, tuple(args.span))
    if args.output:
        args.output.write_text(text)
    print(text, end="")
    if args.plot:
        plot(scope, merged, args.plot, tuple(args.span))
    return 0


if __name__ == "__main__":
    sys.exit(main())
