"""`lococo calibrate --error loss`: the loss's gradient with respect to each layer's attention output, and the
replay's error weighted by it.

The gradient is checked against central finite differences of the model's own loss (the transformers module
and its logits, not our blocked head), with the layer's attention output moved along a random direction; the
replay's weighted error against the same sum recomputed from the replayed attention outputs.
"""

from __future__ import annotations

import pytest
import torch
from test_sliding_layers import gemma3

from lococo.recipes import calibrate
from lococo.recipes.replay import CAPTURE, attention_output_gradients, register_capture, replay, teacher_records

from hf_models import random_ids, spy_attention_outputs, tiny_model


def _model_loss(model, ids) -> float:
    """Summed next-token NLL of ids, from the model's own forward (logit soft-capping included)."""
    with torch.no_grad():
        logits = model(ids).logits.double()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))


def _shifted_loss(model, ids, index, direction, eps) -> float:
    """The loss with layer ``index``'s attention output moved by eps * direction."""
    def shift(module, args, output):
        return (output[0] + eps * direction, *output[1:])

    hook = model.model.layers[index].self_attn.register_forward_hook(shift)
    try:
        return _model_loss(model, ids)
    finally:
        hook.remove()


@pytest.mark.parametrize("make, layers", [
    (lambda: tiny_model("llama", "sdpa", seed=130), [0, 1]),
    (lambda: gemma3("sdpa", seed=131, final_logit_softcapping=5.0), [1, 2, 4]),   # windowed and full layers
])
def test_gradients_match_finite_differences_of_the_models_loss(make, layers):
    model = make().double()
    ids = random_ids(1, 37, seed=132) % model.config.vocab_size
    grads = attention_output_gradients(model, ids, block_size=10)   # blocks that do not divide T - 1
    assert sorted(grads) == list(range(model.config.num_hidden_layers))
    assert all(p.requires_grad for p in model.parameters())         # left as they were
    assert all(p.grad is None for p in model.parameters())          # no parameter gradients computed
    gen = torch.Generator().manual_seed(133)
    for index in layers:
        g = grads[index]
        assert g.shape == (1, 37, model.config.hidden_size) and g.dtype == torch.float32
        direction = torch.randn(g.shape, generator=gen, dtype=torch.float64)
        eps = 1e-4
        numeric = (_shifted_loss(model, ids, index, direction, eps)
                   - _shifted_loss(model, ids, index, direction, -eps)) / (2 * eps)
        analytic = float((g.double() * direction).sum())
        assert abs(analytic) > 1e-3
        assert analytic == pytest.approx(numeric, rel=1e-3)


def test_replay_weights_each_tokens_error_by_the_gradient(monkeypatch):
    model = tiny_model("llama", "sdpa", seed=134)
    ids = random_ids(1, 48, seed=135)
    grads = attention_output_gradients(model, ids)
    register_capture()
    model.set_attn_implementation(CAPTURE)
    records = teacher_records(model, ids)
    index, chunk = 1, 5
    attn = model.model.layers[index].self_attn
    query, _, _, target = records[index]
    b, heads, total, d = query.shape
    w_o = attn.o_proj.weight.detach()
    reference = target.reshape(b, total, heads * d) @ w_o.T

    outputs = spy_attention_outputs(monkeypatch)
    args = type("Args", (), {"beta": 2, "num_local": 2})()
    with torch.no_grad():
        result = replay(calibrate.cache_layer("h2o", 12, args), records[index], attn, chunk, gradient=grads[index])
    starts = range(0, total, chunk)
    assert len(outputs) == len(starts) and 0 < result.compressed_chunks < len(starts)
    expected = 0.0
    for start, out in list(zip(starts, outputs))[len(starts) - result.compressed_chunks:]:
        stop = min(total, start + chunk)
        got = out.reshape(b, stop - start, heads * d) @ w_o.T
        expected += float(((got - reference[:, start:stop]) * grads[index][:, start:stop]).sum(-1).pow(2).sum())
    assert expected > 1e-8
    assert result.error_sum == pytest.approx(expected, rel=1e-4)


def test_calibrate_with_the_loss_error_through_the_command_line(tmp_path, capsys):
    from lococo.budgets import Budgets, allocate
    from lococo.recipes import cli

    from hf_models import save_model_and_document

    doc = save_model_and_document(tmp_path, seed=136, words=80)
    out = tmp_path / "calibrated"
    assert cli.main(["calibrate", "--model", str(tmp_path / "model"), "--docs", doc, "--max-tokens", "160",
                     "--grid", "8,12,16,24", "--mean", "12", "--floor", "8", "--num-local", "2", "--beta", "2",
                     "--chunk-size", "8", "--error", "loss", "--output", str(out)]) == 0
    budgets = Budgets.load(out / "budgets-m12.json")
    assert budgets.details["error"] == "loss" and budgets.total == 12 * len(budgets.num_slots)
    curves = budgets.details["errors"]
    assert len(curves) == 2 and all(min(curve) > 0 for curve in curves)   # a random model's curves need not fall
    assert list(budgets.num_slots) == allocate(budgets.details["grid"], curves, 24, 8, step=4)
    assert "weighted by the loss's gradient" in (out / "calibrate.md").read_text()
    # reallocating from those curves keeps what they were measured with: the error, its name, the time
    again = tmp_path / "again"
    assert cli.main(["calibrate", "--curves", str(out / "budgets-m12.json"), "--model", str(tmp_path / "model"),
                     "--mean", "12", "--floor", "8", "--name", "tiny", "--output", str(again)]) == 0
    realloc = Budgets.load(again / "budgets-m12.json")
    assert realloc.num_slots == budgets.num_slots and realloc.details["error"] == "loss"
    assert realloc.details["name"] == "tiny-h2o-loss-m12"
    assert realloc.details["seconds"] == budgets.details["seconds"]


def test_eval_labels_loss_calibrated_budgets(tmp_path):
    from lococo.budgets import Budgets
    from lococo.recipes.methods import resolve_budgets

    loss = Budgets((12, 20), source="calibrated", details={"error": "loss"}).save(tmp_path / "loss.json")
    relative = Budgets((12, 20), source="calibrated", details={"error": "relative"}).save(tmp_path / "rel.json")
    older = Budgets((12, 20), source="calibrated").save(tmp_path / "old.json")   # files from before --error
    assert resolve_budgets(str(loss), 2, 16, floor=4) == ([12, 20], "loss-calibrated")
    assert resolve_budgets(str(relative), 2, 16, floor=4) == ([12, 20], "calibrated")
    assert resolve_budgets(str(older), 2, 16, floor=4) == ([12, 20], "calibrated")
