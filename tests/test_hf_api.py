"""The user-facing API: config validation, save/load, apply/remove, errors that say what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lococo
from lococo.hf import get_output_cache

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model, transformers


@pytest.mark.parametrize("fields,message", [
    ({"num_slots": 0}, "num_slots"),
    ({"kernel_size": 4}, "odd"),
    ({"rho": 1.5}, "rho"),
    ({"rho": 0.0}, "no fused slot"),
    ({"rho": 0.25, "num_heavy": 4}, "either rho or num_heavy"),
    ({"num_heavy": 128}, "num_heavy"),
    ({"num_local": 65}, "num_local"),
    ({"beta": -1}, "beta"),
    ({"init_std": 0.0}, "init_std"),
    ({"chunk_size": 2.5}, "chunk_size"),
])
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        lococo.LoCoCoConfig(**fields)


def test_config_derived_sizes():
    assert (lococo.LoCoCoConfig().num_heavy, lococo.LoCoCoConfig().num_fused) == (64, 64)
    assert lococo.LoCoCoConfig(num_slots=129).num_fused == 65            # halves round up
    assert lococo.LoCoCoConfig(num_slots=16, num_heavy=4).num_fused == 12
    assert lococo.LoCoCoConfig(rho=1.0).num_heavy == 0
    with pytest.raises(ValueError, match="unknown fields"):
        lococo.LoCoCoConfig.from_dict({"num_slots": 8, "slots": 3})


def test_compressor_shapes_follow_the_model():
    model = tiny_model("qwen3")
    compressor = lococo.LoCoCoCompressor.for_model(model, num_slots=32, kernel_size=7)
    assert len(compressor) == 2
    assert compressor[0].weight.shape == (16, 32, 7) and compressor[0].weight.dtype == torch.float32
    assert compressor.needs_scores()
    with pytest.raises(TypeError, match="not both"):
        lococo.LoCoCoCompressor.for_model(model, lococo.LoCoCoConfig(), num_slots=4)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama", "sdpa", seed=40)
    compressor = tiny_compressor(model, seed=41)
    with torch.no_grad():
        compressor[1].alpha.fill_(0.25)
    compressor.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "lococo_config.json").read_text())
    assert meta["config"]["num_slots"] == 12 and meta["model"]["num_layers"] == 2
    loaded = lococo.LoCoCoCompressor.from_pretrained(tmp_path, model=model)
    assert loaded.config == compressor.config
    for (name, a), (_, b) in zip(compressor.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in loaded.parameters())

    ids = random_ids(1, 30, seed=42)
    outputs = []
    for c in (compressor, loaded):
        lococo.apply_lococo(model, c)
        outputs.append(model.generate(ids, max_new_tokens=20, do_sample=False))
    assert torch.equal(*outputs)


def test_load_says_what_differs(tmp_path):
    model = tiny_model("llama")
    tiny_compressor(model).save_pretrained(tmp_path)
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="2 decoder layers vs 3"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path, model=deeper)
    wider = tiny_model("llama", num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="head_dim 16 vs 32"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path, model=wider.config)
    with pytest.warns(UserWarning, match="trained on a llama model"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path, model=tiny_model("qwen2"))

    meta = json.loads((tmp_path / "lococo_config.json").read_text())
    meta["config"]["kernel_size"] = 7
    (tmp_path / "lococo_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layers.0.weight has shape \(6, 32, 5\), the config implies \(6, 32, 7\)"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path / "nowhere")


def test_apply_rejects_what_it_cannot_run():
    model = tiny_model("llama")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                                bos_token_id=1, eos_token_id=2))
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'.*supported: \\['gemma3_text', 'llama', 'mistral'"):
        lococo.apply_lococo(gpt2, None)
    with pytest.raises(ValueError, match="built for llama with 3 layers and head_dim 16.*3 decoder layers vs 2"):
        lococo.apply_lococo(model, tiny_compressor(tiny_model("llama", num_hidden_layers=3)))
    with pytest.raises(TypeError, match="LoCoCoCompressor"):
        lococo.apply_lococo(model, lococo.LoCoCoConfig())
    sliding = tiny_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding-window layers \\[\\] vs \\[1\\]"):   # a compressor of other layers
        lococo.apply_lococo(sliding, tiny_compressor(model))
    windowed = tiny_model("mistral", sliding_window=14)
    with pytest.raises(ValueError, match="sliding window of 14 tokens.*M \\+ beta = 15"):
        lococo.apply_lococo(windowed, tiny_compressor(windowed))
    assert not lococo.hf.is_patched(model)


def test_plain_forwards_use_the_cache_and_remove_restores():
    model = tiny_model("llama", "eager", seed=43)
    compressor = tiny_compressor(model, seed=44)
    ids = random_ids(2, 30, seed=45)
    with torch.no_grad():
        plain = model(ids)
        assert type(get_output_cache(plain)).__name__ == "DynamicCache"
        lococo.apply_lococo(model, compressor)
        assert model.config._attn_implementation == "lococo_eager"
        patched = model(ids)
        cache = get_output_cache(patched)
        assert isinstance(cache, lococo.LoCoCoCache) and cache.get_seq_length() == 30
        torch.testing.assert_close(patched.logits, plain.logits)   # one call: nothing compressed yet
        follow = model(ids[:, :4], **cache_kw(model, cache))
        assert cache.num_compressions == 1 and cache.get_seq_length() == 34
        assert follow.logits.shape == (2, 4, 96)
        assert type(get_output_cache(model(ids, use_cache=False)) or None).__name__ == "NoneType"

    lococo.remove_lococo(model)
    assert model.config._attn_implementation == "eager" and "generate" not in model.__dict__
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    with torch.no_grad():
        assert type(get_output_cache(model(ids))).__name__ == "DynamicCache"
    lococo.remove_lococo(model)   # idempotent


def test_apply_twice_replaces_the_patch():
    model = tiny_model("llama", "sdpa")
    lococo.apply_lococo(model, tiny_compressor(model))
    lococo.apply_lococo(model, tiny_compressor(model, num_slots=20))
    assert len(model.model._forward_pre_hooks) == 1
    out = model.generate(random_ids(1, 10, seed=1), max_new_tokens=2, return_dict_in_generate=True)
    assert get_output_cache(out).config.num_slots == 20
    lococo.remove_lococo(model)
    assert model.config._attn_implementation == "sdpa"


def test_build_cache_kinds():
    model = tiny_model("llama")
    compressor = tiny_compressor(model)
    assert isinstance(lococo.build_cache("lococo", model, compressor), lococo.LoCoCoCache)
    h2o = lococo.build_cache("h2o", model, compressor)
    assert isinstance(h2o, lococo.H2OCache) and h2o.layers[0].num_slots == 12 and h2o.layers[0].beta == 3
    stream = lococo.build_cache("streaming", model, num_slots=32)
    assert len(stream.layers) == 2 and stream.layers[0].beta == 16
    assert type(lococo.build_cache("full", model)).__name__ == "DynamicCache"
    assert h2o.layers[0].num_local == 0
    with pytest.raises(ValueError, match="needs num_slots"):
        lococo.build_cache("h2o", model)


def test_h2o_built_beside_a_compressor_keeps_its_recent_window():
    model = tiny_model("llama")
    compressor = tiny_compressor(model, num_local=4)
    assert all(layer.num_local == 4 for layer in lococo.build_cache("h2o", model, compressor).layers)
    tova = lococo.build_cache("tova", model, compressor)
    assert isinstance(tova, lococo.TOVACache) and tova.layers[0].num_local == 4 and tova.layers[0].num_slots == 12
    assert lococo.build_cache("h2o", model, compressor, num_local=0).layers[1].num_local == 0
    assert lococo.build_cache("h2o", model, num_slots=8, num_local=3).layers[0].num_local == 3
    with pytest.raises(ValueError, match="kind must be one of"):
        lococo.build_cache("snapkv", model)


def test_cache_keyword_is_the_one_this_transformers_takes(recwarn):
    model = tiny_model("llama")
    lococo.apply_lococo(model, tiny_compressor(model))
    name = lococo.hf.cache_kwarg(model)
    cache = lococo.LoCoCoCache(tiny_compressor(model))
    with torch.no_grad():
        out = model(random_ids(1, 5, seed=1), **{name: cache})
    assert get_output_cache(out) is cache and cache.get_seq_length() == 5
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


def test_import_does_not_need_transformers():
    code = "import sys, lococo; assert 'transformers' not in sys.modules; lococo.LoCoCoConfig(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
