"""Per-layer budgets: the config and file formats, the allocation, and generate() against the independent loop."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from slot_loop import SlotLoop, greedy_decode, left_padded

import lococo
from lococo.budgets import Budgets, allocate, per_layer_slots, proportional_slots, pyramid_slots
from lococo.compressor import CONFIG_FILE
from lococo.hf import get_output_cache

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model

# three layers with budgets far apart, so that every call sees three stored lengths
BUDGETS = [12, 20, 7]
BETA = 3


def three_layer_model(attn: str, seed: int):
    return tiny_model("llama", attn, seed=seed, num_hidden_layers=3)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, return_dict_in_generate=True, **{"do_sample": False, **kwargs})


# --- config and file formats ---------------------------------------------------------------------

def test_config_per_layer_slots_and_layer_configs():
    config = lococo.LoCoCoConfig(num_slots=[8, 16, 5], num_local=2, beta=3)
    assert config.per_layer and config.max_slots == 16
    assert [config.layer(i).num_slots for i in range(3)] == [8, 16, 5]
    assert [config.layer(i).num_fused for i in range(3)] == [4, 8, 3]
    assert config.layer(1).beta == 3 and not config.layer(1).per_layer
    assert config.slots_per_layer(3) == [8, 16, 5]
    with pytest.raises(ValueError, match="3 per-layer budgets for a model with 2"):
        config.slots_per_layer(2)
    with pytest.raises(ValueError, match="config.layer"):
        _ = config.num_fused
    assert lococo.LoCoCoConfig.from_dict(config.to_dict()) == config
    assert lococo.LoCoCoConfig(num_slots=Budgets((8, 16, 5))).num_slots == (8, 16, 5)


@pytest.mark.parametrize("slots, message", [
    ([8, 0, 4], "layer 1 has 0"),
    ([], "non-empty list"),
    ([8, 2.5], "list of ints"),
    ([8, 1], r"layer 1 \(M = 1\)"),            # rho 0.5 of M = 1 leaves num_local 1 no heavy slot
])
def test_config_rejects_bad_per_layer_slots(slots, message):
    with pytest.raises(ValueError, match=message):
        lococo.LoCoCoConfig(num_slots=slots, num_local=1)


def test_per_layer_compressor_saves_as_format_2_and_format_1_still_loads(tmp_path):
    model = three_layer_model("sdpa", seed=1)
    compressor = tiny_compressor(model, num_slots=BUDGETS)
    assert [layer.num_fused for layer in compressor.layers] == [6, 10, 4]
    compressor.save_pretrained(tmp_path / "budgets")
    meta = json.loads((tmp_path / "budgets" / CONFIG_FILE).read_text())
    assert meta["format_version"] == 2 and meta["config"]["num_slots"] == BUDGETS
    loaded = lococo.LoCoCoCompressor.from_pretrained(tmp_path / "budgets", model=model)
    assert loaded.config == compressor.config
    for a, b in zip(loaded.layers, compressor.layers):
        assert torch.equal(a.weight, b.weight)

    uniform = tiny_compressor(model)
    uniform.save_pretrained(tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / CONFIG_FILE).read_text())
    meta["format_version"] = 1
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(meta))
    assert lococo.LoCoCoCompressor.from_pretrained(tmp_path / "v1").config == uniform.config
    meta["config"]["num_slots"] = BUDGETS
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 1 cannot hold"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path / "v1")

    meta["format_version"] = 2
    meta["config"]["num_slots"] = [12, 20]
    (tmp_path / "v1" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="2 per-layer budgets for a model with 3"):
        lococo.LoCoCoCompressor.from_pretrained(tmp_path / "v1")


def test_budget_file_round_trip_and_errors(tmp_path):
    budgets = Budgets((12, 20, 7), source="calibrated", details={"grid": [4, 8]})
    file = budgets.save(tmp_path / "b.json")
    assert Budgets.load(file) == budgets and Budgets.load(file).details == {"grid": [4, 8]}
    assert per_layer_slots(str(file), 3) == [12, 20, 7]
    with pytest.raises(ValueError, match="3 per-layer budgets; the model has 2"):
        per_layer_slots(file, 2)
    data = json.loads(file.read_text())
    for field, value, message in (("num_slots", [12, -1, 7], r"num_slots\[1\]"), ("total", 40, "not the sum"),
                                  ("format", "x", "not a lococo budget file"),
                                  ("format_version", 9, "format_version 9")):
        (tmp_path / "bad.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(ValueError, match=message) as info:
            Budgets.load(tmp_path / "bad.json")
        assert "bad.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no shipped budgets of that name"):
        Budgets.load("no-such-budgets")
    with pytest.raises(ValueError, match=r"num_slots\[0\]"):
        per_layer_slots([0, 4, 4], 3)


# --- allocation ----------------------------------------------------------------------------------

def test_allocate_spends_the_total_where_the_error_falls_most():
    grid = [2, 4, 8, 16]
    errors = [[1.0, 0.5, 0.25, 0.125],     # halves with every doubling
              [0.1, 0.09, 0.08, 0.07],     # nearly flat
              [4.0, 1.0, 0.2, 0.1]]        # steep
    total, floor = 24, 2
    slots = allocate(grid, errors, total, floor)
    assert sum(slots) == total and min(slots) >= floor

    def at(curve, m):  # linear between grid points
        j = max(i for i in range(len(grid) - 1) if grid[i] <= m)
        return curve[j] + (curve[j + 1] - curve[j]) * (m - grid[j]) / (grid[j + 1] - grid[j])

    def loss(alloc):
        return sum(at(curve, m) for curve, m in zip(errors, alloc))

    # the curves are convex: greedy by marginal gain is the optimum among all allocations
    best = min((a for a in itertools.product(range(floor, 17), repeat=3) if sum(a) == total), key=loss)
    assert loss(slots) == pytest.approx(loss(best))
    assert slots[1] == floor   # the flat layer keeps the floor
    with pytest.raises(ValueError, match="outside"):
        allocate(grid, errors, 100, floor)


def test_proportional_slots_follow_the_square_root_of_the_error_at_the_mean():
    grid = [4, 8, 16]
    errors = [[0.9, 0.4, 0.1], [0.2, 0.1, 0.05], [0.05, 0.025, 0.01]]   # at M = 8: 0.4, 0.1, 0.025 (ratios 16:4:1)
    slots = proportional_slots(grid, errors, 24, floor=2)
    assert sum(slots) == 24 and min(slots) >= 2
    assert slots == [12, 7, 5]   # 2 + 18 x (4, 2, 1) / 7 = 12.3, 7.1, 4.6, rounded by largest remainder to 24
    with pytest.raises(ValueError, match="floor x layers <= total"):
        proportional_slots(grid, errors, 5, floor=2)


def test_pyramid_shape_keeps_the_mean():
    slots = pyramid_slots(30, 128, floor=16)
    assert sum(slots) == 30 * 128 and slots == sorted(slots, reverse=True)
    assert slots[-1] >= 16 and slots[0] > 2 * 128 - 20


# --- generate() against the independent loop -----------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["lococo", "h2o", "tova", "streaming"])
def test_generate_with_per_layer_budgets_matches_the_loop(attn, kind):
    """A left-padded batch, chunked prefill, greedy decoding, three layers with three budgets."""
    model = three_layer_model(attn, seed=40)
    lengths = [40, 31, 9]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=41), lengths)
    compressor = tiny_compressor(model, seed=42, num_slots=BUDGETS, beta=BETA, num_local=2)
    lococo.apply_lococo(model, compressor if kind == "lococo" else None)
    if kind == "lococo":
        cache, loop = lococo.LoCoCoCache(compressor), SlotLoop(model, "lococo", BUDGETS, BETA, compressor=compressor)
    else:
        cache = lococo.build_cache(kind, model, num_slots=BUDGETS, beta=BETA, num_local=2)
        loop = SlotLoop(model, kind, BUDGETS, BETA, num_local=2)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=25, prefill_chunk_size=16,
                   **cache_kw(model, cache))
    assert cache.stored_lengths != [cache.stored_lengths[0]] * 3, "the layers must store different lengths"
    assert min(cache.compressions_per_layer) >= 2
    assert torch.equal(out.sequences, greedy_decode(loop, ids, mask, 25, chunk=16))
    assert loop.compressions == cache.compressions_per_layer


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sampling_beams_and_multi_turn_with_budgets(attn):
    model = three_layer_model(attn, seed=43)
    compressor = tiny_compressor(model, seed=44, num_slots=BUDGETS, beta=BETA)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(2, 30, seed=45)
    # beams: every row's beams equal the row searched alone
    beams = dict(num_beams=3, num_return_sequences=3, max_new_tokens=20)
    together = generate(model, ids, **beams).sequences
    for row in range(2):
        assert torch.equal(together[3 * row:3 * row + 3], generate(model, ids[row:row + 1], **beams).sequences)
    # sampling: top-1 sampling is greedy, and a seed repeats a sample
    greedy = generate(model, ids, max_new_tokens=20).sequences
    assert torch.equal(generate(model, ids, do_sample=True, top_k=1, max_new_tokens=20).sequences, greedy)
    samples = []
    for _ in range(2):
        torch.manual_seed(1)
        samples.append(generate(model, ids, do_sample=True, temperature=1.5, max_new_tokens=20).sequences)
    assert torch.equal(*samples)
    # multi-turn: the reused cache equals the loop fed the same pieces
    first = ids[:1]
    turn1 = generate(model, first, max_new_tokens=15)
    cache = get_output_cache(turn1)
    follow_up = torch.cat([turn1.sequences, random_ids(1, 9, seed=46)], 1)
    turn2 = generate(model, follow_up, max_new_tokens=15, **cache_kw(model, cache))
    loop = SlotLoop(model, "lococo", BUDGETS, BETA, compressor=compressor)
    assert torch.equal(turn1.sequences, greedy_decode(loop, first, torch.ones_like(first), 15))
    seen = turn1.sequences.shape[1] - 1
    assert torch.equal(turn2.sequences, greedy_decode(loop, follow_up, torch.ones_like(follow_up), 15, fed=seen))
    assert len(set(cache.stored_lengths)) > 1


def test_budgets_refuse_attention_that_cannot_fit_masks():
    model = three_layer_model("sdpa", seed=47)
    cache = lococo.StreamingLLMCache(3, BUDGETS, beta=BETA)
    lococo.apply_lococo(model, tiny_compressor(model, num_slots=12, rho=1.0, alpha_init=1.0))  # pure convolution
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="per-layer budgets"):
        generate(model, random_ids(1, 40, seed=48), max_new_tokens=5, **cache_kw(model, cache))


def test_build_cache_takes_budgets_in_every_form(tmp_path):
    model = three_layer_model("sdpa", seed=49)
    file = Budgets(tuple(BUDGETS)).save(tmp_path / "b.json")
    for spec in (BUDGETS, Budgets(tuple(BUDGETS)), str(file), file):
        for kind in ("h2o", "tova", "streaming"):
            assert lococo.build_cache(kind, model, num_slots=spec).num_slots == BUDGETS
    compressor = tiny_compressor(model, num_slots=BUDGETS)
    assert lococo.build_cache("h2o", model, compressor).num_slots == BUDGETS
    lococo.apply_lococo(model, compressor)
    assert lococo.build_cache("lococo", model).compressor is compressor
    with pytest.raises(ValueError, match="3 per-layer budgets; the model has 2"):
        lococo.build_cache("h2o", tiny_model("llama"), num_slots=file)


# --- the recipes: calibrate, distill and eval with budgets ---------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny byte-level Llama saved like a checkpoint, and a document of a few hundred tokens."""
    from hf_models import save_model_and_document

    root = tmp_path_factory.mktemp("budgets")
    return root, save_model_and_document(root, seed=90, words=80)


