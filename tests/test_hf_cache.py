"""The fixed-slot cache layers on their own: bookkeeping, per-row state, baselines, scores."""

from __future__ import annotations

import pytest
import torch

import lococo
from lococo import reference
from lococo.hf import attention
from lococo.hf.caches import LoCoCoLayer
from lococo.hf.caches.baselines import H2OLayer, StreamingLLMLayer

from hf_models import tiny_compressor, tiny_model

B, KVH, D = 3, 2, 16


def kv(length, seed, batch=B):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, KVH, length, D, generator=gen), torch.randn(batch, KVH, length, D, generator=gen))


def fake_attention(layer, seed):
    """Stands in for the attention call: hands the layer random positive scores."""
    if layer.needs_scores:
        gen = torch.Generator().manual_seed(seed)
        layer.record_scores(torch.rand(layer.keys.shape[:3], generator=gen))


def make_layers(num_slots=12, beta=3):
    model = tiny_model("llama", "sdpa")
    compressor = tiny_compressor(model, num_slots=num_slots, beta=beta, num_local=1)
    return {
        "lococo": lambda: LoCoCoLayer(compressor[0], compressor.config),
        "h2o": lambda: H2OLayer(num_slots, beta, num_local=1),
        "streaming": lambda: StreamingLLMLayer(num_slots, beta),
    }


LAYERS = make_layers()


def feed(layer, chunks, pads=None, seed=0):
    """Updates ``layer`` with chunks of the given sizes; ``pads`` [B] left-pads the first chunk."""
    for step, q in enumerate(chunks):
        k, v = kv(q, seed + step)
        new_valid = None
        if step == 0 and pads is not None:
            new_valid = torch.tensor([q - p for p in pads])
        layer.update(k, v, new_valid=new_valid)
        fake_attention(layer, seed + 100 + step)
    return layer


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_schedule_bound_and_tokens_seen(kind):
    layer = LAYERS[kind]()
    M, beta = layer.num_slots, layer.beta
    gen = torch.Generator().manual_seed(1)
    stored = seen = 0
    for step in range(60):
        q = int(torch.randint(1, 9, (1,), generator=gen))
        kv_len, offset = layer.get_mask_sizes(q)
        k, v = kv(q, step)
        keys, values = layer.update(k, v)
        fake_attention(layer, step)
        stored = (M if stored > M + beta else stored) + q
        seen += q
        assert keys.shape[2] == values.shape[2] == stored == kv_len
        assert offset == seen - stored == layer.get_seq_length() - layer.stored_length
        assert torch.equal(keys[:, :, -q:], k)      # the new entries are appended as given
        assert stored <= M + beta + q
    assert layer.get_seq_length() == seen and layer.num_compressions > 10


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_valid_entries_stay_right_aligned(kind):
    layer = LAYERS[kind]()
    pads = [0, 9, 20]          # rows with 24, 15 and 4 valid tokens in the first chunk
    feed(layer, [24], pads)
    assert layer.valid_len.tolist() == [24, 15, 4]
    feed(layer, [1], seed=5)   # compresses to M = 12 slots; row 2 has fewer valid entries and keeps them
    assert layer.valid_len.tolist() == [13, 13, 5]
    assert layer.keys.shape[2] == 13
    assert torch.all(layer.keys[2, :, :8] == 0)     # row 2: 8 empty slots, its 4 entries, the new one


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("op", ["reorder", "select", "repeat"])
def test_row_operations_move_every_row_state(kind, op):
    """Reordering then compressing equals compressing a cache built from reordered rows."""
    index = torch.tensor([2, 0, 0])
    apply = {
        "reorder": lambda layer: layer.reorder_cache(index),
        "select": lambda layer: layer.batch_select_indices(index),
        "repeat": lambda layer: layer.batch_repeat_interleave(2),
    }[op]
    rows = index if op != "repeat" else torch.arange(B).repeat_interleave(2)
    pads = [0, 9, 20]
    layer = feed(LAYERS[kind](), [24], pads)
    before = {name: getattr(layer, name).clone() for name in ("keys", "values", "valid_len", "scores")
              if getattr(layer, name) is not None}
    apply(layer)
    for name, value in before.items():
        assert torch.equal(getattr(layer, name), value[rows]), name

    # Compress at the next update: the same as a fresh layer fed the reordered rows
    k, v = kv(2, 7, batch=len(rows))
    got_k, got_v = layer.update(k, v)
    fresh = LAYERS[kind]()
    fresh.update(before["keys"][rows], before["values"][rows], new_valid=before["valid_len"][rows])
    if "scores" in before:
        fresh.record_scores(before["scores"][rows])
    want_k, want_v = fresh.update(k, v)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_lococo_layer_compresses_with_fuse_kv():
    model = tiny_model("llama", "sdpa")
    compressor = tiny_compressor(model, num_slots=12, beta=3, num_local=2)
    layer = LoCoCoLayer(compressor[1], compressor.config)
    feed(layer, [20], pads=[0, 3, 11])
    stored_k, stored_v = layer.keys.clone(), layer.values.clone()
    scores, valid_len = layer.scores.clone(), layer.valid_len.clone()
    k, v = kv(1, 9)
    keys, values = layer.update(k, v)
    c = compressor[1]
    want_k, want_v = reference.fuse_kv(stored_k, stored_v, stored_k[:, :, :0], stored_v[:, :, :0], scores,
                                       c.weight.detach(), c.bias.detach(), c.alpha.detach(), 6, 2, valid_len)
    torch.testing.assert_close(keys[:, :, :12], want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[:, :, :12], want_v, rtol=1e-5, atol=1e-5)


