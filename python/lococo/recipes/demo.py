"""`lococo demo`: SmolLM2-135M reads a long held-out document with the full cache and with a
128-slot LoCoCo cache; perplexity and KV memory side by side, then a continuation generated
from the fixed-size cache.

Needs the assets (`python -m lococo assets fetch`, run by `make demo`) and runs offline.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from .argtypes import UsageError, add_assets_dir, int_at_least, non_negative_int

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_COMPRESSOR = PRETRAINED / "smollm2-135m-m128"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--doc", default=None,
                        help="a document id of the split (default: the first held-out State of "
                             "the Union speech long enough) or a plain-text file")
    parser.add_argument("--tokens", type=int_at_least(2), default=3072, help="tokens of the document to read")
    parser.add_argument("--compressor", default=str(DEFAULT_COMPRESSOR),
                        help="a LoCoCoCompressor folder or the name of a shipped one (default: the one shipped "
                             "for SmolLM2 at M = 128)")
    parser.add_argument("--generate", type=non_negative_int, default=40, help="tokens to generate after it")
    add_assets_dir(parser)


def validate(args) -> None:
    """The compressor must be readable, and --doc a file or a document id, before the model loads."""
    from ..compressor import read_compressor_config
    from .assets import SOURCES
    from .evaluate import check_compressor_fits

    if args.doc and not Path(args.doc).is_file() and args.doc.partition(":")[0] not in SOURCES:
        raise UsageError(f"--doc {args.doc}: neither a file nor a document id (<source>:<path>, source one of "
                         f"{', '.join(sorted(SOURCES))})")

    try:
        geometry = read_compressor_config(args.compressor)[1]
    except FileNotFoundError as exc:   # its message names the shipped compressors
        raise UsageError(f"no compressor at --compressor {args.compressor} (train one with `lococo train "
                         f"--output DIR` and pass --compressor DIR): {exc}") from None
    except ValueError as exc:
        raise UsageError(f"--compressor: {exc}") from None
    check_compressor_fits(geometry, None, args.assets_dir)


def pick_document(args) -> tuple[str, str]:
    from . import assets

    if args.doc and Path(args.doc).is_file():
        return args.doc, Path(args.doc).read_text(encoding="utf-8", errors="replace")
    if args.doc:
        return args.doc, assets.read_document(args.doc, args.assets_dir)
    held_out = sorted((d for d in assets.load_split()["test"]
                       if d.source == "sotu" and d.tokens > args.tokens), key=lambda d: d.id)
    if not held_out:
        raise SystemExit(f"lococo demo: no held-out speech has more than {args.tokens} tokens")
    return held_out[0].id, assets.read_document(held_out[0].id, args.assets_dir)


def buckets(losses: list[float], width: int = 1024) -> list[tuple[str, float]]:
    """Perplexity per `width`-token span of target positions, then over everything."""
    from .evaluate import bin_losses, bucket_label

    edges = list(range(0, len(losses), width)) + [len(losses) + 1]  # target positions run from 1 to len
    sums, counts = bin_losses(losses, edges)
    out = [(bucket_label(lo, hi), math.exp(total / n))
           for lo, hi, total, n in zip(edges, edges[1:], sums, counts) if n]
    out.append(("all", math.exp(sum(losses) / len(losses))))
    return out


def describe(cfg, slots: list[int]) -> str:
    """The cache's slots per layer and KV head, their split and storage, in words."""
    recent = f", {cfg.num_local} of them the most recent entries" if cfg.num_local else ""
    storage = f"; slots stored as {cfg.quantization.label()}" if cfg.quantization else ""
    if not cfg.per_layer:
        return (f"M = {cfg.num_slots} slots per layer and KV head ({cfg.num_heavy} heavy hitters{recent} + "
                f"{cfg.num_fused} fused){storage}")
    fused = sum(cfg.layer(i).num_fused for i in range(len(slots)))
    return (f"{min(slots)}-{max(slots)} slots per layer (mean {sum(slots) / len(slots):.0f}) and KV head, "
            f"{fused / sum(slots):.0%} of them fused, the rest heavy hitters{recent}{storage}")


def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ..compressor import LoCoCoCompressor
    from ..hf.caches import build_cache
    from ..hf.compat import cache_kwarg
    from ..hf.patching import apply_lococo
    from . import assets
    from .evaluate import token_losses

    torch.manual_seed(0)
    name, text = pick_document(args)  # a missing document fails before the model loads
    model, tokenizer = assets.load_model(args.assets_dir)
    model.eval()
    compressor = LoCoCoCompressor.from_pretrained(args.compressor, model=model, dtype=torch.float32)
    cfg = compressor.config
    apply_lococo(model, compressor)

    ids = torch.tensor([assets.encode(tokenizer, text)[:args.tokens]])
    print(f"lococo demo: SmolLM2-135M-Instruct reads {ids.shape[1]} tokens of {name}")
    slots = cfg.slots_per_layer(compressor.geometry.num_layers)
    mean_slots = round(sum(slots) / len(slots))
    print(f"  LoCoCo cache: {describe(cfg, slots)}, beta = {cfg.beta}, chunk = {cfg.chunk_size}\n")

    results = {}
    for method in ("full", "lococo"):
        cache = build_cache(method, model, compressor if method == "lococo" else None)
        start = time.perf_counter()
        losses, peak_bytes, peak_entries = token_losses(model, ids, cache, cfg.chunk_size)
        results[method] = (buckets(losses), peak_bytes, peak_entries, time.perf_counter() - start)

    labels = [label for label, _ in results["full"][0]]
    print(f"  {'cache':<14}" + "".join(f"{'ppl ' + label:>12}" for label in labels)
          + f"{'peak KV':>12}{'entries':>10}{'tok/s':>8}")
    for method, title in (("full", "full (Dynamic)"), ("lococo", f"LoCoCo M={mean_slots}")):
        ppl, peak_bytes, peak_entries, seconds = results[method]
        print(f"  {title:<14}" + "".join(f"{value:>12.2f}" for _, value in ppl)
              + f"{peak_bytes / 2**20:>9.1f} MiB{peak_entries:>10}{ids.shape[1] / seconds:>8.1f}")
    ratio = results["full"][1] / results["lococo"][1]
    print(f"\n  KV memory: LoCoCo holds {ratio:.1f}x less, and stays at this size for any length.")

    if args.generate > 0:
        cache = build_cache("lococo", model, compressor)
        with torch.no_grad():
            token_losses(model, ids[:, :-1], cache, cfg.chunk_size)  # read all but the last token
            out = model.generate(ids, max_new_tokens=args.generate, do_sample=False,
                                 **{cache_kwarg(model): cache})
        tail = tokenizer.decode(ids[0, -60:])
        continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        print(f"\n  ...{tail}\n  >>> continued from the {mean_slots}-slot cache "
              f"({cache.get_seq_length()} tokens seen):\n  {continuation}")
    return 0
