"""Quantized slots: the codes, their bytes, every cache kind against the independent loop, training, errors."""

from __future__ import annotations

import csv

import pytest
import torch
from slot_loop import SlotLoop, greedy_decode, left_padded

import lococo
from lococo import SlotQuantization
from lococo.hf.caches import kv_bytes
from lococo.quantization import QuantizedTensor

from hf_models import cache_kw, random_ids, save_model_and_document, tiny_compressor, tiny_model

SPECS = [SlotQuantization(8), SlotQuantization(4), SlotQuantization(8, format="fp8"),
         SlotQuantization(4, group_size=8, key_axis="channel"), SlotQuantization(8, group_size=16)]
TOP = {"int": lambda bits: 2 ** (bits - 1) - 1, "fp8": lambda bits: 448.0}


def rounded_groups(x: torch.Tensor, spec: SlotQuantization) -> torch.Tensor:
    """x [..., n] rounded in groups of the last dimension, written out plainly (no packing)."""
    top = TOP[spec.format](spec.bits)
    g = x.float().reshape(*x.shape[:-1], -1, spec.group_size)
    scale = (g.abs().amax(-1, keepdim=True) / top).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.format == "fp8":
        q = (g / safe).to(torch.float8_e4m3fn).float()
    else:
        q = (g / safe).round().clamp(-top, top)
    return (q * scale).reshape(x.shape).to(x.dtype)


def rounded(keys: torch.Tensor, values: torch.Tensor, spec: SlotQuantization):
    """Keys and values [b, h, M, d] as ``spec`` stores them: keys per token or per channel (groups of slots)."""
    if spec.key_axis == "channel":
        t = keys.transpose(-1, -2)
        t = torch.nn.functional.pad(t, (0, -t.shape[-1] % spec.group_size))
        k = rounded_groups(t, spec)[..., : keys.shape[-2]].transpose(-1, -2)
    else:
        k = rounded_groups(keys, spec)
    return k, rounded_groups(values, spec)


# --- the codes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (2, 3, 37, 64), (3, 2, 5, 128)])
def test_codes_give_back_the_plainly_rounded_values(spec, dtype, shape):
    gen = torch.Generator().manual_seed(hash((spec, str(dtype), shape)) % 2**31)
    x = (torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 5).to(dtype)
    x[..., 0, :] = 0     # an all-zero entry: scale 0, codes 0
    strided = torch.stack([x, -x], dim=-1)[..., 0]   # non-contiguous, same values
    assert not strided.is_contiguous()
    for keys in (True, False):
        got = spec.quantize(strided, keys).dequantize()
        want_k, want_v = rounded(x, x, spec)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, want_k if keys else want_v, rtol=0, atol=0)
        assert torch.all(got[..., 0, :] == 0)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.format == "int"], ids=lambda s: s.label())
def test_integer_codes_lie_within_half_a_step(spec):
    x = torch.randn(4, 2, 33, 64, generator=torch.Generator().manual_seed(3))
    step = x.reshape(4, 2, 33, -1, spec.group_size).abs().amax(-1) / TOP["int"](spec.bits)
    err = (spec.quantize(x, keys=False).dequantize() - x).reshape(4, 2, 33, -1, spec.group_size).abs().amax(-1)
    assert torch.all(err <= step * 0.5 * (1 + 2e-3) + 1e-7)   # the scale is rounded to fp16


def test_4bit_codes_are_packed_two_a_byte_first_value_low():
    spec = SlotQuantization(4, group_size=4)
    x = torch.tensor([[-7.0, -1.0, 0.0, 7.0, 3.0, 2.0, 1.0, -3.0]])   # second group: scale 3/7, codes 7 5 2 -7
    q = spec.quantize(x.view(1, 1, 1, 8), keys=False)
    assert q.codes.dtype == torch.uint8 and q.codes.shape[-1] == 4 and q.scales.dtype == torch.float16
    assert q.codes.flatten().tolist() == [(-7 + 8) | ((-1 + 8) << 4), 8 | (15 << 4), 15 | (13 << 4), 10 | (1 << 4)]
    assert q.nbytes() == 4 + 2 * 2


@pytest.mark.parametrize("spec", [SlotQuantization(8), SlotQuantization(4), SlotQuantization(8, format="fp8")],
                         ids=lambda s: s.label())