def test_h2o_keeps_the_top_scores_in_cache_order():
    layer = H2OLayer(num_slots=6, beta=0, num_local=1)
    k, v = kv(10, 1)
    layer.update(k, v, new_valid=torch.tensor([10, 10, 4]))
    scores = torch.rand(B, KVH, 10, generator=torch.Generator().manual_seed(2))
    layer.record_scores(scores)
    keys, _ = layer.update(*kv(1, 3))
    for b in range(2):   # full rows: the last entry plus the 5 best others
        for h in range(KVH):
            best = torch.topk(scores[b, h, :9], 5).indices
            keep = torch.sort(torch.cat([best, torch.tensor([9])])).values
            assert torch.equal(keys[b, h, :6], k[b, h, keep])
    # the row with 4 valid entries keeps them all, right-aligned after 2 empty slots
    assert torch.all(keys[2, :, :2] == 0) and torch.equal(keys[2, :, 2:6], k[2, :, 6:])


def test_streaming_keeps_sinks_and_recent():
    layer = StreamingLLMLayer(num_slots=8, beta=0, num_sink=4)
    k, v = kv(14, 4)
    layer.update(k, v, new_valid=torch.tensor([14, 10, 5]))
    keys, _ = layer.update(*kv(1, 5))
    assert torch.equal(keys[0, :, :8], torch.cat([k[0, :, :4], k[0, :, 10:]], 1))
    assert torch.equal(keys[1, :, :8], torch.cat([k[1, :, 4:8], k[1, :, 10:]], 1))
    assert torch.all(keys[2, :, :3] == 0) and torch.equal(keys[2, :, 3:8], k[2, :, 9:])


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_crop_reset_and_flags(kind):
    layer = feed(LAYERS[kind](), [20, 1])
    layer.crop(0)
    assert layer.get_seq_length() == 21
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="cannot be cropped"):
            layer.crop(bad)
    assert not layer.is_croppable and not layer.is_compileable and layer.get_max_length() == -1
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.stored_length == 0 and layer.get_mask_sizes(4) == (4, 0)
    feed(layer, [5])
    assert layer.get_seq_length() == 5


def test_missing_scores_raise():
    layer = H2OLayer(num_slots=4, beta=0)
    layer.update(*kv(6, 1))
    with pytest.raises(RuntimeError, match="no scores"):
        layer.update(*kv(1, 2))


def brute_force_scores(query, key, allowed):
    """S[b, g, j] = sum over queries and the heads of group g of the softmax probabilities."""
    b, heads, q, d = query.shape
    kvh = key.shape[1]
    k = key.repeat_interleave(heads // kvh, dim=1)
    logits = (query @ k.transpose(-1, -2)) * d ** -0.5
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return p.view(b, kvh, heads // kvh, q, -1).sum((2, 3))


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_attention_scores_match_brute_force(monkeypatch, mask_kind):
    monkeypatch.setattr(attention, "SCORE_BLOCK_ELEMENTS", 200)     # several query blocks
    gen = torch.Generator().manual_seed(0)
    b, heads, kvh, q, L, d = 2, 6, 2, 5, 9, 8
    query, key = torch.randn(b, heads, q, d, generator=gen), torch.randn(b, kvh, L, d, generator=gen)
    causal = torch.arange(L) <= torch.arange(q).unsqueeze(-1) + (L - q)
    allowed = causal.expand(b, 1, q, L).clone()
    if mask_kind != "none":
        allowed[1, :, :, :6] = False            # row 1 is left-padded: its first query sees nothing
    mask = {"bool": allowed, "none": None,
            "additive": torch.zeros(b, 1, q, L).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    got = attention.attention_scores(query, key, mask)
    torch.testing.assert_close(got, brute_force_scores(query, key, allowed))
    if mask_kind != "none":
        assert torch.all(got[1, :, :6] == 0)
        assert torch.allclose(got[1].sum(), torch.tensor(float(heads * 3)))  # 3 live queries


def test_cache_counts_bytes_and_detaches():
    model = tiny_model("llama", "sdpa")
    cache = lococo.LoCoCoCache(tiny_compressor(model))
    assert cache.nbytes() == 0
    for layer in cache.layers:
        feed(layer, [20])
    per_layer = 2 * B * KVH * 20 * D * 4 + B * KVH * 20 * 4 + B * 8
    assert cache.nbytes() == 2 * per_layer
    cache.layers[0].keys.requires_grad_(True)
    cache.detach_()
    assert not cache.layers[0].keys.requires_grad
