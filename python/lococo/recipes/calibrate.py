"""Per-layer slot budgets for a model, from its own error curves (docs/design.md#per-layer-budgets).

The frozen model reads calibration text once with the full cache, recording every layer's queries,
keys, values and attention output. Each layer then replays a training-free cache (H2O by default,
with the same trigger, scores and recent window as at inference) over its own recorded tensors at
every M of --grid, and the layer's error at that M is the mean over the document's chunks of

    || (O - O_full) W_o^T ||^2 / || O_full W_o^T ||^2

(chunks before the first compression lose nothing and count 0); with --error residual the
denominator is the squared norm of the residual stream entering the layer instead, so that a layer
whose attention adds little to the stream counts for little; with --error loss a chunk's error is
sum_t (g_t . (O_t - O_full,t) W_o^T)^2, g the gradient of the document's summed NLL with respect to
the layer's attention output (one extra forward and backward of the full cache per document): an
estimate of what the layer's error costs the loss (empirical Fisher), in the same units for every
layer. A total of --mean x layers slots is then spent by marginal gain: every layer starts at
--floor, and each slot goes to the layer whose measured error curve (its convex envelope, linear
between grid points) it lowers most.

With --kv-bits 8 or 4 the replayed caches store their slots quantized (docs/design.md#quantized-slots), so
that the curves include the rounding. With --curves FILE nothing is measured: the curves (and the settings
they were measured with) come from an earlier budget file, and only the allocation at each --mean runs.

Calibration text is the training split (never the test documents) or your own files (--docs).
Needs no training. Writes into --output: one budget file per --mean (budgets-m<MEAN>.json, for
--budgets of eval, distill and build_cache), curves.csv (every layer's error at every M),
calibrate.md (the table) and budgets.png (the curves and the allocations).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
import time
from pathlib import Path

from .argtypes import (
    UsageError,
    add_assets_dir,
    add_slot_storage,
    check_writable,
    int_at_least,
    non_negative_int,
    positive_int,
)

CALIBRATED_METHODS = ("h2o", "tova", "streaming")
ERRORS = ("relative", "residual", "loss")
ERROR_WORDS = {
    "relative": "the relative error of its attention output after the output projection",
    "residual": "the error of its attention output after the output projection, relative to the residual stream",
    "loss": "sum_t (g_t . error_t)^2, the error of its attention output after the output projection weighted by the "
            "loss's gradient: an estimate of the loss increase (empirical Fisher)",
}
DEFAULT_GRID = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a from_pretrained folder, or a fetched model: smollm2-135m "
                        "(default) or gemma3-270m")
    add_assets_dir(parser)
    parser.add_argument("--docs", nargs="+", metavar="FILE", help="your own plain-text calibration documents "
                        "(default: the packaged split's training documents)")
    parser.add_argument("--split-file", default=None, help="another splits.json")
    parser.add_argument("--max-docs", type=positive_int, default=2, help="calibration documents (default 2)")
    parser.add_argument("--max-tokens", type=int_at_least(2), default=8192,
                        help="tokens of each document (default 8192); shorter documents are left out")
    parser.add_argument("--method", default="h2o", choices=CALIBRATED_METHODS,
                        help="the cache whose error is measured (default h2o)")
    parser.add_argument("--num-local", type=non_negative_int, default=16,
                        help="recent entries H2O and TOVA always keep (default 16)")
    parser.add_argument("--beta", type=non_negative_int, default=16, help="slack (default 16)")
    parser.add_argument("--chunk-size", "-B", type=positive_int, default=128, help="tokens per chunk (default 128)")
    parser.add_argument("--grid", type=int_list, default=list(DEFAULT_GRID),
                        help=f"the M at which every layer is measured (default {','.join(map(str, DEFAULT_GRID))})")
    parser.add_argument("--mean", type=int_list, default=[64, 128, 256],
                        help="average slots per layer of the budgets to write, one file each (default 64,128,256)")
    parser.add_argument("--error", default="relative", choices=ERRORS,
                        help="each chunk's error relative to the full attention output (default), relative to the "
                             "residual stream entering the layer, or weighted by the loss's gradient (loss: an "
                             "estimate of the loss increase)")
    parser.add_argument("--floor", type=positive_int, default=32,
                        help="fewest slots any layer gets (default 32: LoCoCo's H = M/2 must hold --num-local 16)")
    parser.add_argument("--step", type=positive_int, default=4, help="slots given at a time (default 4)")
    parser.add_argument("--allocation", default="marginal", choices=["marginal", "sqrt-error"],
                        help="marginal: each slot where it lowers the summed error most (default); sqrt-error: beyond "
                             "the floor, in proportion to the square root of each layer's error at the mean M")
    parser.add_argument("--name", default=None, help="the budgets' name prefix in the files (default: the model's "
                        "folder name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the model's forward (the replay runs in float32)")
    parser.add_argument("--curves", default=None, metavar="FILE",
                        help="allocate from the curves of an earlier budget file (path or shipped name) instead of "
                             "measuring; the settings they were measured with are that file's")
    add_slot_storage(parser)
    parser.add_argument("--output", required=True, help="output folder")


def validate(args) -> None:
    if args.curves is not None:
        take_curves(args)
    args.grid = sorted(set(args.grid))
    if len(args.grid) < 2:
        raise UsageError("--grid needs at least two values of M")
    if args.floor < args.grid[0]:
        raise UsageError(f"--floor {args.floor} is below the smallest --grid M {args.grid[0]}: the curves would not "
                         "cover it")
    if args.method in ("h2o", "tova") and args.grid[0] < args.num_local:
        raise UsageError(f"--grid starts at M = {args.grid[0]}, below --num-local {args.num_local}")
    if args.method == "streaming" and args.grid[0] < 4:
        raise UsageError("--grid must start at M >= 4 for streaming (4 attention sinks)")
    for mean in args.mean:
        if not args.floor <= mean <= args.grid[-1]:
            raise UsageError(f"--mean {mean} must lie in [--floor {args.floor}, the largest --grid M {args.grid[-1]}]")
    for path in args.docs or []:
        if not Path(path).is_file():
            raise UsageError(f"--docs {path}: no such file")
    from .evaluate import fill_quantization

    fill_quantization(args)   # False (--kv-bits 16) means the model's dtype here too
    args.quantization = args.quantization or None
    check_writable(Path(args.output), "--output")


# the settings a budget file's curves were measured with, restored by --curves
MEASURED_WITH = {"method": "method", "error": "error", "num_local": "num_local", "beta": "beta",
                 "chunk_size": "chunk_size", "dtype": "dtype", "max_tokens": "tokens_per_document", "grid": "grid"}


def take_curves(args) -> None:
    """--curves: the grid, errors and settings of an earlier budget file (args.curve_errors, args.docs_measured)."""
    from ..budgets import Budgets

    if args.docs or args.kv_bits is not None:
        raise UsageError("--curves allocates from curves already measured: --docs and --kv-bits do not apply")
    try:
        details = Budgets.load(args.curves).details or {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--curves: {exc}") from None
    if "errors" not in details or "grid" not in details:
        raise UsageError(f"--curves {args.curves}: the file holds no calibration curves (details.grid, details.errors)")
    for arg, key in MEASURED_WITH.items():
        if key in details:
            setattr(args, arg, details[key])
    args.kv_bits, args.kv_storage_label = None, details.get("kv_storage")
    args.curve_errors, args.docs_measured = details["errors"], details.get("documents", [])
    args.measured_seconds = details.get("seconds")   # the measurement's time, not the reallocation's


def calibration_documents(args, tokenizer) -> list[tuple[str, list[int]]]:
    """(name, first --max-tokens token ids) of the calibration documents: --docs, else the training split."""
    from . import assets

    if args.docs:
        texts = [(path, Path(path).read_text(encoding="utf-8", errors="replace")) for path in args.docs]
    else:
        from .evaluate import round_robin

        split = assets.load_split(args.split_file)
        # in turn from each source (the manuals, the Python docs): the layers' errors differ by kind of text
        long_enough = round_robin([doc for doc in split.train if doc.tokens >= args.max_tokens],
                                  key=lambda d: d.source)
        problems = assets.check_documents(long_enough[:4 * args.max_docs], args.assets_dir)
        usable = [doc for doc in long_enough if doc.id not in problems][:args.max_docs]
        if not usable:
            raise assets.AssetMissingError("The training text", assets.cache_dir(args.assets_dir), "train-text")
        texts = [(doc.id, assets.read_document(doc.id, args.assets_dir)) for doc in usable]
    docs = []
    for name, text in texts:
        ids = assets.encode(tokenizer, text)[:args.max_tokens]
        if len(ids) < args.max_tokens:
            print(f"lococo calibrate: warning: {name} has {len(ids)} tokens, fewer than --max-tokens "
                  f"{args.max_tokens}; left out", file=sys.stderr)
            continue
        docs.append((name, ids))
    if not docs:
        raise UsageError(f"no calibration document has {args.max_tokens} tokens (--max-tokens)")
    return docs[:args.max_docs]


def cache_layer(method: str, num_slots: int, args):
    from ..hf.caches.baselines import H2OLayer, StreamingLLMLayer, TOVALayer

    storage = getattr(args, "quantization", None)
    if method == "h2o":
        return H2OLayer(num_slots, args.beta, args.num_local, storage)
    if method == "tova":
        return TOVALayer(num_slots, args.beta, args.num_local, storage)
    return StreamingLLMLayer(num_slots, args.beta, quantization=storage)


def measure_curves(args, model, docs) -> list[list[float] | None]:
    """errors[layer][j]: the layer's mean error per chunk with grid[j] slots, averaged over the documents; None for
    a sliding-window layer of a mixed model, which keeps transformers' window and is not compressed."""
    import torch
    from tqdm.auto import tqdm

    from .replay import CAPTURE, attention_output_gradients, register_capture, replay, teacher_records

    register_capture()
    original = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    from ..compressor import ModelGeometry

    decoder_layers = model.model.layers
    compressed = ModelGeometry.of(model).compressed_layers
    sums = [[0.0] * len(args.grid) for _ in decoder_layers]
    residual: dict[int, torch.Tensor] = {}   # layer -> [b, T] squared norm of the hidden state entering it

    def record_residual(index, module, args_, kwargs):
        hidden = args_[0] if args_ else kwargs["hidden_states"]
        residual[index] = hidden.detach().float().pow(2).sum(-1)

    hooks = [layer.register_forward_pre_hook(functools.partial(record_residual, i), with_kwargs=True)
             for i, layer in enumerate(decoder_layers)] if getattr(args, "error", "relative") == "residual" else []
    bar = tqdm(total=len(docs) * len(compressed), desc="lococo calibrate", unit="layer")
    try:
        for _, ids in docs:
            ids = torch.tensor([ids], device=next(model.parameters()).device)
            gradients = {}
            if getattr(args, "error", "relative") == "loss":
                model.set_attn_implementation(original)
                gradients = attention_output_gradients(model, ids)
                model.set_attn_implementation(CAPTURE)
            records = teacher_records(model, ids)
            for index, decoder_layer in enumerate(decoder_layers):
                if index not in compressed:
                    records[index] = None
                    continue
                attn = decoder_layer.self_attn
                with torch.no_grad():
                    for j, num_slots in enumerate(args.grid):
                        layer = cache_layer(args.method, num_slots, args)
                        result = replay(layer, records[index], attn, args.chunk_size, scale=residual.get(index),
                                        gradient=gradients.get(index))
                        sums[index][j] += result.per_chunk
                records[index] = gradients[index] = None
                bar.update(1)
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation(original)
    return [[value / len(docs) for value in layer] if i in compressed else None for i, layer in enumerate(sums)]


