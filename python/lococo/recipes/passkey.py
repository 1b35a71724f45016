"""Passkey retrieval: does a number hidden in long filler text survive the cache?

A random five-digit pass key is written once at a chosen depth of a long run of filler sentences,
and asked for at the end. The model reads the prompt chunk by chunk (B tokens per forward, as
``generate()`` does after ``apply_lococo``) through each method's cache at the same M, then
generates greedily; a trial succeeds when the first number in the answer is the key. Perplexity
averages over every token and barely sees the few tokens that only a long-range lookup predicts;
this task is nothing but such a lookup.

Writes into --output: passkey.csv (one row per trial: method, context length, depth, the key,
the model's answer as decoded text, and successes 0 or 1, so that a miss can be read), passkey.md
(accuracy by length, and by length and depth), passkey.png (a heat map per method) and
passkey_meta.json.

    lococo passkey --compressor smollm2-135m-m128 --output runs/passkey
    lococo passkey --methods full,streaming -M 128 --lengths 1024,2048 --depths 0.5 --trials 4

(`lococo eval --task passkey [...]` is the same command.)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
DEFAULT_LENGTHS = (1024, 2048, 4096, 8000)


MIN_LENGTH = 128


def _lengths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 1024,2048, got {text!r}") from None
    if not values or any(v < MIN_LENGTH for v in values):
        raise argparse.ArgumentTypeError(f"every length must be >= {MIN_LENGTH} tokens, got {text!r}")
    return sorted(set(values))


def _depths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated fractions such as 0,0.5,1, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every depth must be in [0, 1], got {text!r}")
    return sorted(set(values))


def add_arguments(parser) -> None:
    from .argtypes import non_negative_int, positive_int

    parser.add_argument("--lengths", type=_lengths, default=list(DEFAULT_LENGTHS),
                        help="prompt lengths in tokens (default 1024,2048,4096,8000: with the answer, the longest "
                             "fits a model of 8192 positions)")
    parser.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="where the key sits, as a fraction of the filler before it (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--trials", type=positive_int, default=2, help="keys per length and depth")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the keys")


def validate(args) -> None:
    """The prompts fit the model's positions (read from its config, before the weights load)."""
    from transformers import AutoConfig, AutoTokenizer

    from . import assets
    from .argtypes import UsageError

    path = assets.resolve_model(args.model, args.assets_dir)
    try:
        prompt_ids(AutoTokenizer.from_pretrained(path), min(args.lengths), 0.0, 99999)
    except ValueError as exc:
        raise UsageError(f"--lengths {min(args.lengths)}: {exc}") from None
    limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if limit is not None and max(args.lengths) + ANSWER_TOKENS > limit:
        raise UsageError(f"--lengths {max(args.lengths)} plus {ANSWER_TOKENS} answer tokens exceed the model's "
                         f"{limit} positions")


def prompt_ids(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a prompt of ``length`` tokens with the key after ``depth`` of the filler."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    from .assets.model import starts_with_bos

    intro, needle, question, filler = (encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION),
                                       encode(FILLER))
    if starts_with_bos(tokenizer):   # a model that reads every text after its BOS token (Gemma)
        intro = [tokenizer.bos_token_id, *intro]
    room = length - len(intro) - len(needle) - len(question)
    if room < len(filler):
        raise ValueError(f"a passkey prompt of {length} tokens leaves no room for filler")
    repeats = room // len(filler)
    before = round(depth * repeats)
    body = filler * before + needle + filler * (repeats - before)
    pad = filler[: room - repeats * len(filler)]
    return intro + pad + body + question


