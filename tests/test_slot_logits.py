"""Learned attention logits on fused slots (LoCoCoConfig.slot_bias): attention, cache bookkeeping, I/O."""

from __future__ import annotations

import json

import pytest
import torch

import lococo
from lococo.hf import attention
from lococo.hf.caches import LoCoCoLayer

from hf_models import random_ids, tiny_compressor, tiny_model


class _Module(torch.nn.Module):
    pass


def _brute_force(query, key, value, allowed, bias, scaling):
    """Double-precision loop over batch rows, query heads and queries."""
    b, heads, q_len, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    out = torch.zeros(b, q_len, heads, d, dtype=torch.float64)
    scores = torch.zeros(b, kv_heads, kv_len, dtype=torch.float64)
    full_bias = torch.nn.functional.pad(bias.double(), (0, kv_len - bias.shape[-1]))
    for row in range(b):
        for h in range(heads):
            g = h // groups
            for i in range(q_len):
                ok = allowed[row, i]
                if not ok.any():
                    continue
                logits = (key[row, g].double() @ query[row, h, i].double()) * scaling + full_bias[row, g]
                logits[~ok] = float("-inf")
                p = torch.softmax(logits, -1)
                out[row, i, h] = p @ value[row, g].double()
                scores[row, g] += p
    return out, scores


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1), (2, 2)])
def test_biased_attention_matches_brute_force_with_padding(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, q_len, stored, d = 2, 5, 9, 8
    kv_len = stored + q_len
    query = torch.randn(b, heads, q_len, d, generator=gen)
    key = torch.randn(b, kv_heads, kv_len, d, generator=gen)
    value = torch.randn(b, kv_heads, kv_len, d, generator=gen)
    bias = torch.randn(b, kv_heads, stored, generator=gen) * 2
    i = torch.arange(q_len).unsqueeze(-1)
    j = torch.arange(kv_len)
    allowed = ((j < stored) | (j - stored <= i)).expand(b, q_len, kv_len).clone()
    allowed[1, :, :4] = False          # row 1: left padding in the stored part
    allowed[1, 0] = False              # and a query that sees no key
    out, probs, scores = attention.biased_attention(_Module().eval(), query, key, value, allowed[:, None],
                                                    bias, scaling=0.3)
    want_out, want_scores = _brute_force(query, key, value, allowed, bias, 0.3)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)
    assert probs.shape == (b, heads, q_len, kv_len)
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))


def test_zero_bias_equals_the_backends_attention_and_scores():
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 6, 16, generator=gen)
    key = torch.randn(2, 2, 15, 16, generator=gen)
    value = torch.randn(2, 2, 15, 16, generator=gen)
    allowed = torch.ones(2, 1, 6, 15, dtype=torch.bool)
    allowed[0, :, :, :3] = False
    out, _, scores = attention.biased_attention(_Module().eval(), query, key, value, allowed,
                                                torch.zeros(2, 2, 9), scaling=0.25)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Module().eval()
    module.is_causal = False
    module.num_key_value_groups = 2
    want, _ = sdpa_attention_forward(module, query, key, value, allowed, scaling=0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, attention.attention_scores(query, key, allowed, 0.25), rtol=1e-5, atol=1e-5)


def _slot_compressor(model, seed, logits=None, **fields):
    compressor = tiny_compressor(model, seed=seed, slot_bias=True, **fields)
    if logits is not None:
        with torch.no_grad():
            for layer, value in zip(compressor.layers, logits):
                layer.slot_logit.copy_(value)
    return compressor