def write_outputs(args, errors, allocations: dict[int, list[int]], docs, geometry, seconds: float, name: str):
    from ..budgets import Budgets

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", *(f"M={m}" for m in args.grid)])
        for layer, curve in enumerate(errors):
            if curve is not None:   # sliding-window layers are not compressed
                writer.writerow([layer, *(f"{e:.6g}" for e in curve)])
    details = {
        "method": args.method, "error": args.error, "num_local": args.num_local if args.method != "streaming" else 0,
        "beta": args.beta, "chunk_size": args.chunk_size, "floor": args.floor, "step": args.step,
        "allocation": args.allocation, "kv_storage": storage_label(args),
        "documents": [doc for doc, _ in docs], "tokens_per_document": args.max_tokens, "dtype": args.dtype,
        "grid": args.grid, "errors": [None if curve is None else [round(e, 6) for e in curve] for curve in errors],
        "seconds": round(getattr(args, "measured_seconds", None) or seconds, 1),
    }
    files = []
    for mean, slots in allocations.items():
        budgets = Budgets(tuple(slots), source="calibrated", model=geometry.to_dict(),
                          details={**details, "name": f"{name}-{args.method}{error_suffix(args)}{storage_suffix(args)}"
                                                            f"-m{mean}",
                                   "mean_slots": mean})
        files.append(budgets.save(out / f"budgets-m{mean}.json"))

    means = list(allocations)
    lines = [f"Per-layer budgets of {name}, calibrated with {args.method} "
             f"({details['num_local']} recent, beta {args.beta}, chunks of {args.chunk_size}) on {len(docs)} "
             f"document(s) of {args.max_tokens} tokens ({', '.join(d for d, _ in docs)}), floor {args.floor}, "
             f"{details['seconds']:.0f} s.", "",
             f"Each layer's error (mean over chunks of {ERROR_WORDS[args.error]}) at each M, and the M it gets at "
             "each mean:", "",
             "| layer | " + " | ".join(f"M={m}" for m in args.grid) + " | "
             + " | ".join(f"mean {m}" for m in means) + " |",
             "|---:|" + "---:|" * (len(args.grid) + len(means))]
    measured = [layer for layer, curve in enumerate(errors) if curve is not None]
    for layer in measured:
        lines.append(f"| {layer} | " + " | ".join(f"{e:.4f}" for e in errors[layer]) + " | "
                     + " | ".join(str(allocations[m][layer]) for m in means) + " |")
    lines.append("| sum | " + " | ".join(f"{sum(errors[i][j] for i in measured):.4f}" for j in range(len(args.grid)))
                 + " | " + " | ".join(str(sum(allocations[m][i] for i in measured)) for m in means) + " |")
    if len(measured) < len(errors):
        lines += ["", f"Layers {[i for i in range(len(errors)) if i not in measured]} are sliding-window layers: they "
                  "keep transformers' window cache, are not compressed, and their entries in the budget file "
                  "(the mean) "
                  "are not used."]
    (out / "calibrate.md").write_text("\n".join(lines) + "\n")
    plot(out / "budgets.png", args.grid, errors, allocations, name)
    return files


