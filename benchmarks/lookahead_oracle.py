"""How far can a better selection go? H2O with a one-chunk lookahead, an oracle, against `lococo eval` runs.

Every fixed-slot cache here compresses at the start of a chunk with scores from the previous chunk's
attention: it must guess which entries the coming queries will need. This oracle does not guess. Its
cache appends the chunk uncompressed; inside the attention, the chunk's own queries score the stored
entries (the scores of docs/design.md#attention-scores), H2O's selection (same M, beta, recent window)
keeps the top M of them, and only then does the chunk attend, to the M kept entries and itself. No real
cache can do this (it needs the queries before the compression that they attend over), so it bounds
what any per-chunk selection of M entries can reach; LoCoCo's learned part is a better guess plus the
mixing of evicted entries.

It runs `lococo eval`'s perplexity task (same documents, chunks and buckets; every `lococo eval`
argument is accepted) and compares, bucket by bucket, with the full cache, H2O and LoCoCo read from
`lococo eval` folders of the same documents (--compare):

    python benchmarks/lookahead_oracle.py --compare BASE_RUN LOCOCO_RUN --max-docs 12 --output OUT

Writes OUT/lookahead.md (and lookahead.csv, per_document.csv): perplexity per bucket and the share of
the gap between H2O and the full cache that the oracle and LoCoCo close.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import summarize_evals
import torch

from lococo.hf import attention
from lococo.hf.caches import FixedSlotCache
from lococo.hf.caches.baselines import H2OLayer

NAME = "lococo_lookahead"


class LookaheadH2OLayer(H2OLayer):
    """H2O whose compression waits for the coming chunk's queries: ``update`` only appends."""

    def update(self, key_states, value_states, *args, new_valid=None, **kwargs):
        if new_valid is not None and bool((new_valid != key_states.shape[-2]).any()):
            raise ValueError("the lookahead oracle runs unpadded rows only")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.due = self._will_compress()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.valid_len = (self.valid_len + key_states.shape[-2]).clamp(max=self.keys.shape[-2])
        self.cumulative_length += key_states.shape[-2]
        attention.expect_scores(self, self.keys, scores=False)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask covers every stored entry: the compression happens inside the attention."""
        return self.stored_length + query_length, self.cumulative_length - self.stored_length

    def compress_with(self, scores: torch.Tensor, new: int) -> None:
        """H2O's selection of the stored entries (all but the ``new`` last) by ``scores`` [b, h, stored]."""
        stored = self.stored_length - new
        new_k, new_v = self.keys[:, :, stored:], self.values[:, :, stored:]
        self.keys, self.values = self.keys[:, :, :stored], self.values[:, :, :stored]
        self.valid_len = self.valid_len.clamp(max=stored)
        self.scores = scores
        kept_k, kept_v = self.compress()
        self.keys, self.values = torch.cat([kept_k, new_k], -2), torch.cat([kept_v, new_v], -2)
        self.valid_len = self.valid_len.clamp(max=self.num_slots) + new
        self.num_compressions += 1


def lookahead_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Compresses the claiming layer with this call's own scores, then runs transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer, _ = attention._claim(key)
    if layer is not None and layer.due:
        new = query.shape[-2]
        scores = attention.attention_scores(query, key, attention_mask, scaling)[..., : key.shape[-2] - new]
        layer.compress_with(scores, new)
        layer.due = False
        key, value = layer.keys, layer.values
        if attention_mask is not None:   # unpadded rows: the stored columns are all visible, keep the last ones
            attention_mask = attention_mask[..., -key.shape[-2]:]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def main(argv=None) -> int:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from lococo.recipes import cli, evaluate

    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--compare", nargs="+", type=Path, required=True,
                      help="lococo eval folders of the same documents with the full cache, H2O and LoCoCo")
    known, rest = ours.parse_known_args(argv)
    args = cli.build_parser().parse_args(["eval", "--methods", "h2o", *rest])
    args.validate(args)
    scope, merged = summarize_evals.merge(known.compare)

    ev = evaluate.set_up(args)
    if scope["documents"] != [name for name, _ in ev.docs] or scope["buckets"] != args.buckets:
        raise SystemExit("lookahead_oracle: the --compare runs evaluated other documents or buckets")
    AttentionInterface.register(NAME, lookahead_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    ev.model.set_attn_implementation(NAME)
    layers = ev.model.config.num_hidden_layers
    evaluate.method_cache = lambda method, a, e: FixedSlotCache(
        [LookaheadH2OLayer(a.num_slots, a.beta, a.num_local) for _ in range(layers)])
    totals = evaluate.run_methods(args, ev)["h2o"]

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    labels = scope["names"]
    oracle = [math.exp(s / n) for s, n in zip(totals.sums, totals.counts)]
    with open(output / "per_document.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["document", *labels])
        for (name, _), (sums, counts) in zip(ev.docs, totals.per_document):
            writer.writerow([name, *(round(math.exp(s / n), 4) for s, n in zip(sums, counts))])

    def row(method: str, slots, local: int) -> list[float | None]:
        buckets = merged.get((method, slots, local), {})
        return [summarize_evals.ppl(buckets, [name]) for name in labels]

    full, h2o = row("full", None, 0), row("h2o", args.num_slots, args.num_local)
    lococo = next((row("lococo", args.num_slots, local) for (m, s, local) in merged
                   if m == "lococo" and s == args.num_slots), [None] * len(labels))
    if None in full or None in h2o:
        raise SystemExit(f"lookahead_oracle: the --compare runs hold no full cache or H2O ({args.num_local} "
                         f"recent) at M = {args.num_slots}")

    def share(x, base, ref):
        return "" if x is None else f"{(base - x) / (base - ref):.0%}"

    lines = [f"M = {args.num_slots}, {args.num_local} recent, {len(ev.docs)} documents, chunks of {args.chunk_size}, "
             f"beta {args.beta}, {args.dtype}.", "",
             "| bucket | full | H2O | LoCoCo | lookahead oracle | gap closed: LoCoCo | gap closed: oracle |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    with open(output / "lookahead.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["bucket", "full", "h2o", "lococo", "lookahead"])
        for i, name in enumerate(labels):
            writer.writerow([name, full[i], h2o[i], lococo[i], round(oracle[i], 4)])
            lo = "" if lococo[i] is None else f"{lococo[i]:.2f}"
            lines.append(f"| {name} | {full[i]:.2f} | {h2o[i]:.2f} | {lo} | {oracle[i]:.2f} | "
                         f"{share(lococo[i], h2o[i], full[i])} | {share(oracle[i], h2o[i], full[i])} |")
    (output / "lookahead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