def test_the_cache_puts_the_logits_on_the_fused_slots_of_fused_rows_only():
    model = tiny_model("llama", "sdpa", seed=50)
    compressor = _slot_compressor(model, 51)
    config = compressor.config
    M, H, C = config.num_slots, config.num_heavy, config.num_fused
    learned = torch.arange(1, C + 1, dtype=torch.float32)
    with torch.no_grad():
        compressor.layers[0].slot_logit.copy_(learned)
    layer = LoCoCoLayer(compressor.layers[0], config)
    gen = torch.Generator().manual_seed(52)
    k = torch.randn(2, 2, M + config.beta + 1, 16, generator=gen)
    layer.update(k, k.clone(), new_valid=torch.tensor([M + config.beta + 1, M - 2]))
    assert layer.logit_bias is None
    layer.record_scores(torch.rand(2, 2, layer.stored_length, generator=gen))
    new = torch.randn(2, 2, 3, 16, generator=gen)
    layer.update(new, new.clone())
    assert layer.logit_bias.shape == (2, 2, M + 3)
    assert torch.equal(layer.logit_bias[0, :, :H], torch.zeros(2, H))
    assert torch.equal(layer.logit_bias[0, :, H:M], learned.expand(2, C))
    assert torch.equal(layer.logit_bias[1], torch.zeros(2, M + 3))          # fewer than M valid: nothing fused
    assert torch.equal(layer.logit_bias[:, :, M:], torch.zeros(2, 2, 3))    # new entries
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.logit_bias[1, :, H:M], learned.expand(2, C))
    layer.reset()
    assert layer.logit_bias is None


def test_generate_with_zero_logits_equals_no_logits_and_nonzero_logits_change_it():
    model = tiny_model("llama", "sdpa", seed=53)
    ids = random_ids(2, 40, seed=54)
    plain = tiny_compressor(model, seed=55)
    with_logits = _slot_compressor(model, 55)                  # same conv and alpha, logits 0
    for a, b in zip(plain.layers, with_logits.layers):
        assert torch.equal(a.weight, b.weight)

    def run(compressor):
        lococo.apply_lococo(model, compressor)
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=25, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)

    base, zero = run(plain), run(with_logits)
    assert torch.equal(base.sequences, zero.sequences)
    for x, y in zip(base.logits, zero.logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for layer in with_logits.layers:
            layer.slot_logit.fill_(3.0)
    shifted = run(with_logits)
    assert not all(torch.allclose(x, y) for x, y in zip(base.logits, shifted.logits))


def test_save_and_load_keep_the_logits_and_old_configs_load_without_them(tmp_path):
    model = tiny_model("llama", "sdpa", seed=56)
    compressor = _slot_compressor(model, 57, logits=[torch.full((6,), 0.5), torch.full((6,), -1.0)])
    compressor.save_pretrained(tmp_path / "new")
    loaded = lococo.LoCoCoCompressor.from_pretrained(tmp_path / "new", model=model)
    assert loaded.config.slot_bias
    for a, b in zip(compressor.layers, loaded.layers):
        assert torch.equal(a.slot_logit, b.slot_logit)

    plain = tiny_compressor(model, seed=58)
    plain.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "lococo_config.json").read_text())
    del meta["config"]["slot_bias"]                       # as written before the field existed
    (tmp_path / "old" / "lococo_config.json").write_text(json.dumps(meta))
    old = lococo.LoCoCoCompressor.from_pretrained(tmp_path / "old", model=model)
    assert not old.config.slot_bias and old.layers[0].slot_logit is None


def test_slot_bias_must_be_a_bool():
    with pytest.raises(ValueError, match="slot_bias"):
        lococo.LoCoCoConfig(slot_bias="yes")


@pytest.mark.parametrize("slots", [64, 128, 256])
def test_shipped_compressors_load_by_name(slots):
    name = f"smollm2-135m-m{slots}"
    assert name in lococo.LoCoCoCompressor.pretrained_names()
    compressor = lococo.LoCoCoCompressor.from_pretrained(name)
    assert compressor.geometry.num_layers == 30 and compressor.config.num_slots == slots
    assert compressor.config.num_local == 16 and compressor.config.slot_bias
    assert all(0 <= float(layer.alpha) <= 1 for layer in compressor.layers)
    with pytest.raises(FileNotFoundError):
        lococo.LoCoCoCompressor.from_pretrained("no-such-compressor")
