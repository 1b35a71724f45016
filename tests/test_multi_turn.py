"""Multi-turn reuse of a returned fixed-slot cache through the patched generate (issue 23, item 5).

The second turn is read in several chunks of B from where the first one stopped: positions continue from
the tokens seen, only the unseen tokens are fed, and the result equals the same token stream fed to a
fresh cache in the same pieces; with M larger than the conversation it equals the full cache's.
"""

from __future__ import annotations

import torch

import lococo
from lococo.hf import get_output_cache

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model

CHUNK = 8   # B of the tiny compressor: the 30-token first prompt and the 25 new tokens span several chunks


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
                              do_sample=False, max_new_tokens=12, **kwargs)


class Calls:
    """(tokens fed, first position, tokens the cache had seen) of every decoder forward."""

    def __init__(self, model):
        self.calls, self.key = [], lococo.hf.cache_kwarg(model)
        self.handle = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        cache, pos = kwargs[self.key], kwargs["position_ids"]
        self.calls.append((kwargs["input_ids"].shape[1], int(pos[0, 0]), cache.get_seq_length()))


def pieces_decode(model, ids, cache, starts, new_tokens):
    """Greedy decoding with plain forwards: ``ids`` fed in the pieces [starts[i], starts[i + 1]), then one token
    per step, positions counted from 0 over the whole stream."""
    kw = cache_kw(model, cache)
    bounds = [*starts, ids.shape[1]]
    seq = ids
    with torch.no_grad():
        for start, stop in zip(bounds[:-1], bounds[1:]):
            pos = torch.arange(start, stop).unsqueeze(0)
            out = model(input_ids=ids[:, start:stop], attention_mask=torch.ones(1, stop), position_ids=pos, **kw)
        for _ in range(new_tokens - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
            pos = torch.tensor([[seq.shape[1] - 1]])
            out = model(input_ids=token, attention_mask=torch.ones(1, seq.shape[1]), position_ids=pos, **kw)
    return torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], 1)


def test_second_turn_is_read_in_chunks_from_the_tokens_seen():
    model = tiny_model("llama", "sdpa", seed=30)
    compressor = tiny_compressor(model, seed=31, chunk_size=CHUNK)
    lococo.apply_lococo(model, compressor)
    first = random_ids(1, 30, seed=32)
    turn1 = generate(model, first)
    cache = get_output_cache(turn1)
    seen = cache.get_seq_length()
    assert seen == turn1.sequences.shape[1] - 1 and cache.num_compressions > 0
    follow_up = torch.cat([turn1.sequences, random_ids(1, 24, seed=33)], 1)   # 25 unseen tokens: 4 chunks

    calls = Calls(model)
    turn2 = generate(model, follow_up, **cache_kw(model, cache))
    calls.handle.remove()
    assert get_output_cache(turn2) is cache
    prefill = calls.calls[:4]
    assert [q for q, _, _ in prefill] == [8, 8, 8, 1]
    assert all(pos == before for _, pos, before in calls.calls)   # every forward continues from the tokens seen
    assert prefill[0][1] == seen
    assert cache.get_seq_length() == turn2.sequences.shape[1] - 1

    # the same stream through a fresh cache, fed in the same pieces (turn 1's chunks, its decode steps, turn 2's)
    starts = [*range(0, 30, CHUNK), *range(30, seen), *range(seen, follow_up.shape[1], CHUNK)]
    want = pieces_decode(model, follow_up, lococo.LoCoCoCache(compressor), starts, 12)
    assert torch.equal(turn2.sequences, want)


def test_reused_cache_with_room_for_everything_equals_the_full_cache():
    """M above the whole conversation: LoCoCo and H2O never compress, and reuse gives the full cache's tokens."""
    model = tiny_model("llama", "sdpa", seed=34)
    first = random_ids(1, 30, seed=35)
    follow = random_ids(1, 24, seed=36)

    def two_turns(make_cache):
        cache = make_cache()
        turn1 = generate(model, first, **cache_kw(model, cache))
        turn2 = generate(model, torch.cat([turn1.sequences, follow], 1), **cache_kw(model, cache))
        return turn2.sequences

    want = two_turns(lambda: lococo.build_cache("full", model))
    compressor = tiny_compressor(model, seed=37, num_slots=128, chunk_size=CHUNK)
    lococo.apply_lococo(model, compressor)
    assert torch.equal(two_turns(lambda: lococo.LoCoCoCache(compressor)), want)
    assert torch.equal(two_turns(lambda: lococo.build_cache("h2o", model, num_slots=128)), want)
