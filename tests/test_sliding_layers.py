"""Models that mix sliding-window and full-attention layers (Gemma 3, Qwen3 with use_sliding_window), and Mistral.

Fixed-slot caches compress the full-attention layers; each sliding-window layer keeps transformers' own window
cache (docs/design.md#sliding-window-layers). Checked against the independent loop of ``slot_loop.py``, which
attends within the window in those layers, on both backends with a left-padded batch and a chunked prefill.
"""

from __future__ import annotations

import pytest
import torch
from slot_loop import SlotLoop, greedy_decode, left_padded

import lococo
from lococo.compressor import ModelGeometry
from lococo.hf.caches import kv_bytes
from lococo.hf.compat import get_output_cache

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer  # noqa: E402

BETA = 3
WINDOW = 20


def qwen3_mixed(attn: str, seed: int):
    """Four layers: 0 and 1 full attention, 2 and 3 within a window of 20 positions."""
    return tiny_model("qwen3", attn, seed=seed, num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
                      max_window_layers=2)


def gemma3(attn: str, seed: int, **overrides):
    """A tiny random Gemma 3: layers 0, 1 windowed (8 positions), 2 full, 3 windowed, 4 full."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, sliding_window=8,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                               "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.Gemma3TextConfig(**{**fields, **overrides})
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def generate(model, ids, **kwargs):
    return model.generate(ids, do_sample=False, return_dict_in_generate=True, **kwargs)


def test_geometry_reads_the_windowed_layers_of_mixed_models_only():
    assert ModelGeometry.of(qwen3_mixed("sdpa", 0)).windowed_layers == (2, 3)
    assert ModelGeometry.of(qwen3_mixed("sdpa", 0)).sliding_window == WINDOW
    assert ModelGeometry.of(gemma3("sdpa", 0)).windowed_layers == (0, 1, 3)
    assert ModelGeometry.of(gemma3("sdpa", 0)).compressed_layers == [2, 4]
    # every layer windowed (Mistral) or none: all layers are compressed
    assert ModelGeometry.of(tiny_model("mistral", sliding_window=64)).windowed_layers == ()
    assert ModelGeometry.of(tiny_model("qwen3")).windowed_layers == ()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["lococo", "h2o", "tova", "streaming"])
def test_mixed_layers_generate_like_the_loop(attn, kind):
    """Qwen3 with two windowed layers: a left-padded batch, chunked prefill and greedy decoding, per-layer budgets."""
    model = qwen3_mixed(attn, seed=60)
    budgets = [12, 9, 12, 12]   # the windowed layers' entries are not used
    lengths = [44, 35, 11]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=61), lengths)
    compressor = tiny_compressor(model, seed=62, num_slots=budgets, beta=BETA, num_local=2)
    assert [type(layer).__name__ for layer in compressor.layers] == ["LayerCompressor"] * 2 + ["WindowedLayer"] * 2
    lococo.apply_lococo(model, compressor if kind == "lococo" else None)
    if kind == "lococo":
        cache, loop = lococo.LoCoCoCache(compressor), SlotLoop(model, "lococo", budgets, BETA, compressor=compressor)
    else:
        cache = lococo.build_cache(kind, model, num_slots=budgets, beta=BETA, num_local=2)
        loop = SlotLoop(model, kind, budgets, BETA, num_local=2)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=25, prefill_chunk_size=16,
                   **cache_kw(model, cache))
    assert all(isinstance(cache.layers[i], DynamicSlidingWindowLayer) for i in (2, 3))
    assert cache.num_slots == [12, 9, None, None]
    assert min(m for m in cache.compressions_per_layer if m is not None) >= 2
    assert max(cache.stored_lengths[2:]) == WINDOW - 1        # the window, not the slots
    assert torch.equal(out.sequences, greedy_decode(loop, ids, mask, 25, chunk=16))
    assert loop.compressions[:2] == cache.compressions_per_layer[:2]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mixed_layers_multi_turn_reuse_like_the_loop(attn):
    model = qwen3_mixed(attn, seed=63)
    compressor = tiny_compressor(model, seed=64, beta=BETA)
    lococo.apply_lococo(model, compressor)
    first = random_ids(1, 30, seed=65)
    turn1 = generate(model, first, max_new_tokens=12)
    cache = get_output_cache(turn1)
    follow_up = torch.cat([turn1.sequences, random_ids(1, 9, seed=66)], 1)
    turn2 = generate(model, follow_up, max_new_tokens=12, **cache_kw(model, cache))
    loop = SlotLoop(model, "lococo", 12, BETA, compressor=compressor)
    assert torch.equal(turn1.sequences, greedy_decode(loop, first, torch.ones_like(first), 12))
    seen = turn1.sequences.shape[1] - 1
    assert torch.equal(turn2.sequences, greedy_decode(loop, follow_up, torch.ones_like(follow_up), 12, fed=seen))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_sliding_window_wider_than_the_slots_is_the_loop_without_a_window(attn):
    model = tiny_model("mistral", attn, seed=67, sliding_window=64)
    lengths = [40, 23]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=68), lengths)
    lococo.apply_lococo(model)
    cache = lococo.build_cache("h2o", model, num_slots=12, beta=BETA)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=30, prefill_chunk_size=16,
                   **cache_kw(model, cache))
    assert cache.num_compressions >= 3
    assert torch.equal(out.sequences, greedy_decode(SlotLoop(model, "h2o", 12, BETA), ids, mask, 30, chunk=16))
    # a window that slots could fall out of is refused
    with pytest.raises(ValueError, match="sliding window of 64 tokens"):
        lococo.apply_lococo(model, tiny_compressor(model, num_slots=60, beta=8))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_slots_larger_than_the_text_equal_transformers_cache(attn):
    """No compression: every layer holds what transformers' own cache holds, so the logits are the same."""
    model = gemma3(attn, seed=70)
    lengths = [30, 17]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=71), lengths)
    want = generate(model, ids, attention_mask=mask, max_new_tokens=10, output_logits=True,
                    **cache_kw(model, DynamicCache(config=model.config)))
    lococo.apply_lococo(model)
    cache = lococo.build_cache("h2o", model, num_slots=64, beta=BETA)
    got = generate(model, ids, attention_mask=mask, max_new_tokens=10, output_logits=True, **cache_kw(model, cache))
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert cache.num_compressions == 0 and cache.stored_lengths[0] == 7   # window 8: the last 7 entries


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["lococo", "h2o", "streaming"])
def test_gemma3_compresses_the_full_layers_and_a_padded_row_equals_the_row_alone(attn, kind):
    model = gemma3(attn, seed=72)
    compressor = tiny_compressor(model, seed=73, num_slots=10, beta=BETA)
    lococo.apply_lococo(model, compressor if kind == "lococo" else None)

    def run(ids, mask):
        cache = (lococo.LoCoCoCache(compressor) if kind == "lococo"
                 else lococo.build_cache(kind, model, num_slots=10, beta=BETA))
        out = generate(model, ids, attention_mask=mask, max_new_tokens=20, prefill_chunk_size=8,
                       **cache_kw(model, cache))
        return out.sequences, cache

    lengths = [45, 45]
    ids, mask = left_padded(random_ids(2, 50, seed=74), lengths)
    together, cache = run(ids, mask)
    assert cache.compressions_per_layer[2] >= 4 and cache.compressions_per_layer[0] is None
    assert cache.stored_lengths[0] == 7 and cache.stored_lengths[2] <= 10 + BETA + 1
    for row in range(2):
        alone, _ = run(ids[row:row + 1], mask[row:row + 1])
        assert torch.equal(together[row:row + 1], alone)
    # bytes: the windowed layers hold their window (3 layers, 2 rows, 1 KV head, 7 entries of 16 floats, keys and
    # values), the full layers at most M + beta + 1 entries each
    entry = 16 * 4 * 2
    assert kv_bytes(cache) - cache.compressed_kv_bytes() == 3 * 2 * 7 * entry
    assert 2 * 2 * 10 * entry <= cache.compressed_kv_bytes() <= 2 * 2 * (10 + BETA + 1) * entry