def storage_label(args) -> str | None:
    """The slots' storage the curves were measured with (None: the model's dtype)."""
    quantization = getattr(args, "quantization", None)
    return quantization.label() if quantization else getattr(args, "kv_storage_label", None)


def error_suffix(args) -> str:
    """"-loss" or "-residual" in a budget's name; nothing for the relative error, the first one."""
    error = getattr(args, "error", None) or "relative"
    return "" if error == "relative" else f"-{error}"


def storage_suffix(args) -> str:
    quantization = getattr(args, "quantization", None)
    return f"-{quantization.short_name}" if quantization else ""


def plot(path: Path, grid, errors, allocations: dict[int, list[int]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis([i / max(1, len(errors) - 1) for i in range(len(errors))])
    for layer, curve in enumerate(errors):
        if curve is not None:
            left.plot(grid, curve, color=colors[layer], marker=".", lw=1, label=str(layer) if layer % 5 == 0 else None)
    left.set(xscale="log", yscale="log", xlabel="slots M", ylabel="layer error", title=f"{name}: error against M")
    left.legend(title="layer", fontsize=7)
    left.grid(alpha=0.3)
    for mean, slots in allocations.items():
        right.plot(range(len(slots)), slots, marker="o", ms=3, label=f"mean {mean}")
        right.axhline(mean, ls=":", lw=0.8, color=right.lines[-1].get_color())
    right.set(xlabel="layer", ylabel="slots", title="calibrated budgets (dotted: uniform)")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..budgets import allocate, proportional_slots
    from ..compressor import ModelGeometry
    from . import assets

    started = time.perf_counter()
    model_path = assets.resolve_model(args.model, args.assets_dir)
    name = args.name or Path(str(model_path)).name
    if args.curves is not None:
        geometry = ModelGeometry.of(AutoConfig.from_pretrained(model_path))
        if len(args.curve_errors) != geometry.num_layers:
            raise UsageError(f"--curves {args.curves} has curves for {len(args.curve_errors)} layers, the model "
                             f"{geometry.num_layers}")
        docs, errors = [(doc, None) for doc in args.docs_measured], args.curve_errors
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        docs = calibration_documents(args, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval()
        geometry = ModelGeometry.of(model)
        errors = measure_curves(args, model, docs)
    compressed = geometry.compressed_layers
    measured = [i for i, curve in enumerate(errors) if curve is not None]
    if measured != compressed:
        raise UsageError(f"the curves cover layers {measured}, the model compresses {compressed}")
    allocations = {}
    for mean in args.mean:
        try:
            total = mean * len(compressed)
            curves = [errors[i] for i in compressed]
            spent = (allocate(args.grid, curves, total, args.floor, step=args.step) if args.allocation == "marginal"
                     else proportional_slots(args.grid, curves, total, args.floor, power=0.5))
        except ValueError as exc:
            raise UsageError(f"--mean {mean}: {exc}") from None
        # a sliding-window layer's entry (not used) is the mean
        allocations[mean] = [spent[compressed.index(i)] if i in compressed else mean for i in range(len(errors))]
    files = write_outputs(args, errors, allocations, docs, geometry, time.perf_counter() - started, name)
    print((Path(args.output) / "calibrate.md").read_text(), end="")
    for file in files:
        print(f"budgets: {file}")
    return 0
