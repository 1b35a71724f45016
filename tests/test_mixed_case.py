"""A mixed LoCoCo case through the cache, checked from first principles (``slot_loop.lococo_slots``).

0 < alpha < 1 and not 0.5 (a swapped blend does not cancel), heavy hitters with protected recent
entries (H > 0, num_local > 0), padded rows (valid_len, one with exactly M valid entries and one
with fewer), scores full of ties, and a non-zero convolution bias (it starts at 0, so nothing
trained or freshly built would show a bias bug).
"""

from __future__ import annotations

import pytest
import torch
from slot_loop import SlotLoop, assert_cache_matches_loop, greedy_decode, left_padded, lococo_slots, run_chunks

import lococo
from lococo.hf.caches import LoCoCoLayer

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model

M, BETA, LOCAL = 12, 3, 2


def mixed_compressor(model, alphas=(0.35, 0.8)):
    compressor = tiny_compressor(model, seed=80, num_slots=M, beta=BETA, num_local=LOCAL, kernel_size=5)
    with torch.no_grad():
        for layer, alpha in zip(compressor.layers, alphas):
            layer.alpha.fill_(alpha)
            layer.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(81))
    return compressor


def expected_slots(c, config, keys, values, scores, pad: int, bias=None):
    """One row and head: the M slots from first principles (fewer valid entries: kept, right-aligned)."""
    k, v, s = keys[pad:].double(), values[pad:].double(), scores[pad:].tolist()
    if len(s) < M:
        zeros = k.new_zeros(M - len(s), k.shape[-1])
        return torch.cat([zeros, k]), torch.cat([zeros, v])
    bias = c.bias.detach().double() if bias is None else bias
    return lococo_slots(k, v, s, c.weight.detach().double(), bias, float(c.alpha.detach()), config.num_heavy,
                        config.num_local)


def test_layer_compression_from_first_principles():
    model = tiny_model("llama", "sdpa")
    compressor = mixed_compressor(model)
    config = compressor.config
    assert config.num_heavy == 6 and config.num_fused == 6
    c = compressor[0]
    layer = LoCoCoLayer(c, config)
    stored, pads = 20, [0, 5, 8, 13]        # 20, 15, 12 (= M) and 7 (< M) valid entries
    b, h, d = len(pads), 2, 16
    gen = torch.Generator().manual_seed(82)
    keys, values = torch.randn(b, h, stored, d, generator=gen), torch.randn(b, h, stored, d, generator=gen)
    scores = torch.randint(0, 3, (b, h, stored), generator=gen).float()     # three values: ties everywhere
    layer.update(keys, values, new_valid=torch.tensor([stored - p for p in pads]))
    layer.record_scores(scores)
    new_k, new_v = torch.randn(b, h, 1, d, generator=gen), torch.randn(b, h, 1, d, generator=gen)
    got_k, got_v = layer.update(new_k, new_v)
    assert layer.num_compressions == 1 and got_k.shape[2] == M + 1
    assert layer.valid_len.tolist() == [M + 1, M + 1, M + 1, 8]
    assert torch.equal(got_k[:, :, M:], new_k) and torch.equal(got_v[:, :, M:], new_v)

    ties_at_the_cut = 0
    for row, pad in enumerate(pads):
        for head in range(h):
            want_k, want_v = expected_slots(c, config, keys[row, head], values[row, head], scores[row, head], pad)
            torch.testing.assert_close(got_k[row, head, :M].double(), want_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_v[row, head, :M].double(), want_v, rtol=1e-5, atol=1e-5)
            if stored - pad >= M:
                # the bias is seen: the same slots without it differ
                no_bias, _ = expected_slots(c, config, keys[row, head], values[row, head], scores[row, head], pad,
                                            bias=torch.zeros(config.num_fused, dtype=torch.float64))
                assert not torch.allclose(no_bias, want_k, atol=1e-3)
                others = sorted(scores[row, head, pad:stored - LOCAL].tolist(), reverse=True)
                cut = config.num_heavy - LOCAL
                ties_at_the_cut += others[cut - 1] == others[cut]
    assert ties_at_the_cut > 0, "the case must make tie-breaking decide which entries are heavy hitters"


@pytest.mark.parametrize("attn,chunk", [("sdpa", 5), ("eager", 9)])
def test_padded_chunked_forward_matches_the_loop(attn, chunk):
    model = tiny_model("llama", attn, seed=83)
    compressor = mixed_compressor(model)
    lococo.apply_lococo(model, compressor)
    lengths = [60, 41, 12, 7]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=84), lengths)
    cache = lococo.LoCoCoCache(compressor)
    with torch.no_grad():
        got = lococo.chunked_nll(model, ids, cache, chunk, attention_mask=mask, return_logits=True)
    loop = SlotLoop(model, "lococo", M, BETA, compressor=compressor)
    want = run_chunks(loop, ids, mask, chunk)
    assert cache.num_compressions == loop.num_compressions >= 3
    assert_cache_matches_loop(cache, loop, got.logits, want, mask)


def test_padded_generate_matches_the_loop_token_by_token():
    model = tiny_model("llama", "sdpa", seed=85)
    compressor = mixed_compressor(model, alphas=(0.7, 0.2))
    lococo.apply_lococo(model, compressor)
    lengths = [30, 22, 5]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=86), lengths)
    cache = lococo.LoCoCoCache(compressor)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, prefill_chunk_size=8,
                             **cache_kw(model, cache))
    loop = SlotLoop(model, "lococo", M, BETA, compressor=compressor)
    want = greedy_decode(loop, ids, mask, 30, chunk=8)
    assert cache.num_compressions == loop.num_compressions >= 5
    assert torch.equal(got, want)
