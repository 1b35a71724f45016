"""benchmarks/lookahead_oracle.py: the oracle cache compresses inside the attention, with that call's scores."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

import lococo
from lococo.hf.caches import FixedSlotCache, H2OCache
from lococo.hf.chunked import chunked_nll

from hf_models import random_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))   # it imports summarize_evals beside it
spec = importlib.util.spec_from_file_location("lookahead_oracle", ROOT / "benchmarks" / "lookahead_oracle.py")
oracle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oracle)


def _oracle_nll(model, ids, num_slots, num_local, seen=None):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(oracle.NAME, oracle.lookahead_attention)
    AttentionMaskInterface.register(oracle.NAME, sdpa_mask)
    model.set_attn_implementation(oracle.NAME)
    layers = [oracle.LookaheadH2OLayer(num_slots, 2, num_local) for _ in range(model.config.num_hidden_layers)]
    if seen is not None:   # records each compression's scores and the stored keys they rank
        compress_with = oracle.LookaheadH2OLayer.compress_with

        def spy(layer, scores, new):
            seen.append((layer.keys[:, :, : layer.stored_length - new].clone(), scores.clone(), new))
            compress_with(layer, scores, new)
        for layer in layers:
            layer.compress_with = spy.__get__(layer)
    with torch.no_grad():
        return chunked_nll(model, ids, FixedSlotCache(layers), 4).nll


def test_with_every_slot_recent_the_oracle_is_h2o():
    model = tiny_model("llama", "sdpa", seed=91)
    ids = random_ids(1, 41, seed=92)
    lococo.apply_lococo(model)
    with torch.no_grad():
        h2o = chunked_nll(model, ids, H2OCache(model.config.num_hidden_layers, 6, 2, num_local=6), 4).nll
    assert torch.allclose(_oracle_nll(model, ids, 6, 6), h2o, atol=1e-5)


def test_the_oracle_ranks_by_the_coming_queries_and_keeps_m_slots():
    model = tiny_model("llama", "sdpa", seed=93)
    ids = random_ids(1, 40, seed=94)
    seen = []
    nll = _oracle_nll(model, ids, 6, 1, seen)
    assert torch.isfinite(nll).all() and len(seen) > 5
    for stored_keys, scores, new in seen:
        assert new == 4 and scores.shape == stored_keys.shape[:3]
        # every query of the call sees every stored entry: 4 queries x the heads of a KV group, minus what the
        # new keys draw
        groups = model.config.num_attention_heads // model.config.num_key_value_heads
        assert (scores.sum(-1) <= 4 * groups + 1e-4).all() and (scores.sum(-1) > 0).all()
    model.set_attn_implementation("sdpa")
    lococo.apply_lococo(model)
    with torch.no_grad():
        h2o = chunked_nll(model, ids, H2OCache(model.config.num_hidden_layers, 6, 2, num_local=1), 4).nll
    assert not torch.allclose(nll, h2o, atol=1e-4)   # another selection than the previous chunk's scores