def test_requantizing_kept_slots_changes_nothing(spec):
    """Token groups: a slot kept by a later compression is stored again exactly as it was."""
    x = torch.randn(2, 3, 20, 64, generator=torch.Generator().manual_seed(5))
    once = spec.quantize(x, keys=True).dequantize()
    torch.testing.assert_close(spec.quantize(once, keys=True).dequantize(), once, rtol=0, atol=0)


def test_quantization_settings_are_checked_and_named():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        SlotQuantization(3)
    with pytest.raises(ValueError, match="fp8 format has 8 bits"):
        SlotQuantization(4, format="fp8")
    with pytest.raises(ValueError, match="group_size must be even"):
        SlotQuantization(4, group_size=5)
    with pytest.raises(ValueError, match="key_axis"):
        SlotQuantization(8, key_axis="head")
    with pytest.raises(ValueError, match="group_size 48 does not divide the head dimension 64"):
        SlotQuantization(8, group_size=48).check(64)
    with pytest.raises(ValueError, match="quantization must be 16, 8, 4"):
        SlotQuantization.of(2)
    assert SlotQuantization.of(16) is None and SlotQuantization.of(4) == SlotQuantization(4, 32)
    with pytest.raises(ValueError, match="group_size 32 does not divide the head dimension 16"):
        lococo.build_cache("h2o", tiny_model(), num_slots=8, quantization=4)
    with pytest.raises(ValueError, match="applies to the fixed-slot caches"):
        lococo.build_cache("full", tiny_model(), quantization=8)
    with pytest.raises(ValueError, match="LoCoCoConfig: quantization must be"):
        lococo.LoCoCoConfig(quantization="int4")


# --- caches ----------------------------------------------------------------------------------------

def _filled_layer(spec, seed: int = 0, rows: int = 3):
    from lococo.hf.caches.baselines import H2OLayer

    layer = H2OLayer(24, beta=4, num_local=2, quantization=spec)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        k, v = torch.randn(rows, 2, 16, 16, generator=gen), torch.randn(rows, 2, 16, 16, generator=gen)
        layer.update(k, v)
        layer.record_scores(torch.rand(rows, 2, layer.stored_length, generator=gen))
    return layer


@pytest.mark.parametrize("spec", [SlotQuantization(8, group_size=16), SlotQuantization(4, group_size=8),
                                  SlotQuantization(4, group_size=8, key_axis="channel")], ids=lambda s: s.label())
def test_bytes_are_those_of_the_codes_and_scales(spec):
    layer = _filled_layer(spec)
    assert layer.num_compressions >= 1
    recent = layer.keys.shape[-2]
    slots = layer.stored_length - recent
    assert slots == 24
    expected = round(3 * 2 * slots * spec.entry_bytes(16)) + 2 * 3 * 2 * recent * 16 * 4
    assert kv_bytes(type("C", (), {"layers": [layer]})()) == expected
    float_layer = _filled_layer(None)
    assert layer.entries()[0].shape == float_layer.entries()[0].shape


def test_rows_reorder_and_select_with_their_codes():
    layer = _filled_layer(SlotQuantization(4, group_size=8), seed=1)
    keys, values = layer.entries()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    torch.testing.assert_close(layer.entries()[0], keys[[2, 0, 1]], rtol=0, atol=0)
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.entries()[1], values[[0]], rtol=0, atol=0)
    layer.batch_repeat_interleave(2)
    assert layer.entries()[0].shape[0] == 2 and layer.valid_len.shape == (2,)


