"""generate() through fixed-slot caches: the standard decoding modes, padding, cache reuse, bounds."""

from __future__ import annotations

import pytest
import torch
from slot_loop import SlotLoop, greedy_decode

import lococo
from lococo.hf import get_output_cache

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


def generate(model, ids, seed=0, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, return_dict_in_generate=True, output_logits=True, **kwargs)


def manual_decode(model, ids, cache, new_tokens, chunk=None, attention_mask=None):
    """Greedy decoding written with plain forwards: prefill (in chunks), then one token per step."""
    kw = cache_kw(model, cache)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    seq = ids
    with torch.no_grad():
        seen = cache.get_seq_length()
        chunk = chunk or ids.shape[1] - seen
        for start in range(seen, ids.shape[1], chunk):
            stop = min(ids.shape[1], start + chunk)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:stop]
            out = model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=pos, **kw)
        for _ in range(new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            if seq.shape[1] == ids.shape[1] + new_tokens:
                break
            pos = mask.sum(-1, keepdim=True) - 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, **kw)
    return seq


class StoredLengths:
    """Records (tokens fed, stored entries per layer, tokens seen) after every forward of the model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        cache = get_output_cache(output)
        fed = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        self.calls.append((fed, cache.stored_lengths, cache.get_seq_length()))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_large_M_matches_dynamic_cache(attn, mode):
    model = tiny_model("llama", attn, seed=10)
    ids = random_ids(2, 20, seed=11)
    want = generate(model, ids, max_new_tokens=12, **MODES[mode])
    lococo.apply_lococo(model, tiny_compressor(model, num_slots=64))
    got = generate(model, ids, max_new_tokens=12, **MODES[mode])
    assert isinstance(get_output_cache(got), lococo.LoCoCoCache)
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,attn,prefill_chunk", [
    ("llama", "sdpa", None), ("llama", "eager", 8), ("llama", "sdpa", 5),
    ("qwen2", "sdpa", 8), ("mistral", "eager", None), ("qwen3", "sdpa", 16)])
def test_greedy_with_compression_matches_manual_loop(arch, attn, prefill_chunk):
    model = tiny_model(arch, attn, seed=12)
    compressor = tiny_compressor(model, seed=13)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(1, 37, seed=14)
    record = StoredLengths(model)
    out = generate(model, ids, max_new_tokens=30, do_sample=False, prefill_chunk_size=prefill_chunk)
    record.close()
    cache = get_output_cache(out)
    want = manual_decode(model, ids, lococo.LoCoCoCache(compressor), 30, chunk=prefill_chunk)
    assert torch.equal(out.sequences, want)
    assert cache.num_compressions >= 6
    # and against the loop of slot_loop.py, which shares no code with the cache
    M, beta = compressor.config.num_slots, compressor.config.beta
    loop = SlotLoop(model, "lococo", M, beta, compressor=compressor)
    assert torch.equal(out.sequences, greedy_decode(loop, ids, torch.ones_like(ids), 30, chunk=prefill_chunk))
    assert loop.num_compressions == cache.num_compressions

    # The schedule: compress to M when more than M + beta are stored, then append what is fed.
    # So a call stores at most M + beta + fed entries; once a prefill chunk B > beta has followed a
    # compression, every later chunk finds M + B > M + beta stored and stores M + B again.
    stored, seen, compressed = 0, 0, False
    for fed, lengths, seq_len in record.calls:
        compressed |= stored > M + beta
        stored = (M if stored > M + beta else stored) + fed
        seen += fed
        assert lengths == [stored] * 2 and seq_len == seen
        assert stored <= M + beta + fed
        if compressed and fed > 1 and prefill_chunk is not None and prefill_chunk > beta:
            assert stored <= M + prefill_chunk
    assert max(max(lengths) for fed, lengths, _ in record.calls if fed == 1) == M + beta + 1
    assert seen == ids.shape[1] + 29     # the last generated token is never fed


def test_sampling_with_compression_is_seeded_and_top1_is_greedy():
    model = tiny_model("llama", "sdpa", seed=15)
    lococo.apply_lococo(model, tiny_compressor(model, seed=16))
    ids = random_ids(2, 25, seed=17)
    a = generate(model, ids, seed=3, max_new_tokens=30, do_sample=True, top_k=0, temperature=1.0).sequences
    b = generate(model, ids, seed=3, max_new_tokens=30, do_sample=True, top_k=0, temperature=1.0).sequences
    c = generate(model, ids, seed=4, max_new_tokens=30, do_sample=True, top_k=0, temperature=1.0).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = generate(model, ids, seed=5, max_new_tokens=30, do_sample=True, top_k=1).sequences
    greedy = generate(model, ids, max_new_tokens=30, do_sample=False).sequences
    assert torch.equal(top1, greedy)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_beam_search_with_compression_keeps_rows_apart(attn):
    model = tiny_model("llama", attn, seed=18)
    lococo.apply_lococo(model, tiny_compressor(model, seed=19))
    ids = random_ids(2, 24, seed=20)
    beam = dict(max_new_tokens=25, num_beams=3, num_return_sequences=3, do_sample=False)
    together = generate(model, ids, **beam)
    assert get_output_cache(together).num_compressions >= 4
    for row in range(2):
        alone = generate(model, ids[row:row + 1], **beam)
        assert torch.equal(together.sequences[3 * row:3 * row + 3], alone.sequences)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch(attn):
    model = tiny_model("llama", attn, seed=21)
    lengths = [34, 26, 17, 8]    # 8 < M: that row keeps all its entries at the first compression
    T = max(lengths)
    ids = random_ids(len(lengths), T, seed=22)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    padded = ids.masked_fill(mask == 0, 0)
    other_pads = ids   # the same rows with other (random) tokens under the padding
    greedy = dict(max_new_tokens=24, do_sample=False)

    # Without compression, padding changes nothing: each row equals the row alone, unpadded
    lococo.apply_lococo(model, tiny_compressor(model, num_slots=128))
    batch = generate(model, padded, attention_mask=mask, **greedy).sequences
    for row, n in enumerate(lengths):
        alone = generate(model, ids[row:row + 1, T - n:], **greedy).sequences
        assert torch.equal(batch[row, T - n:], alone[0])

    # With compression the schedule is per layer (docs/design.md#left-padding), so a row depends on its padding only
    # through when compression happens: it equals itself generated alone with the same padding,
    # and the pad entries never matter (not in the compressor, masked in attention)
    compressor = tiny_compressor(model, seed=23)
    lococo.apply_lococo(model, compressor)
    batch = generate(model, padded, attention_mask=mask, **greedy)
    assert get_output_cache(batch).num_compressions >= 3
    garbage = generate(model, other_pads, attention_mask=mask, **greedy).sequences
    assert torch.equal(batch.sequences[:, T:], garbage[:, T:])
    for row in range(len(lengths)):
        alone = generate(model, padded[row:row + 1], attention_mask=mask[row:row + 1], **greedy).sequences
        assert torch.equal(batch.sequences[row], alone[0])
    manual = manual_decode(model, padded, lococo.LoCoCoCache(compressor), 24, attention_mask=mask)
    assert torch.equal(batch.sequences, manual)
    loop = SlotLoop(model, "lococo", compressor.config.num_slots, compressor.config.beta, compressor=compressor)
    assert torch.equal(batch.sequences, greedy_decode(loop, padded, mask, 24))


def test_multi_turn_reuse_feeds_only_new_tokens():
    model = tiny_model("llama", "sdpa", seed=24)
    compressor = tiny_compressor(model, seed=25)
    lococo.apply_lococo(model, compressor)
    first = random_ids(1, 20, seed=26)
    turn1 = generate(model, first, max_new_tokens=15, do_sample=False)
    cache = get_output_cache(turn1)
    assert cache.get_seq_length() == turn1.sequences.shape[1] - 1
    follow_up = torch.cat([turn1.sequences, random_ids(1, 9, seed=27)], 1)
    record = StoredLengths(model)
    turn2 = generate(model, follow_up, max_new_tokens=15, do_sample=False, **cache_kw(model, cache))
    record.close()
    assert record.calls[0][0] == 10          # the last token of turn 1 and the 9 new ones
    assert get_output_cache(turn2) is cache

    # The same token stream through a fresh cache, fed in the same pieces
    manual = lococo.LoCoCoCache(compressor)
    seq1 = manual_decode(model, first, manual, 15)
    assert torch.equal(seq1, turn1.sequences)
    want = manual_decode(model, follow_up, manual, 15)
    assert torch.equal(turn2.sequences, want)
    # and through the loop of slot_loop.py: turn 2 feeds what the loop has not seen yet
    loop = SlotLoop(model, "lococo", compressor.config.num_slots, compressor.config.beta, compressor=compressor)
    assert torch.equal(turn1.sequences, greedy_decode(loop, first, torch.ones_like(first), 15))
    seen = turn1.sequences.shape[1] - 1
    assert torch.equal(turn2.sequences, greedy_decode(loop, follow_up, torch.ones_like(follow_up), 15, fed=seen))


def test_h2o_equals_lococo_with_alpha_zero():
    """alpha = 0 keeps the top-H plus the top-C of the rest: the top-M, as H2O (in another order)."""
    model = tiny_model("llama", "sdpa", seed=28)
    compressor = tiny_compressor(model, seed=29, alpha_init=0.0)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(2, 30, seed=30)
    lococo_out = generate(model, ids, max_new_tokens=30, do_sample=False).sequences
    M, beta = compressor.config.num_slots, compressor.config.beta
    h2o = lococo.H2OCache(2, M, beta)
    h2o_out = generate(model, ids, max_new_tokens=30, do_sample=False, **cache_kw(model, h2o)).sequences
    assert h2o.num_compressions >= 5
    assert torch.equal(h2o_out, lococo_out)


def test_streaming_llm_runs_on_the_plain_backend():
    model = tiny_model("llama", "sdpa", seed=31)
    ids = random_ids(1, 30, seed=32)
    want = generate(model, ids, max_new_tokens=20, do_sample=False).sequences
    big = lococo.StreamingLLMCache(2, num_slots=64)
    got = generate(model, ids, max_new_tokens=20, do_sample=False, **cache_kw(model, big)).sequences
    assert torch.equal(got, want) and model.config._attn_implementation == "sdpa"
    small = lococo.StreamingLLMCache(2, num_slots=12, beta=3)   # the default 4 sinks
    got = generate(model, ids, max_new_tokens=20, do_sample=False, **cache_kw(model, small)).sequences
    assert small.num_compressions >= 4 and max(small.stored_lengths) <= 12 + 3 + 1
    loop = SlotLoop(model, "streaming", 12, 3, num_sink=4)
    assert torch.equal(got, greedy_decode(loop, ids, torch.ones_like(ids), 20))
    assert loop.num_compressions == small.num_compressions


def test_h2o_without_scores_says_what_to_do():
    model = tiny_model("llama", "sdpa", seed=33)
    ids = random_ids(1, 30, seed=34)
    cache = lococo.H2OCache(2, num_slots=12, beta=3)
    with pytest.raises(RuntimeError, match="apply_lococo"):
        generate(model, ids, max_new_tokens=5, **cache_kw(model, cache))
