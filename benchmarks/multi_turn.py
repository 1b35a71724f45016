"""Multi-turn reuse of a fixed-slot cache: does a follow-up question on a reused cache repeat the first answer?

A chat on a document (the opening of a State of the Union speech, truncated to --doc-tokens), a first
question, then a follow-up whose answer differs, asked as the second turn of the same chat (greedy). The
second turn's prompt is the first turn's tokens as generated followed by the new turn's tokens from
``tokenizer.apply_chat_template`` (``retemplated_same``: re-templating the whole conversation from the
answer's text gives the same tokens; --retemplate feeds that instead). Each method answers the first question
with its own cache; the follow-up is then asked

- reused: through the cache returned by the first turn (generate feeds only the tokens it has not seen);
- fresh / re-fed: the whole conversation (with that method's first answer) through a fresh cache.

Methods: the full cache (DynamicCache), LoCoCo (``lococo.apply_lococo(model, compressor)``, the shipped
``smollm2-135m-m{M}``) and H2O (``lococo.build_cache("h2o", ...)``, the same beta and recent window) at each
--slots M (LoCoCo only where a compressor is shipped). Per row: whether the follow-up answer repeats the
first one (exactly, or with a similarity ratio >= --near), and checks of the mechanics of the second turn:
every forward's first position equals the tokens the cache has seen (``pos_ok``) and the second turn's
prefill fed exactly the tokens the cache had not seen (``fed`` / ``expected``).

    python benchmarks/multi_turn.py --output benchmarks/results/multi-turn

Writes OUT/multi_turn.csv (every answer) and OUT/multi_turn.md (the summary and every answer pair).
"""

from __future__ import annotations

import argparse
import copy
import csv
import difflib
import sys
import time
from pathlib import Path

import torch

import lococo
from lococo.hf.compat import cache_kwarg
from lococo.recipes.assets import load_model, read_document

