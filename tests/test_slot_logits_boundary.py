"""Slot logits of padded rows at the boundary: a row with M or more valid entries is fused and gets the logits.

A row of a padded batch that holds fewer than M valid entries when its layer compresses keeps them all
(nothing is fused, no logit); one with at least M, exactly M included, is compressed to M slots whose
fused ones carry the learned logits (``LoCoCoLayer.slot_logits``).
"""

from __future__ import annotations

import pytest
import torch

from lococo.hf.caches import LoCoCoLayer

from hf_models import tiny_compressor, tiny_model


@pytest.fixture(scope="module")
def compressor():
    compressor = tiny_compressor(tiny_model("llama", "sdpa", seed=60), seed=61, slot_bias=True)
    with torch.no_grad():
        compressor.layers[0].slot_logit.copy_(torch.arange(1, compressor.config.num_fused + 1) * 0.5)
    return compressor


@pytest.mark.parametrize("offsets", [(-1, 0, 1), (0,), (1, 0, -1, 0)])
def test_rows_with_at_least_m_valid_entries_get_the_logits_at_m_exactly_too(compressor, offsets):
    config = compressor.config
    M, H, C, beta = config.num_slots, config.num_heavy, config.num_fused, config.beta
    learned = compressor.layers[0].slot_logit.detach()
    layer = LoCoCoLayer(compressor.layers[0], config)
    b = len(offsets)
    valid = torch.tensor([M + offset for offset in offsets])
    gen = torch.Generator().manual_seed(62)
    stored = M + beta + 1                                  # one more than M + beta: the next update compresses
    k = torch.randn(b, 2, stored, 16, generator=gen)
    layer.update(k, torch.randn_like(k), new_valid=valid)
    assert torch.equal(layer.valid_len, valid) and layer.logit_bias is None
    layer.record_scores(torch.rand(b, 2, stored, generator=gen))

    new = torch.randn(b, 2, 2, 16, generator=gen)
    layer.update(new, new.clone())
    assert layer.num_compressions == 1 and layer.logit_bias.shape == (b, 2, M + 2)
    for row, n in enumerate(valid.tolist()):
        fused = layer.logit_bias[row, :, H:M]
        if n >= M:
            assert torch.equal(fused, learned.expand(2, C)), f"row with {n} valid entries (M = {M})"
        else:
            assert torch.equal(fused, torch.zeros(2, C)), f"row with {n} valid entries (M = {M})"
        assert torch.equal(layer.logit_bias[row, :, :H], torch.zeros(2, H))    # heavy hitters: no logit
    assert torch.equal(layer.logit_bias[:, :, M:], torch.zeros(b, 2, 2))         # the new entries: none
    assert layer.valid_len.tolist() == [min(n, M) + 2 for n in valid.tolist()]

    # the next compression finds at least M valid entries in every row (M - 1 + 2 new): all fused
    layer.record_scores(torch.rand(b, 2, layer.stored_length, generator=gen))
    while not layer._will_compress():
        more = torch.randn(b, 2, 1, 16, generator=gen)
        layer.update(more, more.clone())
        layer.record_scores(torch.rand(b, 2, layer.stored_length, generator=gen))
    more = torch.randn(b, 2, 1, 16, generator=gen)
    layer.update(more, more.clone())
    assert layer.num_compressions == 2
    assert torch.equal(layer.logit_bias[:, :, H:M], learned.expand(b, 2, C))

