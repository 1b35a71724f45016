"""Where the compression error is, layer by layer, and how much of it a better selection could remove.

For held-out documents (the eval's test split, the same round-robin choice as `lococo eval
--max-docs`), the frozen model runs once with the full cache and every layer's queries, keys, values
and attention output are recorded (`lococo distill`'s teacher). Each layer then replays its cache over
its own recorded keys and values, chunk by chunk as at inference (`distill.replay_layer`), three ways:

  h2o        the top-M selection with the same trigger, recent window and scores (alpha = 0, no slot
             logits): H2O as `lococo eval` runs it;
  lococo     the compressor under test;
  lookahead  the same top-M selection, but ranked by the attention that the coming chunk's own
             queries pay the stored entries: an oracle no cache can run, which bounds what any
             selection made once per chunk can reach with M slots.

The error of a chunk is || (O - O_full) W_o^T ||^2 / || O_full W_o^T ||^2 (O: the chunk's attention
outputs, W_o: the layer's output projection), averaged over the chunks after the first compression
and over documents. Inputs of every layer are the full cache's, so errors do not compound here as
they do in a real run. float32 throughout.

    python benchmarks/layer_error.py --compressor smollm2-135m-m128 --max-docs 2 --out DIR

Writes layer_error.csv and layer_error.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

VARIANTS = ("h2o", "lococo", "lookahead")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressor", default="smollm2-135m-m128", help="shipped name or folder")
    parser.add_argument("--max-docs", type=int, default=2, help="held-out documents (test split)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens of each document")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="layers to replay (default: all)")
    parser.add_argument("--assets-dir", default=None)
    parser.add_argument("--out", required=True, help="folder for layer_error.csv and layer_error.md")
    args = parser.parse_args(argv)
    if args.max_docs < 1 or args.max_tokens < 2:
        parser.error("--max-docs must be >= 1 and --max-tokens >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lococo import LoCoCoCompressor
    from lococo.recipes import assets, distill, evaluate

    eval_args = argparse.Namespace(docs=None, split_file=None, split="test", start_token=0,
                                   max_tokens=args.max_tokens, max_docs=args.max_docs, assets_dir=args.assets_dir)
    docs, _ = evaluate.select_documents(eval_args)
    model_path = assets.model_dir(args.assets_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    compressor = LoCoCoCompressor.from_pretrained(args.compressor, model=model).float().requires_grad_(False)
    config = compressor.config
    distill.register_capture()
    model.set_attn_implementation(distill.CAPTURE)
    layers = args.layers if args.layers else list(range(len(compressor.layers)))
    if any(not 0 <= i < len(compressor.layers) for i in layers):
        raise SystemExit(f"--layers must lie in 0..{len(compressor.layers) - 1}")

    errors = {(layer, v): [] for layer in layers for v in VARIANTS}
    started = time.perf_counter()
    for name, text in docs:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:args.max_tokens]
        records = distill.teacher_records(model, torch.tensor([ids]))
        for layer in layers:
            attn = model.model.layers[layer].self_attn
            runs = {"h2o": {"alpha": 0.0}, "lococo": {}, "lookahead": {"alpha": 0.0, "lookahead": True}}
            with torch.no_grad():
                for variant, options in runs.items():
                    total, count = distill.replay_layer(compressor.layers[layer], config.layer(layer), records[layer],
                                                        attn,
                                                        **options)
                    errors[layer, variant].append(total / max(1, count))
            records[layer] = None
            print(f"{name} layer {layer}: " + " ".join(f"{v} {errors[layer, v][-1]:.4f}" for v in VARIANTS),
                  file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mean = {key: sum(values) / len(values) for key, values in errors.items()}
    with open(out / "layer_error.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", *VARIANTS])
        for layer in layers:
            writer.writerow([layer, *(f"{mean[layer, v]:.6f}" for v in VARIANTS)])
    totals = {v: sum(mean[layer, v] for layer in layers) for v in VARIANTS}
    lines = [
        f"Layer-local relative error of the attention output, {config.num_slots} slots, "
        f"{len(docs)} held-out document(s) of {args.max_tokens} tokens ({', '.join(n for n, _ in docs)}), "
        f"compressor `{args.compressor}`, float32, {time.perf_counter() - started:.0f} s.",
        "",
        "| layer | H2O | LoCoCo | LoCoCo / H2O | lookahead oracle | oracle / H2O |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in sorted(layers, key=lambda i: -mean[i, "h2o"]):
        h2o = mean[layer, "h2o"]
        lines.append(f"| {layer} | {h2o:.4f} | {mean[layer, 'lococo']:.4f} | {mean[layer, 'lococo'] / h2o:.3f} | "
                     f"{mean[layer, 'lookahead']:.4f} | {mean[layer, 'lookahead'] / h2o:.3f} |")
    lines.append(f"| sum | {totals['h2o']:.4f} | {totals['lococo']:.4f} | {totals['lococo'] / totals['h2o']:.3f} | "
                 f"{totals['lookahead']:.4f} | {totals['lookahead'] / totals['h2o']:.3f} |")
    (out / "layer_error.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