def first_number(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return None if match is None else int(match.group())


def run(args, model, tokenizer, methods: list[str], make_cache, chunk_size: int, device) -> list[dict]:
    """One row per trial: method, length, depth, trial, key, the decoded answer, trials (1) and successes (0 or 1).

    ``trials`` and ``successes`` are the columns of the per-cell rows of earlier runs (one row per
    method, length and depth): summed over the rows of a cell, they give its accuracy either way.
    """
    import torch
    from tqdm.auto import tqdm

    from ..hf.compat import cache_kwarg

    lengths, depths = args.lengths, args.depths
    rng = random.Random(args.seed)
    trials = [(length, depth, trial, rng.randrange(10000, 100000)) for length in lengths for depth in depths
              for trial in range(args.trials)]
    rows: dict[tuple, dict] = {}
    bar = tqdm(total=len(trials) * len(methods), disable=args.no_progress, desc="passkey", unit="run")
    for length, depth, trial, key in trials:
        ids = torch.tensor([prompt_ids(tokenizer, length, depth, key)], device=device)
        for method in methods:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                                     do_sample=False, prefill_chunk_size=chunk_size,
                                     pad_token_id=tokenizer.eos_token_id,
                                     **{cache_kwarg(model): make_cache(method)})
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            rows[(method, length, depth, trial)] = {
                "method": method, "length": length, "depth": depth, "trial": trial, "key": key, "answer": answer,
                "trials": 1, "successes": int(first_number(answer) == key)}
            bar.set_postfix(method=method, length=length, depth=depth)
            bar.update(1)
    bar.close()
    return [rows[(m, length, depth, trial)] for m in methods for length in lengths for depth in depths
            for trial in range(args.trials)]


def write_results(output: Path, rows: list[dict], labels: dict[str, str], num_slots: int) -> str:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "passkey.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})

    def accuracy(method, length=None, depth=None) -> float:
        cells = [r for r in rows if r["method"] == method and (length is None or r["length"] == length)
                 and (depth is None or r["depth"] == depth)]
        return sum(r["successes"] for r in cells) / max(1, sum(r["trials"] for r in cells))

    lines = [f"Passkey accuracy by context length (M = {num_slots}, all depths)", "",
             "| method | " + " | ".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths)
             + " | mean |", "|---|" + "---:|" * (len(lengths) + 1)]
    for m in methods:
        cells = [accuracy(m, length=n) for n in lengths]
        lines.append(f"| {labels[m]} | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {sum(cells) / len(cells):.2f} |")
    lines += ["", "By length and depth (rows: length; columns: depth)", ""]
    for m in methods:
        lines += [f"**{labels[m]}**", "", "| length | " + " | ".join(f"{d:g}" for d in depths) + " |",
                  "|---|" + "---:|" * len(depths)]
        lines += [f"| {n} | " + " | ".join(f"{accuracy(m, n, d):.2f}" for d in depths) + " |" for n in lengths]
        lines.append("")
    text = "\n".join(lines)
    (output / "passkey.md").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = [[accuracy(m, n, d) for d in depths] for n in lengths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set(xticks=range(len(depths)), xticklabels=[f"{d:g}" for d in depths], yticks=range(len(lengths)),
               yticklabels=[str(n) for n in lengths], xlabel="depth", title=labels[m])
        if ax is axes[0][0]:
            ax.set_ylabel("context length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"passkey retrieval, M = {num_slots}")
    fig.savefig(output / "passkey.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return text


def main(args, ev) -> None:
    """`lococo eval --task passkey`: every method on every prompt, then the tables and the heat map."""
    import torch
    import transformers

    import lococo

    from . import assets
    from .methods import method_cache, method_label, method_quantization

    def make_cache(method: str):
        return method_cache(method, args, ev)

    rows = run(args, ev.model, ev.tokenizer, args.methods, make_cache, args.chunk_size, ev.device)
    output = Path(args.output)
    storage = {m: method_quantization(m, args, ev) for m in args.methods}
    labels = {m: method_label(m, args.num_local, args.budgets_label, storage[m] and storage[m].label())
              for m in args.methods}
    text = write_results(output, rows, labels, args.num_slots)
    (output / "passkey_meta.json").write_text(json.dumps({
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "validate")},
        "model": assets.shared_path(ev.model_path), "device": str(ev.device), "lococo": lococo.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__}, indent=1, default=str) + "\n")
    print(text)
    print(f"results in {output}/")
