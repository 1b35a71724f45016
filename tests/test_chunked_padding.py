"""``chunked_nll`` and ``iter_chunks`` with a left-padded ``attention_mask``.

The full cache (transformers' DynamicCache) must give each row what one plain forward of that row
alone, unpadded, gives; the target mask and the ``position_ids`` fed to the model are checked
directly. A fixed-slot cache must give each row what the same row alone with the same padding gives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from slot_loop import left_padded
from transformers.cache_utils import DynamicCache

import lococo

from hf_models import random_ids, tiny_compressor, tiny_model

LENGTHS = [23, 17, 9, 2]   # the last row is padding for its first four chunks of 5
T = max(LENGTHS)


class FedInputs:
    """Records the input_ids, position_ids and attention_mask of every forward of the model."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({name: kwargs.get(name) for name in ("input_ids", "position_ids", "attention_mask")})

    def close(self):
        self.handle.remove()

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat([call[name] for call in self.calls], 1)


def alone_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL [T - 1] of one unpadded row: one forward, no cache, no chunks."""
    with torch.no_grad():
        logits = model(ids[None], use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [5, 64])
def test_full_cache_rows_equal_each_row_alone(attn, chunk):
    model = tiny_model("llama", attn, seed=60)
    ids, mask = left_padded(random_ids(len(LENGTHS), T, seed=61), LENGTHS)
    fed = FedInputs(model)
    with torch.no_grad():
        out = lococo.chunked_nll(model, ids, DynamicCache(config=model.config), chunk, attention_mask=mask)
    fed.close()
    assert out.nll.shape == out.target_mask.shape == (len(LENGTHS), T - 1)
    for row, n in enumerate(LENGTHS):
        pad = T - n
        # a target counts when it and its context token are real: never across the padding
        assert out.target_mask[row].tolist() == [t >= pad for t in range(T - 1)]
        assert torch.all(out.nll[row, :pad] == 0)
        torch.testing.assert_close(out.nll[row, pad:], alone_nll(model, ids[row, pad:]), rtol=1e-4, atol=1e-4)
        # real tokens at positions 0, 1, ... as in the row alone
        assert fed.cat("position_ids")[row, pad:].tolist() == list(range(n))
    assert [call["input_ids"].shape[1] for call in fed.calls] == [min(chunk, T - s) for s in range(0, T, chunk)]
    assert [call["attention_mask"].shape[1] for call in fed.calls] == [min(s + chunk, T) for s in range(0, T, chunk)]
    assert out.mean() == pytest.approx(float(sum(alone_nll(model, ids[r, T - n:]).sum()
                                                 for r, n in enumerate(LENGTHS)) / sum(n - 1 for n in LENGTHS)),
                                       rel=1e-4)


def test_iter_chunks_continues_a_padded_cache():
    """A second call on a cache that holds ``seen`` tokens takes the mask of all seen + T tokens."""
    model = tiny_model("llama", "sdpa", seed=62)
    ids, mask = left_padded(random_ids(len(LENGTHS), T, seed=63), LENGTHS)
    split = 12
    cache = DynamicCache(config=model.config)
    fed = FedInputs(model)
    with torch.no_grad():
        first = lococo.chunked_nll(model, ids[:, :split], cache, 5, attention_mask=mask[:, :split])
        second = lococo.chunked_nll(model, ids[:, split:], cache, 5, attention_mask=mask)
    fed.close()
    assert cache.get_seq_length() == T
    positions = fed.cat("position_ids")
    for row, n in enumerate(LENGTHS):
        pad = T - n
        want = alone_nll(model, ids[row, pad:])                 # want[t - pad] predicts token t + 1
        for part, offset in ((first, 0), (second, split)):
            for t in range(part.nll.shape[1]):
                real = offset + t >= pad
                assert bool(part.target_mask[row, t]) == real
                if real:
                    want_t = float(want[offset + t - pad])
                    assert float(part.nll[row, t]) == pytest.approx(want_t, rel=1e-4, abs=1e-4)
        assert positions[row, pad:].tolist() == list(range(n))
    # the [b, T] form of the mask after a cache of real tokens: they are prepended as real
    model_ids = random_ids(2, 20, seed=64)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        lococo.chunked_nll(model, model_ids[:, :8], cache, 5)
        with pytest.raises(ValueError, match=r"attention_mask must be \[2, 12\] or \[2, 20\]"):
            next(lococo.iter_chunks(model, model_ids[:, 8:], cache, 5, attention_mask=torch.ones(2, 19)))
        short = lococo.chunked_nll(model, model_ids[:, 8:], cache, 5, attention_mask=torch.ones(2, 12))
    for row in range(2):
        torch.testing.assert_close(short.nll[row], alone_nll(model, model_ids[row])[8:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lococo", "h2o", "streaming"])
def test_fixed_slot_rows_equal_each_row_alone_with_its_padding(kind):
    model = tiny_model("llama", "sdpa", seed=65)
    compressor = tiny_compressor(model, seed=66, num_local=1)
    lococo.apply_lococo(model, compressor)
    ids, mask = left_padded(random_ids(len(LENGTHS), T, seed=67), LENGTHS)

    def run(rows):
        cache = lococo.build_cache(kind, model, compressor)
        with torch.no_grad():
            return lococo.chunked_nll(model, ids[rows], cache, 4, attention_mask=mask[rows]), cache

    batch, cache = run(slice(None))
    assert cache.num_compressions >= 2
    for row in range(len(LENGTHS)):
        alone, _ = run(slice(row, row + 1))
        assert torch.equal(batch.target_mask[row], alone.target_mask[0])
        torch.testing.assert_close(batch.nll[row], alone.nll[0], rtol=1e-4, atol=1e-4)