def test_a_cache_built_without_the_windows_is_refused_naming_the_layers():
    model = gemma3("sdpa", seed=75)
    lococo.apply_lococo(model)
    cache = lococo.H2OCache(5, 10, BETA)
    with pytest.raises(ValueError, match=r"sliding-window layers \[0, 1, 3\].*build_cache"):
        model(random_ids(1, 12, seed=76), **cache_kw(model, cache))


def test_a_compressor_of_a_mixed_model_saves_only_its_full_layers_and_fits_only_that_layout(tmp_path):
    model = gemma3("sdpa", seed=77)
    compressor = tiny_compressor(model, seed=78)
    assert sum(p.numel() for p in compressor.layers[0].parameters()) == 0
    compressor.save_pretrained(tmp_path / "c")
    loaded = lococo.LoCoCoCompressor.from_pretrained(tmp_path / "c", model=model)
    assert loaded.geometry.windowed_layers == (0, 1, 3) and loaded.geometry.sliding_window == 8
    assert sorted({name.split(".")[1] for name in loaded.state_dict()}) == ["2", "4"]
    for name, tensor in compressor.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    other = gemma3("sdpa", seed=77, layer_types=["sliding_attention"] * 2 + ["full_attention"] * 3)
    with pytest.raises(ValueError, match=r"sliding-window layers \[0, 1, 3\] vs \[0, 1\]"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path / "c", model=other)