BUDGETS = [12, 20, 7]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind,spec", [
    ("h2o", SlotQuantization(4, group_size=8)),
    ("tova", SlotQuantization(8, group_size=16)),
    ("streaming", SlotQuantization(8, group_size=8, format="fp8")),
    ("lococo", SlotQuantization(4, group_size=4, key_axis="channel")),
    ("h2o", SlotQuantization(4, group_size=8, key_axis="channel")),
], ids=lambda v: v if isinstance(v, str) else v.label().replace(" ", ""))
def test_generate_with_quantized_slots_matches_the_loop(attn, kind, spec, monkeypatch):
    """Left-padded batch, chunked prefill, greedy decoding, per-layer budgets; the loop rounds its slots plainly.

    The lococo attention reads the packed slots 8 at a time (quantized_attention.py), never a dequantized copy.
    """
    from lococo.hf import quantized_attention

    reads = count_block_reads(monkeypatch, block=8)
    model = tiny_model("llama", attn, seed=60, num_hidden_layers=3)
    lengths = [40, 31, 9]
    ids, mask = left_padded(random_ids(len(lengths), max(lengths), seed=61), lengths)
    compressor = tiny_compressor(model, seed=62, num_slots=BUDGETS, beta=3, num_local=2, quantization=spec)
    lococo.apply_lococo(model, compressor if kind == "lococo" else None)
    if kind == "lococo":
        cache = lococo.LoCoCoCache(compressor)
    else:
        cache = lococo.build_cache(kind, model, num_slots=BUDGETS, beta=3, num_local=2, quantization=spec)
    assert all(layer.quantization == spec for layer in cache.layers)
    loop = SlotLoop(model, kind, BUDGETS, 3, num_local=2, compressor=compressor,
                    round_slots=lambda k, v: rounded(k, v, spec))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=25, prefill_chunk_size=16, do_sample=False,
                             return_dict_in_generate=True, **cache_kw(model, cache))
    assert min(cache.compressions_per_layer) >= 2
    assert reads["calls"] > 0 and reads["blocks"] > reads["calls"] and quantized_attention.SLOT_BLOCK == 8
    assert torch.equal(out.sequences, greedy_decode(loop, ids, mask, 25, chunk=16))
    for i, layer in enumerate(cache.layers):   # the stored slots are the loop's
        keys, _ = layer.entries()
        for row, n in enumerate(layer.valid_len.tolist()):
            want_k, _ = loop.valid_entries(i, row)
            got_k = keys[row, :, keys.shape[-2] - n:]
            if kind != "lococo":   # selected entries: bit for bit
                torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
                continue
            # fused slots come from float32 (op) and float64 (loop) arithmetic: a value at a rounding
            # boundary may land one step apart, rarely
            off = (got_k - want_k).abs() > 1e-5
            assert off.float().mean() < 0.05
            assert torch.all((got_k - want_k).abs() <= want_k.abs().amax() / 7 * 1.01)


def count_block_reads(monkeypatch, block: int) -> dict:
    """Counts the calls of the blocked attention and the slot blocks they dequantize, with ``block`` slots a block."""
    from lococo.hf import quantized_attention

    reads = {"calls": 0, "blocks": 0}
    monkeypatch.setattr(quantized_attention, "SLOT_BLOCK", block)
    plain_call, plain_blocks = quantized_attention.attention_over_slots, quantized_attention._blocks

    def call(*args, **kwargs):
        reads["calls"] += 1
        return plain_call(*args, **kwargs)

    def blocks(*args):
        for item in plain_blocks(*args):
            reads["blocks"] += 1
            yield item

    monkeypatch.setattr(quantized_attention, "attention_over_slots", call)
    monkeypatch.setattr(quantized_attention, "_blocks", blocks)
    return reads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blocked_reading_equals_the_dequantized_copy_and_other_attention_gets_the_copy(attn, monkeypatch):
    """Logits of the same prompt: blocks of 3 slots (lococo attention), and the model's own attention (no
    apply_lococo: StreamingLLM needs no scores), which must get every entry dequantized."""
    ids = random_ids(2, 70, seed=65)
    spec = SlotQuantization(4, group_size=8)

    def logits(patched: bool):
        model = tiny_model("llama", attn, seed=66)
        if patched:
            lococo.apply_lococo(model)
        cache = lococo.build_cache("streaming", model, num_slots=20, beta=3, quantization=spec)
        with torch.no_grad():
            out = [model(ids[:, s:s + 10], **cache_kw(model, cache)).logits for s in range(0, 70, 10)]
        assert cache.num_compressions >= 3
        return torch.cat(out, 1)

    reads = count_block_reads(monkeypatch, block=3)
    plain = logits(patched=False)
    assert reads["calls"] == 0
    blocked = logits(patched=True)
    assert reads["calls"] > 0 and reads["blocks"] > 3 * reads["calls"]
    torch.testing.assert_close(blocked, plain, rtol=1e-4, atol=1e-4)