DOCS = ("sotu:1823_james_monroe_dr.txt", "sotu:1861_abraham_lincoln_r.txt", "sotu:1934_franklin_d_roosevelt_d.txt")
FIRST = "Summarize this speech in one sentence."
FOLLOW_UPS = ("What year was it given?", "Which countries does the speech mention?")
SHIPPED = {64: "smollm2-135m-m64", 128: "smollm2-135m-m128", 256: "smollm2-135m-m256"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", nargs="+", default=list(DOCS), help="document ids (lococo's split names)")
    p.add_argument("--doc-tokens", type=int, default=2000, help="tokens kept from the start of each document")
    p.add_argument("--first", default=FIRST, help="the first question")
    p.add_argument("--follow-ups", nargs="+", default=list(FOLLOW_UPS), help="the second-turn questions")
    p.add_argument("--slots", type=int, nargs="+", default=[128, 256, 512], help="M of the fixed-slot caches")
    p.add_argument("--methods", nargs="+", default=["full", "lococo", "h2o"], choices=["full", "lococo", "h2o"])
    p.add_argument("--retemplate", action="store_true",
                   help="second turn: the whole conversation re-templated from the first answer's text, not the "
                        "first turn's tokens as generated followed by the new turn's")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--near", type=float, default=0.8, help="similarity ratio from which an answer is a repeat")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--output", type=Path, required=True)
    return p.parse_args(argv)


class Probe:
    """Records every decoder forward: (new tokens, first position, tokens the cache had seen)."""

    def __init__(self, model):
        self.calls: list[tuple[int, int | None, int]] = []
        self.key = cache_kwarg(model)
        self.handle = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        q = ids.shape[-1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        pos = kwargs.get("position_ids")
        cache = kwargs.get(self.key)
        self.calls.append((q, None if pos is None else int(pos[0, 0]), 0 if cache is None else cache.get_seq_length()))

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def chat_ids(tokenizer, messages) -> torch.Tensor:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def second_turn_ids(tokenizer, first_msgs, answer1, seq1, follow_up) -> tuple[torch.Tensor, torch.Tensor]:
    """The second turn's prompt: the first turn's tokens as the cache saw them (prompt and answer as generated, then
    the end of turn), then the template's tokens of the new turn; and whether re-templating the whole
    conversation (what --retemplate feeds; it may differ: a decoded answer can tokenize otherwise)."""
    msgs = first_msgs + [{"role": "assistant", "content": answer1}, {"role": "user", "content": follow_up}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marker = answer1 + tokenizer.eos_token
    suffix = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False, return_tensors="pt")
    eos = torch.tensor([[tokenizer.eos_token_id]])
    turn = seq1 if int(seq1[0, -1]) == tokenizer.eos_token_id else torch.cat([seq1, eos], dim=1)
    ids = torch.cat([turn, suffix.input_ids], dim=1)
    retemplated = chat_ids(tokenizer, msgs)
    return ids, retemplated


def generate(model, tokenizer, ids, cache, max_new_tokens):
    """(answer text, sequences [1, L + n], generated count) of a greedy generation through ``cache``."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **{cache_kwarg(model): cache})
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), out, len(new)


def copy_cache(cache, compressor):
    """A deep copy of a cache that shares the compressor's modules (they are not state)."""
    memo = {}
    if compressor is not None:
        for m in compressor.modules():
            memo[id(m)] = m
        for t in list(compressor.parameters()) + list(compressor.buffers()):
            memo[id(t)] = t
    return copy.deepcopy(cache, memo)


def similarity(a: str, b: str) -> float:
    a, b = " ".join(a.split()).lower(), " ".join(b.split()).lower()
    return difflib.SequenceMatcher(None, a, b).ratio()


def mechanics(calls, seen_before: int, total: int, generated: int) -> tuple[bool, int, int]:
    """(every forward's first position == tokens seen, prompt tokens fed, prompt tokens expected)."""
    pos_ok = all(pos is None or pos == seen for _, pos, seen in calls) and calls[0][2] == seen_before
    fed = sum(q for q, _, _ in calls) - max(generated - 1, 0)
    return pos_ok, fed, total - seen_before


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model()
    model.eval()
    probe = Probe(model)
    rows = []

    def configs():
        if "full" in args.methods:
            yield "full", None, None, None
        for m in args.slots:
            if "lococo" in args.methods and m in SHIPPED:
                yield "lococo", m, lococo.LoCoCoCompressor.from_pretrained(SHIPPED[m]), None
            if "h2o" in args.methods:
                yield "h2o", m, None, m

    for doc_id in args.docs:
        doc_ids = tokenizer(read_document(doc_id), add_special_tokens=False).input_ids[:args.doc_tokens]
        document = tokenizer.decode(doc_ids)
        first_msgs = [{"role": "user", "content": f"Read this speech.\n\n{document}\n\n{args.first}"}]
        ids1 = chat_ids(tokenizer, first_msgs)
        for method, m, compressor, h2o_slots in configs():
            t0 = time.time()
            lococo.remove_lococo(model)
            if method == "lococo":
                lococo.apply_lococo(model, compressor)
                new_cache = lambda compressor=compressor: lococo.LoCoCoCache(compressor)  # noqa: E731
            elif method == "h2o":
                lococo.apply_lococo(model)   # the scored attention H2O needs
                new_cache = lambda m=h2o_slots: lococo.build_cache("h2o", model, num_slots=m, beta=16,  # noqa: E731
                                                                     num_local=16)
            else:
                new_cache = lambda: lococo.build_cache("full", model)  # noqa: E731
            cache1 = new_cache()
            answer1, seq1, _ = generate(model, tokenizer, ids1, cache1, args.max_new_tokens)
            probe.take()
            for follow_up in args.follow_ups:
                ids2, retemplated = second_turn_ids(tokenizer, first_msgs, answer1, seq1, follow_up)
                same = bool(ids2.shape == retemplated.shape and torch.equal(ids2, retemplated))
                ids2 = retemplated if args.retemplate else ids2
                for mode in ("reused", "fresh"):
                    cache = copy_cache(cache1, compressor) if mode == "reused" else new_cache()
                    seen = cache.get_seq_length()
                    prefix_ok = bool(torch.equal(ids2[0, :seen], seq1[0, :seen])) if seen else True
                    answer2, _, n = generate(model, tokenizer, ids2, cache, args.max_new_tokens)
                    pos_ok, fed, expected = mechanics(probe.take(), seen, ids2.shape[1], n)
                    sim = similarity(answer1, answer2)
                    rows.append(dict(
                        doc=doc_id.split(":", 1)[1].removesuffix(".txt"), follow_up=follow_up, method=method,
                        M="" if m is None else m, mode=mode, prompt_tokens=ids2.shape[1], seen_before=seen,
                        prefix_ok=prefix_ok, retemplated_same=same, pos_ok=pos_ok, fed=fed, expected=expected,
                        exact=" ".join(answer1.split()) == " ".join(answer2.split()), similarity=round(sim, 3),
                        repeat=sim >= args.near, answer1=answer1, answer2=answer2))
                    r = rows[-1]
                    print(f"{r['doc']:32s} {method:6s} M={r['M']!s:4s} {mode:6s} rep={r['repeat']!s:5s} "
                          f"sim={sim:.2f} pos_ok={pos_ok} fed={fed}/{expected} prefix_ok={prefix_ok} | "
                          f"{answer2[:70]!r}", flush=True)
            print(f"  ({method} M={m}: {time.time() - t0:.0f} s; first answer {answer1[:80]!r})", flush=True)
    probe.handle.remove()
    write(args, rows)
    return 0


def write(args, rows) -> None:
    with open(args.output / "multi_turn.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["M"], r["mode"]), []).append(r)
    lines = [f"{len(args.docs)} documents x {len(args.follow_ups)} follow-ups, first {args.doc_tokens} tokens of each "
             f"document, greedy, {args.max_new_tokens} new tokens. repeat: similarity >= {args.near} to the first "
             "answer.", "",
             "| method | M | follow-up through | repeats | exact repeats | mean similarity | positions ok | "
             "fed = unseen |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (method, m, mode), rs in groups.items():
        n = len(rs)
        lines.append(f"| {method} | {m or '-'} | {'reused cache' if mode == 'reused' else 'fresh cache, re-fed'} | "
                     f"{sum(r['repeat'] for r in rs)}/{n} | {sum(r['exact'] for r in rs)}/{n} | "
                     f"{sum(r['similarity'] for r in rs) / n:.2f} | {sum(r['pos_ok'] for r in rs)}/{n} | "
                     f"{sum(r['fed'] == r['expected'] for r in rs)}/{n} |")
    lines += ["", "## Answers", "", "| doc | follow-up | method | M | mode | sim | first answer | follow-up answer |",
              "|---|---|---|---:|---|---:|---|---|"]

    def cell(text):
        return text.replace("|", "/").replace("\n", " ")

    for r in rows:
        lines.append(f"| {r['doc']} | {r['follow_up']} | {r['method']} | {r['M'] or '-'} | {r['mode']} | "
                     f"{r['similarity']:.2f} | {cell(r['answer1'])} | {cell(r['answer2'])} |")
    (args.output / "multi_turn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(groups) + 4]))


if __name__ == "__main__":
    sys.exit(main())