def test_calibrate_distill_and_eval_work_on_the_compressed_layers_of_a_mixed_model(tmp_path, capsys):
    """Qwen3 with layers 2 and 3 windowed, through the command line."""
    import csv

    from lococo.budgets import Budgets
    from lococo.recipes import cli

    from hf_models import save_model_and_document

    doc = save_model_and_document(tmp_path, seed=80, words=80, arch="qwen3", num_hidden_layers=4,
                                  use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
    model = str(tmp_path / "model")
    assert cli.main(["calibrate", "--model", model, "--docs", doc, "--max-tokens", "160", "--grid", "8,12,16,24",
                     "--mean", "12", "--floor", "8", "--num-local", "2", "--beta", "2", "-B", "8",
                     "--output", str(tmp_path / "cal")]) == 0
    budgets = Budgets.load(tmp_path / "cal" / "budgets-m12.json")
    curves = budgets.details["errors"]
    assert curves[2] is None and curves[3] is None and all(len(c) == 4 for c in curves[:2])
    assert sum(budgets.num_slots[:2]) == 24 and budgets.num_slots[2:] == (12, 12)   # windowed: the mean, unused
    assert budgets.model["windowed_layers"] == [2, 3]
    assert "Layers [2, 3] are sliding-window layers" in (tmp_path / "cal" / "calibrate.md").read_text()

    assert cli.main(["distill", "--output", str(tmp_path / "run"), "--model", model, "--docs", doc,
                     "--budgets", str(tmp_path / "cal" / "budgets-m12.json"), "-B", "4", "--beta", "2",
                     "--kernel-size", "3", "--num-local", "2", "--seq-len", "64", "--sequences", "1",
                     "--compare-every", "1", "--no-progress"]) == 0
    trained = lococo.LoCoCoCompressor.from_pretrained(tmp_path / "run")
    assert [type(layer).__name__ for layer in trained.layers] == ["LayerCompressor"] * 2 + ["WindowedLayer"] * 2

    capsys.readouterr()
    assert cli.main(["eval", "--model", model, "--docs", doc, "--compressor", str(tmp_path / "run"),
                     "--methods", "lococo,h2o,full", "--max-tokens", "96", "--buckets", "0,32,96", "-B", "8",
                     "--beta", "2", "--num-local", "2", "--bootstrap", "0", "--no-progress",
                     "--output", str(tmp_path / "eval")]) == 0
    with open(tmp_path / "eval" / "methods.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    slots = budgets.num_slots[:2]
    assert rows["h2o"]["slots_per_layer"] == rows["lococo"]["slots_per_layer"] == " ".join(map(str, slots))
    assert int(rows["h2o"]["slot_kv_bytes"]) == sum(slots) * 2 * 16 * 2 * 4   # 2 KV heads, head_dim 16, K and V
    assert int(rows["full"]["peak_kv_bytes"]) > int(rows["h2o"]["peak_kv_bytes"])