def test_beams_and_sampling_run_on_quantized_slots():
    model = tiny_model("llama", "sdpa", seed=63)
    lococo.apply_lococo(model)
    ids = random_ids(2, 30, seed=64)
    for kwargs in ({"num_beams": 3}, {"do_sample": True, "top_k": 5}):
        cache = lococo.build_cache("h2o", model, num_slots=8, beta=2, quantization=SlotQuantization(4, 8))
        torch.manual_seed(0)
        out = model.generate(ids, max_new_tokens=20, **kwargs, **cache_kw(model, cache))
        assert out.shape == (2, 50) and cache.num_compressions >= 2


# --- LoCoCo: the config carries the storage; distill trains through it ------------------------------

def test_the_compressor_config_carries_the_storage(tmp_path):
    model = tiny_model()
    compressor = tiny_compressor(model, seed=1, num_slots=8, quantization=SlotQuantization(4, 8))
    compressor.save_pretrained(tmp_path / "c")
    loaded = lococo.LoCoCoCompressor.from_pretrained(tmp_path / "c")
    assert loaded.config.quantization == SlotQuantization(4, 8)
    assert all(layer.quantization == SlotQuantization(4, 8) for layer in lococo.LoCoCoCache(loaded).layers)
    assert all(layer.quantization is None for layer in lococo.build_cache("lococo", model, loaded,
                                                                          quantization=16).layers)
    # baselines built beside the compressor store their slots as it does (the same memory)
    assert lococo.build_cache("h2o", model, loaded).layers[0].quantization == SlotQuantization(4, 8)
    old = lococo.LoCoCoConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization"})
    assert old.quantization is None


