"""H2O, TOVA and StreamingLLM through transformers against the independent loop of ``slot_loop.py``.

The caches are built with their defaults (beta = 16; H2O keeps no protected recent entry;
StreamingLLM keeps 4 sinks, as docs/design.md#baseline-caches says) and with other settings, on left-padded batches,
chunk by chunk (``chunked_nll``) and in ``generate()``, token by token.
"""

from __future__ import annotations

import pytest
import torch
from slot_loop import (
    SlotLoop,
    assert_cache_matches_loop,
    greedy_decode,
    h2o_keep,
    left_padded,
    run_chunks,
    streaming_keep,
)

import lococo
from lococo.hf import get_output_cache
from lococo.hf.caches.baselines import H2OLayer, StreamingLLMLayer

from hf_models import cache_kw, random_ids, tiny_model

M = 12
LENGTHS = [70, 57, 31, 9]   # 9 < M: that row keeps every entry at each compression


def caches(kind: str, model, settings: dict):
    """The cache under test and the loop with the documented settings spelled out."""
    layers = len(model.model.layers)
    if kind in ("h2o", "tova"):
        cache = (lococo.H2OCache if kind == "h2o" else lococo.TOVACache)(layers, M, **settings)
        loop = SlotLoop(model, kind, M, settings.get("beta", 16), num_local=settings.get("num_local", 0))
    elif kind == "streaming":
        cache = lococo.StreamingLLMCache(layers, M, **settings)
        loop = SlotLoop(model, "streaming", M, settings.get("beta", 16), num_sink=settings.get("num_sink", 4))
    else:  # what `lococo eval` builds
        cache = lococo.build_cache(kind.removeprefix("build_"), model, num_slots=M)
        loop = SlotLoop(model, kind.removeprefix("build_"), M, 16)
    return cache, loop


CASES = [
    # kind, settings (empty: the defaults), attention, chunk
    ("h2o", {}, "sdpa", 7),
    ("h2o", {}, "eager", 16),
    ("h2o", {"beta": 3, "num_local": 2}, "sdpa", 5),
    ("tova", {}, "sdpa", 7),
    ("tova", {}, "eager", 16),
    ("tova", {"beta": 3, "num_local": 2}, "sdpa", 5),
    ("streaming", {}, "sdpa", 7),
    ("streaming", {}, "eager", 16),
    ("streaming", {"beta": 2, "num_sink": 1}, "sdpa", 5),
    ("build_h2o", {}, "sdpa", 8),
    ("build_tova", {}, "sdpa", 8),
    ("build_streaming", {}, "sdpa", 8),
]


@pytest.mark.parametrize("kind,settings,attn,chunk", CASES)
def test_chunked_forward_matches_the_loop(kind, settings, attn, chunk):
    model = tiny_model("llama", attn, seed=50)
    lococo.apply_lococo(model, None)
    ids, mask = left_padded(random_ids(len(LENGTHS), max(LENGTHS), seed=51), LENGTHS)
    cache, loop = caches(kind, model, settings)
    with torch.no_grad():
        got = lococo.chunked_nll(model, ids, cache, chunk, attention_mask=mask, return_logits=True)
    want = run_chunks(loop, ids, mask, chunk)
    assert cache.num_compressions == loop.num_compressions >= 2, "the test must exercise compression"
    assert_cache_matches_loop(cache, loop, got.logits, want, mask)


@pytest.mark.parametrize("kind", ["h2o", "tova", "streaming"])
@pytest.mark.parametrize("attn,prefill_chunk", [("sdpa", None), ("eager", 8), ("sdpa", 5)])
def test_generate_matches_the_loop_token_by_token(kind, attn, prefill_chunk):
    model = tiny_model("llama", attn, seed=52)
    lococo.apply_lococo(model, None)
    lengths = [40, 33, 6]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=53), lengths)
    cache, loop = caches(kind, model, {})
    new_tokens = 40
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             prefill_chunk_size=prefill_chunk, return_dict_in_generate=True, **cache_kw(model, cache))
    assert get_output_cache(out) is cache
    want = greedy_decode(loop, ids, mask, new_tokens, chunk=prefill_chunk)
    assert cache.num_compressions == loop.num_compressions >= 2
    assert torch.equal(out.sequences, want)


@pytest.mark.parametrize("kind", ["h2o", "streaming"])
def test_layer_defaults_keep_what_the_design_says(kind):
    """The layers built with their defaults alone, on padded rows: the kept entries by index."""
    layer = H2OLayer(M) if kind == "h2o" else StreamingLLMLayer(M)
    assert layer.beta == 16
    stored, pads = 30, [0, 7, 18, 25]       # 30, 23, 12 (= M) and 5 valid entries
    # every entry's features hold its own number, so the kept entries can be read off the keys
    keys = torch.arange(len(pads) * 2 * stored, dtype=torch.float32).view(len(pads), 2, stored, 1).expand(-1, -1, -1, 4)
    layer.update(keys, keys + 0.5, new_valid=torch.tensor([stored - p for p in pads]))
    scores = torch.rand(len(pads), 2, stored, generator=torch.Generator().manual_seed(56))
    if kind == "h2o":
        layer.record_scores(scores)
    got, _ = layer.update(keys[:, :, :1], keys[:, :, :1])    # compresses (30 > M + 16), then appends one
    for row, pad in enumerate(pads):
        n = stored - pad
        for head in range(2):
            if kind == "h2o":
                kept = h2o_keep(scores[row, head, pad:].tolist(), M, 0)
            else:
                kept = streaming_keep(n, M, 4)
            want = keys[row, head, [pad + j for j in kept], 0]
            assert torch.equal(got[row, head, M - len(kept):M, 0], want)
            assert torch.all(got[row, head, :M - len(kept)] == 0)
