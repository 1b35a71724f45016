"""The `past_key_values=` deprecation warning of transformers 5.24 points at the caller, not into lococo."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

import lococo

from hf_models import random_ids, tiny_compressor, tiny_model


@pytest.mark.skipif(lococo.cache_kwarg(tiny_model()) != "cache",
                    reason="past_key_values= is the current name before transformers 5.24")
def test_generate_with_past_key_values_warns_at_the_callers_line():
    model = tiny_model()
    compressor = tiny_compressor(model)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(1, 20, 0)
    cache = lococo.LoCoCoCache(compressor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, max_new_tokens=3, past_key_values=cache)
    deprecations = [w for w in caught if "past_key_values" in str(w.message)]
    assert deprecations and all(w.filename == __file__ for w in deprecations)
    assert all(issubclass(w.category, FutureWarning) for w in deprecations)
    assert out.shape == (1, 23) and cache.get_seq_length() == 22   # the cache passed was the one used