def test_slots_rounded_in_training_pass_gradients_straight_through():
    from lococo.hf.caches import LoCoCoLayer

    model = tiny_model()
    spec = SlotQuantization(4, group_size=8)
    compressor = tiny_compressor(model, seed=2, num_slots=8, beta=2, quantization=spec)
    layer = LoCoCoLayer(compressor.layers[0], compressor.config.layer(0), needs_scores=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        layer.update(torch.randn(1, 2, 6, 16, generator=gen), torch.randn(1, 2, 6, 16, generator=gen))
    keys, values = layer.entries()
    assert keys.requires_grad and layer.num_compressions >= 1
    slots_k, slots_v = layer.storage.slots
    assert not isinstance(slots_k, QuantizedTensor)   # kept as rounded tensors while gradients flow
    want_k, want_v = rounded(slots_k.detach(), slots_v.detach(), spec)
    torch.testing.assert_close(slots_k.detach(), want_k, rtol=0, atol=0)
    (keys.sum() + values.square().sum()).backward()
    grads = [p.grad for p in compressor.layers[0].parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        frozen = LoCoCoLayer(compressor.layers[0], compressor.config.layer(0), needs_scores=False)
        for _ in range(3):
            frozen.update(torch.randn(1, 2, 6, 16, generator=gen), torch.randn(1, 2, 6, 16, generator=gen))
    assert isinstance(frozen.storage.slots[0], QuantizedTensor)   # at inference: packed codes


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return root, save_model_and_document(root, seed=91, words=80)


def test_eval_and_distill_take_kv_bits(saved, capsys):
    from lococo.recipes import cli

    root, doc = saved
    common = ["--model", str(root / "model"), "--docs", doc, "--max-tokens", "96", "--buckets", "0,32,96", "-B", "8",
              "--beta", "2", "--num-local", "2", "--bootstrap", "0", "--no-progress", "-M", "12"]
    assert cli.main(["eval", *common, "--methods", "full,h2o,streaming", "--kv-bits", "4", "--kv-group", "8",
                     "--output", str(root / "eval")]) == 0
    with open(root / "eval" / "methods.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["h2o"]["kv_storage"] == "int4, groups of 8" and rows["full"]["kv_storage"] == ""
    per_slot = 2 * 2 * 2 * (16 // 2 + 16 // 8 * 2)    # 2 layers x 2 KV heads x K and V: codes and fp16 scales
    assert int(rows["h2o"]["slot_kv_bytes"]) == int(rows["h2o"]["slot_kv_bytes_bf16"]) == 12 * per_slot
    assert "H2O (2 recent, int4, groups of 8)" in capsys.readouterr().out

    assert cli.main(["distill", "--output", str(root / "run"), "--model", str(root / "model"), "--docs", doc,
                     "-M", "12", "-B", "4", "--beta", "2", "--kernel-size", "3", "--num-local", "2", "--seq-len", "64",
                     "--sequences", "1", "--compare-every", "1", "--kv-bits", "8", "--kv-group", "8",
                     "--no-progress"]) == 0
    trained = lococo.LoCoCoCompressor.from_pretrained(root / "run")
    assert trained.config.quantization == SlotQuantization(8, 8)
    assert cli.main(["eval", *common, "--compressor", str(root / "run"), "--methods", "lococo,h2o",
                     "--output", str(root / "eval2")]) == 0
    with open(root / "eval2" / "methods.csv") as handle:
        assert {row["kv_storage"] for row in csv.DictReader(handle)} == {"int8, groups of 8"}


@pytest.mark.parametrize("flags,message", [
    (["--kv-bits", "8", "--kv-group", "48"], "--kv-group: quantization group_size 48 does not divide"),
    (["--kv-group", "8"], "--kv-group set how quantized slots are stored: give --kv-bits 8 or 4"),
    (["--kv-bits", "4", "--kv-format", "fp8"], "--kv-bits 4: the fp8 format has 8 bits"),
])
def test_eval_refuses_storage_that_cannot_work(saved, flags, message, capsys):
    from lococo.recipes import cli

    root, doc = saved
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--model", str(root / "model"), "--docs", doc, "--methods", "h2o", *flags,
                  "--output", str(root / "bad")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("spec", [SlotQuantization(4, group_size=8),
                                  SlotQuantization(8, group_size=4, key_axis="channel")], ids=lambda s: s.label())
@pytest.mark.parametrize("last_query", [False, True])
def test_blocked_attention_equals_attention_over_the_dequantized_entries(spec, last_query, monkeypatch):
    """Random masks (some queries see no key), slot logits, GQA, odd sizes, blocks of 5 slots (channel: 4)."""
    from types import SimpleNamespace

    from lococo.hf import quantized_attention
    from lococo.hf.attention import _grouped_allowed, biased_attention

    monkeypatch.setattr(quantized_attention, "SLOT_BLOCK", 5)
    gen = torch.Generator().manual_seed(7)
    b, kvh, groups, q, d, slots, recent = 3, 2, 3, 4, 16, 23, 6
    query = torch.randn(b, kvh * groups, q, d, generator=gen)
    keys, values = torch.randn(b, kvh, slots, d, generator=gen), torch.randn(b, kvh, slots, d, generator=gen)
    packed = spec.quantize(keys, keys=True), spec.quantize(values, keys=False)
    rk, rv = torch.randn(b, kvh, recent, d, generator=gen), torch.randn(b, kvh, recent, d, generator=gen)
    mask = torch.rand(b, 1, q, slots + recent, generator=gen) > 0.3
    mask[0, :, 1] = False                               # a query that sees no key
    bias = torch.randn(b, kvh, slots + 2, generator=gen)
    allowed = _grouped_allowed(mask, q, slots + recent, kvh, groups, query.device)
    got, scores = quantized_attention.attention_over_slots(query, packed, rk, rv, allowed, bias, 0.3, True, last_query)
    full_k = torch.cat([packed[0].dequantize(), rk], -2)
    full_v = torch.cat([packed[1].dequantize(), rv], -2)
    want, probs, want_scores = biased_attention(SimpleNamespace(training=False), query, full_k, full_v, mask, bias,
                                                scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[0, 1] == 0)
    if last_query:
        want_scores = probs[:, :, -1].reshape(b, kvh, groups, -1).sum(2)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_slots_on_cuda_match_the_cpu():
    """The codes, the blocked attention and an H2O decode on the GPU against the same on the CPU (float32: in
    bf16 a value at a rounding boundary may take the other code on the other device)."""
    model = tiny_model("llama", "sdpa", seed=67)
    lococo.apply_lococo(model)
    ids = random_ids(2, 60, seed=68)
    logits = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        cache = lococo.build_cache("h2o", model, num_slots=12, beta=3, quantization=SlotQuantization(4, 8))
        with torch.no_grad():
            logits[device] = torch.cat([model(ids[:, s:s + 6].to(device), **cache_kw(model, cache)).logits.float().cpu()
                                        for s in range(0, 60, 6)], 1)
        assert cache.num_compressions >= 5
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)