def test_calibrate_writes_budgets_that_eval_and_distill_take(saved, capsys):
    from lococo.recipes import cli

    root, doc = saved
    out = root / "calibrated"
    assert cli.main(["calibrate", "--model", str(root / "model"), "--docs", doc, "--max-tokens", "160",
                     "--grid", "8,12,16,24,32", "--mean", "12,16", "--floor", "8", "--num-local", "2", "--beta", "2",
                     "-B", "8", "--output", str(out)]) == 0
    budgets = Budgets.load(out / "budgets-m12.json")
    assert budgets.total == 2 * 12 and min(budgets.num_slots) >= 8 and budgets.source == "calibrated"
    curves = budgets.details["errors"]
    assert len(curves) == 2 and all(len(c) == 5 and c[0] > c[-1] >= 0 for c in curves)
    assert budgets.details["documents"] == [doc] and budgets.model["num_layers"] == 2
    assert (out / "budgets.png").stat().st_size > 0 and (out / "curves.csv").is_file()
    # the allocation is the marginal-gain allocation of the recorded curves
    assert list(budgets.num_slots) == allocate(budgets.details["grid"], curves, 24, 8, step=4)

    # distill trains each layer at its own M
    assert cli.main(["distill", "--output", str(root / "run"), "--model", str(root / "model"), "--docs", doc,
                     "--budgets", str(out / "budgets-m12.json"), "-B", "4", "--beta", "2", "--kernel-size", "3",
                     "--num-local", "2", "--seq-len", "64", "--sequences", "1", "--compare-every", "1",
                     "--no-progress"]) == 0
    trained = lococo.LoCoCoCompressor.from_pretrained(root / "run")
    assert trained.config.num_slots == budgets.num_slots
    assert [layer.num_fused for layer in trained.layers] == [trained.config.layer(i).num_fused for i in range(2)]

    # eval: the baselines take the budgets (those of the compressor by default) and report their bytes
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(root / "model"), "--docs", doc, "--compressor", str(root / "run"),
                     "--methods", "lococo,h2o,streaming", "--max-tokens", "96", "--buckets", "0,32,96", "-B", "8",
                     "--beta", "2", "--num-local", "2", "--bootstrap", "0", "--no-progress",
                     "--output", str(root / "eval")]) == 0
    import csv

    with open(root / "eval" / "methods.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    expected = " ".join(map(str, budgets.num_slots))
    assert all(rows[m]["slots_per_layer"] == expected for m in ("lococo", "h2o", "streaming"))
    slot_bytes = 2 * 16 * 2 * 4     # 2 KV heads, head_dim 16, K and V, float32
    assert int(rows["h2o"]["slot_kv_bytes"]) == budgets.total * slot_bytes
    assert "H2O (2 recent, compressor's budgets)" in capsys.readouterr().out
    with pytest.raises(SystemExit):   # the baselines at other budgets than LoCoCo's compressor
        cli.main(["eval", "--model", str(root / "model"), "--docs", doc, "--compressor", str(root / "run"),
                  "--budgets", "pyramid", "--output", str(root / "eval2")])
    assert cli.main(["eval", "--model", str(root / "model"), "--docs", doc, "--methods", "h2o", "-M", "12",
                     "--budgets", "pyramid", "--max-tokens", "96", "--buckets", "0,32,96", "-B", "8", "--beta", "2",
                     "--bootstrap", "0", "--no-progress", "--output", str(root / "eval3")]) == 0
    with open(root / "eval3" / "methods.csv") as handle:
        row = next(csv.DictReader(handle))
    assert row["budgets"] == "PyramidKV" and sum(map(int, row["slots_per_layer"].split())) == 24


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_calibrated_budgets_load_in_build_cache_for_each_family(arch, tmp_path):
    import argparse

    from lococo.recipes import calibrate

    model = tiny_model(arch, "sdpa", seed=92, num_hidden_layers=3)
    args = argparse.Namespace(method="h2o", grid=[8, 12, 16, 24], beta=2, num_local=2, chunk_size=8)
    docs = [("random", random_ids(1, 120, seed=93)[0].tolist())]
    errors = calibrate.measure_curves(args, model, docs)
    assert len(errors) == 3 and all(curve[0] >= curve[-1] for curve in errors)
    file = Budgets(tuple(allocate(args.grid, errors, 3 * 12, 8)), source="calibrated").save(tmp_path / "b.json")
    lococo.apply_lococo(model)
    cache = lococo.build_cache("h2o", model, num_slots=file, beta=2, num_local=2)
    assert cache.num_slots == list(Budgets.load(file).num_slots)
    ids = random_ids(2, 40, seed=94)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    out = generate(model, ids, attention_mask=mask, max_new_tokens=8, **cache_kw(model, cache))
    assert out.sequences.shape == (2, 48) and cache.num_compressions >= 1


def test_cache_implementation_after_apply_lococo_works_or_is_refused():
    model = three_layer_model("sdpa", seed=95)
    compressor = tiny_compressor(model, seed=96, num_slots=BUDGETS, beta=BETA)
    lococo.apply_lococo(model, compressor)
    ids = random_ids(1, 40, seed=97)
    want = generate(model, ids, max_new_tokens=10)
    got = generate(model, ids, max_new_tokens=10, cache_implementation="lococo")
    assert torch.equal(got.sequences, want.sequences) and isinstance(get_output_cache(got), lococo.LoCoCoCache)
    for implementation in ("static", "dynamic", "offloaded"):
        with pytest.raises(ValueError, match=f"cache_implementation='{implementation}'.*without LoCoCo"):
            generate(model, ids, max_new_tokens=3, cache_implementation=implementation)
    model.generation_config.cache_implementation = "static"
    with pytest.raises(ValueError, match="it comes from model.generation_config"):
        generate(model, ids, max_new_tokens=3)
    model.generation_config.cache_implementation = None
    lococo.apply_lococo(model)   # no compressor: "lococo" has nothing to build from
    with pytest.raises(ValueError, match="needs a compressor"):
        generate(model, ids, max_new_tokens=3, cache_implementation="lococo")


def test_calibrate_measures_with_quantized_slots_and_reallocates_from_curves(saved, capsys):
    from lococo.recipes import cli

    root, doc = saved
    out = root / "calibrated-int8"
    assert cli.main(["calibrate", "--model", str(root / "model"), "--docs", doc, "--max-tokens", "160",
                     "--grid", "8,12,16,24,32", "--mean", "12", "--floor", "8", "--num-local", "2", "--beta", "2",
                     "-B", "8", "--kv-bits", "8", "--kv-group", "8", "--output", str(out)]) == 0
    measured = Budgets.load(out / "budgets-m12.json")
    assert measured.details["kv_storage"] == "int8, groups of 8"
    assert measured.details["name"].endswith("-h2o-int8-m12")
    # --curves: nothing measured, the same curves allocated at other means, the settings of the file kept
    again = root / "reallocated"
    assert cli.main(["calibrate", "--model", str(root / "model"), "--curves", str(out / "budgets-m12.json"),
                     "--mean", "12,20", "--floor", "8", "--output", str(again)]) == 0
    for mean in (12, 20):
        budgets = Budgets.load(again / f"budgets-m{mean}.json")
        assert budgets.details["errors"] == measured.details["errors"]
        assert budgets.details["kv_storage"] == "int8, groups of 8" and budgets.details["num_local"] == 2
        assert list(budgets.num_slots) == allocate(measured.details["grid"], measured.details["errors"], 2 * mean, 8,
                                                   step=4)
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--curves", str(out / "budgets-m12.json"), "--kv-bits", "4", "--output",
                  str(root / "bad")])
    assert "--curves allocates from curves already measured" in capsys.readouterr().err
