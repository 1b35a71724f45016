"""One KV-byte counter (eval, the decode benchmark, FixedSlotCache.nbytes) and one bucket labeller (eval, demo)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

import lococo
from lococo.hf.caches import build_cache, kv_bytes
from lococo.recipes import demo, evaluate

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model


@pytest.mark.parametrize("kind", ["full", "lococo", "h2o", "streaming"])
def test_kv_bytes_counts_the_stored_keys_and_values_of_any_cache(kind):
    model = tiny_model()
    lococo.apply_lococo(model)
    cache = build_cache(kind, model, tiny_compressor(model) if kind == "lococo" else None, num_slots=12, beta=3)
    assert kv_bytes(cache) == 0
    model(random_ids(2, 40, 0), **cache_kw(model, cache))
    stored = 40 if kind == "full" else cache.layers[0].keys.shape[-2]
    assert kv_bytes(cache) == 2 * 2 * (2 * 2 * stored * 16 * 4)     # layers * (k, v) * [b, h, stored, d] float32
    if kind != "full":
        bookkeeping = sum((0 if layer.scores is None else layer.scores.numel() * 4) + layer.valid_len.numel() * 8
                          for layer in cache.layers)
        assert cache.nbytes() == kv_bytes(cache) + bookkeeping


def test_one_bucket_labeller_for_eval_and_demo():
    assert [evaluate.bucket_label(lo, hi) for lo, hi in ((0, 1024), (1024, 2048), (0, 32), (1024, 1536))] == [
        "0-1K", "1K-2K", "0-32", "1K-1.5K"]
    losses = [1.0] * 1023 + [2.0] * 1024 + [3.0] * 1024        # target positions 1..3071
    assert demo.buckets(losses) == [("0-1K", pytest.approx(math.e)), ("1K-2K", pytest.approx(math.e ** 2)),
                                    ("2K-3K", pytest.approx(math.e ** 3)),
                                    ("all", pytest.approx(math.exp(sum(losses) / len(losses))))]


def test_bin_losses_uses_target_positions():
    # losses of the targets at positions 1, 2, 3, 4; position 4 is past the last edge
    assert evaluate.bin_losses([1.0, 2.0, 3.0, 4.0], [0, 2, 4]) == ([1.0, 5.0], [1, 2])
