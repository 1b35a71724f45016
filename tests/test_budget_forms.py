"""A budget given as slots, as a compression ratio of a context, or as the entries a layer may hold."""

from __future__ import annotations

import pytest

import lococo
from lococo.budgets import slots_for_budget

from hf_models import tiny_model


def test_each_form_gives_its_m():
    assert slots_for_budget(96) == 96
    assert slots_for_budget(compression_ratio=0.1, context_length=8192) == 819
    assert slots_for_budget(kv_tokens=144, beta=16) == 128
    model = tiny_model("llama")   # 2048 positions
    assert slots_for_budget(compression_ratio=0.25, model=model) == 512
    assert slots_for_budget(compression_ratio=0.25, model=model.config) == 512


@pytest.mark.parametrize("kwargs, message", [
    ({}, None),
    ({"num_slots": 8, "kv_tokens": 40}, "give one budget, not num_slots and kv_tokens"),
    ({"compression_ratio": 0.1, "kv_tokens": 40}, "give one budget, not compression_ratio and kv_tokens"),
    ({"compression_ratio": 0.0, "context_length": 100}, r"compression_ratio must be in \(0, 1\], got 0.0"),
    ({"compression_ratio": 1.5, "context_length": 100}, r"compression_ratio must be in \(0, 1\], got 1.5"),
    ({"compression_ratio": True, "context_length": 100}, r"compression_ratio must be in \(0, 1\]"),
    ({"compression_ratio": 0.5, "context_length": 0}, "context_length must be a positive integer, got 0"),
    ({"compression_ratio": 0.5}, "compression_ratio needs context_length"),
    ({"context_length": 100}, "context_length goes with compression_ratio"),
    ({"kv_tokens": 16}, "kv_tokens must be an integer above beta = 16"),
    ({"kv_tokens": 20.5}, "kv_tokens must be an integer above beta = 16"),
])
def test_bad_budgets_name_the_argument(kwargs, message):
    if message is None:
        assert slots_for_budget(**kwargs) is None   # nothing given: the caller's default applies
        return
    with pytest.raises(ValueError, match=message):
        slots_for_budget(**kwargs)


def test_for_model_and_build_cache_take_every_form():
    model = tiny_model("llama")
    by_ratio = lococo.LoCoCoCompressor.for_model(model, compression_ratio=0.0625, context_length=1024, beta=8)
    assert by_ratio.config.num_slots == 64 and by_ratio.config.beta == 8
    by_tokens = lococo.LoCoCoCompressor.for_model(model, kv_tokens=72, beta=8)
    assert by_tokens.config.num_slots == 64
    with pytest.raises(TypeError, match="not both"):
        lococo.LoCoCoCompressor.for_model(model, by_ratio.config, kv_tokens=72)
    for kind in ("h2o", "tova", "streaming"):
        assert lococo.build_cache(kind, model, compression_ratio=0.5, context_length=40).num_slots == [20, 20]
        assert lococo.build_cache(kind, model, kv_tokens=40, beta=4).num_slots == [36, 36]
    # LoCoCo keeps its compressor's slots: the same budget is accepted, another refused
    assert lococo.build_cache("lococo", model, by_tokens, kv_tokens=72).num_slots == [64, 64]
    with pytest.raises(ValueError, match="differs from the compressor's"):
        lococo.build_cache("lococo", model, by_tokens, kv_tokens=80)
    with pytest.raises(ValueError, match="give one budget"):
        lococo.build_cache("h2o", model, num_slots=8, compression_ratio=0.5, context_length=40)
