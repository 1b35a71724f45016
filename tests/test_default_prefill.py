"""generate() after apply_lococo reads the prompt in chunks of the compressor's B by default."""

from __future__ import annotations

import torch

import lococo
from lococo.hf import get_output_cache

from hf_models import random_ids, tiny_compressor, tiny_model


class FedLengths:
    """Tokens fed to the model by each forward."""

    def __init__(self, model):
        self.fed = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.fed.append(ids.shape[1])

    def close(self):
        self.handle.remove()


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, **kwargs)


def test_plain_generate_prefills_in_chunks_of_B_and_matches_chunked_nll():
    model = tiny_model("llama", "sdpa", seed=40)
    compressor = tiny_compressor(model, seed=41, chunk_size=7)
    with torch.no_grad():
        compressor.layers[0].bias.normal_(0, 1.0)   # a bias bug must show
    lococo.apply_lococo(model, compressor)
    ids = random_ids(1, 45, seed=42)
    fed = FedLengths(model)
    out = _generate(model, ids)
    fed.close()
    assert fed.fed[:7] == [7, 7, 7, 7, 7, 7, 3]        # the prompt, B = 7 tokens at a time
    assert set(fed.fed[7:]) == {1}
    assert get_output_cache(out).num_compressions > 0

    # the loss of the prompt and the first generated token's logits, against chunked_nll
    with torch.no_grad():
        ref = lococo.chunked_nll(model, ids, lococo.LoCoCoCache(compressor), chunk_size=7, return_logits=True)
    torch.testing.assert_close(out.logits[0], ref.logits[:, -1], rtol=1e-5, atol=1e-5)
    whole = torch.cat([ids, out.sequences[:, ids.shape[1]:ids.shape[1] + 1]], dim=1)
    with torch.no_grad():
        ref_next = lococo.chunked_nll(model, whole, lococo.LoCoCoCache(compressor), chunk_size=7)
    picked = torch.log_softmax(out.logits[0].float(), -1).gather(-1, whole[:, -1:]).neg()
    torch.testing.assert_close(picked[0, 0], ref_next.nll[0, -1], rtol=1e-5, atol=1e-5)


def test_the_callers_prefill_chunk_size_wins_and_one_shot_differs():
    model = tiny_model("llama", "sdpa", seed=43)
    lococo.apply_lococo(model, tiny_compressor(model, seed=44, chunk_size=7))
    ids = random_ids(1, 45, seed=45)
    fed = FedLengths(model)
    chunked = _generate(model, ids, prefill_chunk_size=5)
    fed.close()
    assert fed.fed[:9] == [5] * 9
    one_shot = _generate(model, ids, prefill_chunk_size=45)
    default = _generate(model, ids)
    # reading the whole prompt at once compresses it in one step: a different cache, other logits
    assert not torch.allclose(one_shot.logits[0], default.logits[0])
    assert not torch.allclose(chunked.logits[0], default.logits[0])


def test_baseline_cache_passed_explicitly_is_chunked_with_the_patch_compressors_B():
    model = tiny_model("llama", "sdpa", seed=46)
    compressor = tiny_compressor(model, seed=47, chunk_size=6)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(1, 20, seed=48)
    fed = FedLengths(model)
    cache = lococo.build_cache("h2o", model, num_slots=12)
    _generate(model, ids, **{lococo.cache_kwarg(model): cache})
    fed.close()
    assert fed.fed[:4] == [6, 6, 6, 2]
