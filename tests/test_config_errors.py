"""A compressor folder that is wrong in any field fails naming the file and the field; caches that do
not fit the model fail with a clear error before they compute anything wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import lococo
from lococo.compressor import CONFIG_FILE, WEIGHTS_FILE, read_compressor_config

from hf_models import cache_kw, random_ids, tiny_compressor, tiny_model

SHIPPED = Path(lococo.__file__).resolve().parent / "pretrained" / "smollm2-135m-m128"


@pytest.fixture
def saved(tmp_path) -> Path:
    folder = tmp_path / "compressor"
    tiny_compressor(tiny_model()).save_pretrained(folder)
    return folder


def edit_config(folder: Path, edit) -> Path:
    meta = json.loads((folder / CONFIG_FILE).read_text())
    edit(meta)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    return folder / CONFIG_FILE


@pytest.mark.parametrize("field", ["beta", "num_local", "chunk_size"])
def test_a_missing_field_is_an_error_not_a_default(saved, field):
    file = edit_config(saved, lambda meta: meta["config"].pop(field))
    with pytest.raises(ValueError, match=rf"{file}: field config\.{field} missing"):
        lococo.LoCoCoCompressor.from_pretrained(saved)


@pytest.mark.parametrize("section, field, value, message", [
    ("config", "rho", "0.5", "config: rho must be a number, got '0.5'"),
    ("config", "beta", 2.5, "config: beta must be an int, got 2.5"),
    ("config", "init_std", True, "config: init_std must be a number, got True"),
    ("model", "head_dim", 16.5, "model.head_dim must be a positive integer, got 16.5"),
    ("model", "num_layers", 0, "model.num_layers must be a positive integer, got 0"),
    ("model", "model_type", 3, "model.model_type must be a string, got 3"),
])
def test_a_wrong_type_names_the_file_and_the_field(saved, section, field, value, message):
    file = edit_config(saved, lambda meta: meta[section].__setitem__(field, value))
    with pytest.raises(ValueError) as info:
        lococo.LoCoCoCompressor.from_pretrained(saved)
    assert str(info.value) == f"{file}: {message}"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object with format_version, config and model, got a list"),
])
def test_a_file_that_is_not_a_config_object_names_the_file(saved, text, message):
    (saved / CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        lococo.LoCoCoCompressor.from_pretrained(saved)
    assert str(info.value).startswith(str(saved / CONFIG_FILE))


@pytest.mark.parametrize("key", ["config", "model"])
def test_a_missing_section_names_it(saved, key):
    file = edit_config(saved, lambda meta: meta.pop(key))
    with pytest.raises(ValueError, match=rf"{file}: field {key} is missing or not a JSON object"):
        lococo.LoCoCoCompressor.from_pretrained(saved)


def test_nan_weights_are_refused(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / WEIGHTS_FILE))
    state["layers.1.weight"][0, 0, 0] = float("nan")
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"layers\.1\.weight holds NaN or infinite values"):
        lococo.LoCoCoCompressor.from_pretrained(saved)


def test_the_shipped_config_loads():
    config, geometry = read_compressor_config(SHIPPED)
    assert (config.num_slots, config.beta, config.chunk_size, geometry.num_layers) == (128, 16, 128, 30)
    assert (config.num_local, config.slot_bias) == (16, True)


# the config of the first shipped compressor, as lococo 0.1.0 wrote it: "num_heavy": null and no slot_bias
FIRST_RELEASE_CONFIG = {
    "format_version": 1, "lococo_version": "0.1.0+cu130",
    "config": {"num_slots": 128, "rho": 0.5, "num_heavy": None, "beta": 16, "kernel_size": 21, "num_local": 0,
               "alpha_init": 0.5, "init_std": 1.0, "chunk_size": 128},
    "model": {"model_type": "llama", "num_layers": 30, "head_dim": 64, "num_kv_heads": 3}}


def test_a_config_of_the_first_release_still_loads(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps(FIRST_RELEASE_CONFIG))
    config, geometry = read_compressor_config(tmp_path)
    assert (config.num_heavy, config.num_fused, config.num_local, config.slot_bias) == (64, 64, 0, False)
    assert geometry.num_layers == 30


def test_one_geometry_message_for_both_checks(saved):
    other = tiny_model(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"was built for llama with 2 layers and head_dim 16; the model \(llama\) "
                                         r"differs: 2 decoder layers vs 3") as loaded:
        lococo.LoCoCoCompressor.from_pretrained(saved, model=other)
    with pytest.raises(ValueError) as checked:
        lococo.LoCoCoCompressor.from_pretrained(saved).check_model(other)
    assert str(loaded.value).split(" was built")[1] == str(checked.value).split(" was built")[1]


def test_a_cache_for_fewer_layers_says_so():
    cache = lococo.LoCoCoCache(tiny_compressor(tiny_model()))          # 2 layers
    bigger = tiny_model(num_hidden_layers=3)
    with pytest.raises(ValueError, match="LoCoCoCache has 2 layers .* asked to store layer 2"):
        bigger(random_ids(1, 8, 0), **cache_kw(bigger, cache))


def test_a_cache_for_another_head_dim_fails_at_the_first_update():
    cache = lococo.LoCoCoCache(tiny_compressor(tiny_model()))          # head_dim 16
    other = tiny_model(hidden_size=32, intermediate_size=64)            # head_dim 8
    with pytest.raises(ValueError, match="head_dim 8 and 8, this layer's compressor was built for head_dim 16"):
        other(random_ids(1, 4, 0), **cache_kw(other, cache))          # 4 tokens: long before any compression


def test_a_config_given_as_a_list_names_the_problem():
    with pytest.raises(ValueError, match="expected a dict of fields, got list"):
        lococo.LoCoCoConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="rho must be a number"):
        lococo.LoCoCoConfig(rho="0.5")
    lococo.LoCoCoConfig(rho=1)  # an int is a number


def test_one_name_each_for_heavy_hitters_and_fused_slots(saved):
    config = lococo.LoCoCoConfig(num_slots=16, num_heavy=4)
    assert (config.num_heavy, config.num_fused, config.rho) == (4, 12, 0.75)
    assert lococo.LoCoCoConfig.from_dict(config.to_dict()) == config
    with pytest.warns(DeprecationWarning, match="use num_fused"):
        assert config.fused_slots == 12
    with pytest.warns(DeprecationWarning, match="use num_heavy"):
        assert config.heavy_slots == 4
    # files written before the rename carry num_heavy (null unless H was given): they still load
    edit_config(saved, lambda meta: meta["config"].update(num_heavy=None))
    assert lococo.LoCoCoCompressor.from_pretrained(saved).config.num_heavy == 6       # M = 12, rho = 0.5
    edit_config(saved, lambda meta: meta["config"].update(num_heavy=6))
    assert lococo.LoCoCoCompressor.from_pretrained(saved).config.num_fused == 6


def test_a_cache_for_more_layers_says_so():
    """A 3-layer cache under a 2-layer model: refused at the first forward of a patched model, else at the second."""
    cache = lococo.StreamingLLMCache(3, num_slots=12)
    model = tiny_model()
    with torch.no_grad():
        model(random_ids(1, 8, 0), **cache_kw(model, cache))
        with pytest.raises(ValueError, match="StreamingLLMCache has 3 layers but the model's forward stored only 2"):
            model(random_ids(1, 1, 1), **cache_kw(model, cache))
        lococo.apply_lococo(model)
        with pytest.raises(ValueError, match=r"H2OCache has 3 layers, the model \(llama\) 2"):
            model(random_ids(1, 8, 0), **cache_kw(model, lococo.H2OCache(3, num_slots=12)))


def test_a_cache_for_other_kv_heads_says_so():
    cache = lococo.build_cache("streaming", tiny_model(), num_slots=12)        # 2 KV heads
    other = tiny_model(num_key_value_heads=4)
    with pytest.raises(ValueError, match="built for 2 KV heads, but layer 0 stores keys with 4"):
        other(random_ids(1, 4, 0), **cache_kw(other, cache))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:40])


def as_int32(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({name: t.to(torch.int32) for name, t in load_file(str(file)).items()}, str(file))


@pytest.mark.parametrize("damage, message", [(truncate, "not a readable safetensors file"),
                                             (as_int32, "not a floating-point dtype")])
def test_a_damaged_weights_file_is_named_before_any_model_loads(saved, damage, message):
    damage(saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=message) as info:
        read_compressor_config(saved)           # what eval, demo and distill check before the model loads
    assert WEIGHTS_FILE in str(info.value)
    with pytest.raises(ValueError, match=message):
        lococo.LoCoCoCompressor.from_pretrained(saved)


def test_an_absurd_number_of_slots_is_refused_naming_the_field(saved):
    edit_config(saved, lambda meta: meta["config"].update(num_slots=10**18))
    with pytest.raises(ValueError, match=r"config: num_slots \(M\) must be in \[1, 1048576\]") as info:
        read_compressor_config(saved)
    assert CONFIG_FILE in str(info.value)
