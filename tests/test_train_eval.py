"""`lococo train` and `lococo eval` end to end on a tiny random Llama built from a config."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from train_helpers import TINY, read_log, train

from lococo import LoCoCoCompressor
from lococo.recipes import cli

pytest_plugins = ["train_fixtures"]  # tiny_model, docs


def test_train_changes_the_compressor_and_writes_its_outputs(tiny_model, docs, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_model, docs, out) == 0
    log = read_log(out)
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in log)
    # linear decay from the compressor's lr, no warm-up: 5e-2 * (1, 3/4, 1/2, 1/4)
    assert [row["lr"]["compressor"] for row in log] == pytest.approx([5e-2, 3.75e-2, 2.5e-2, 1.25e-2])
    assert len(log[0]["alpha"]) == 2
    trained = LoCoCoCompressor.from_pretrained(out)
    assert trained.config.num_slots == 16 and trained.config.chunk_size == 8
    assert all(abs(float(layer.alpha.detach()) - 0.5) > 1e-4 for layer in trained.layers)
    with open(out / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {"loss", "lr_compressor", "alpha_0", "alpha_1"} <= set(rows[0])
    assert (out / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    args = json.loads((out / "train_args.json").read_text())
    assert args["lococo_config"]["num_slots"] == 16 and args["world_size"] == 1


def test_training_one_sequence_lowers_its_loss(tiny_model, docs, tmp_path):
    # the same 64-token window every update: the compressor must fit it
    one = tmp_path / "one.txt"
    one.write_text(Path(docs[0]).read_text()[:64])
    out = tmp_path / "one"
    assert cli.main(["train", "--model", str(tiny_model), "--docs", str(one), "--output",
                     str(out), *TINY, "-P", "8", "--steps", "8", "--save-every", "8",
                     "--lr", "0.1", "--no-progress"]) == 0
    losses = [row["loss"] for row in read_log(out)]
    assert losses[-1] < losses[0]


def test_resume_reaches_the_same_state(tiny_model, docs, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(tiny_model, docs, straight) == 0
    # a run that stopped after update 2: only its checkpoint and log rows are there
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    (resumed / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_log(straight)[:2]))
    assert train(tiny_model, docs, resumed) == 0
    a, b = LoCoCoCompressor.from_pretrained(straight), LoCoCoCompressor.from_pretrained(resumed)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    drop = ("seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in read_log(resumed)]
            == [{k: v for k, v in r.items() if k not in drop} for r in read_log(straight)])


def test_train_with_lora_embeddings_and_rope_scaling(tiny_model, docs, tmp_path):
    out = tmp_path / "lora"
    assert train(tiny_model, docs, out, "--lora", "--train-embed-norm", "--rope-scaling", "2",
                 "--steps", "2") == 0
    log = read_log(out)
    assert set(log[0]["lr"]) == {"compressor", "embed_norm", "lora"}
    assert log[0]["lr"]["lora"] == pytest.approx(5e-5)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out / "model")
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(merged.model.norm.weight, base.model.norm.weight)


def test_eval_writes_every_method(tiny_model, docs, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_model, docs, run, "--steps", "1") == 0
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(tiny_model), "--compressor", str(run), "--docs",
                     *docs, "--max-tokens", "96", "--buckets", "0,32,64,96", "--output",
                     str(out), "--no-progress"]) == 0
    with open(out / "ppl_by_position.csv") as handle:
        rows = list(csv.DictReader(handle))
    methods = ["full", "lococo", "h2o", "tova", "streaming"]
    assert [(r["method"], r["bucket"]) for r in rows] == [
        (m, b) for m in methods for b in ("0-32", "32-64", "64-96", "all")]
    assert all(float(r["ppl"]) > 1 for r in rows)
    assert sum(int(r["tokens"]) for r in rows if r["method"] == "full" and r["bucket"] != "all") == 2 * 95
    with open(out / "methods.csv") as handle:
        memory = {r["method"]: int(r["peak_kv_bytes"]) for r in csv.DictReader(handle)}
    # full: 96 entries per layer; the others at most M + beta + B = 28
    assert memory["full"] == 2 * 2 * 2 * 96 * 8 * 4
    assert memory["lococo"] == memory["h2o"] == memory["tova"] == memory["streaming"] <= 2 * 2 * 2 * 28 * 8 * 4
    table, _, intervals = (out / "results.md").read_text().partition("\n\n")
    table = table.splitlines()
    assert "bootstrap interval" in intervals and "| LoCoCo |" in intervals
    assert len(table) == 2 + len(methods) and "| LoCoCo | 16 |" in table[3]
    assert (out / "ppl_by_position.png").stat().st_size > 0
    meta = json.loads((out / "eval_meta.json").read_text())
    assert meta["documents"] == docs


def test_eval_gives_h2o_and_tova_the_compressors_recent_window(tiny_model, docs, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_model, docs, run, "--steps", "1", "--num-local", "3") == 0
    common = ["eval", "--model", str(tiny_model), "--compressor", str(run), "--docs", docs[0], "--max-tokens",
              "96", "--buckets", "0,96", "--methods", "h2o,tova", "--bootstrap", "0", "--no-progress"]
    ppl = {}
    for local in (None, "0", "3"):
        out = tmp_path / f"eval-{local}"
        assert cli.main(common + ["--output", str(out)] + (["--num-local", local] if local else [])) == 0
        with open(out / "methods.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["method"] for r in rows] == ["h2o", "tova"]
        assert all(int(r["num_local"]) == int(local or 3) for r in rows)
        results = (out / "results.md").read_text()
        assert ("| H2O (3 recent) |" in results) == ("| TOVA (3 recent) |" in results) == (local != "0")
        with open(out / "ppl_by_position.csv") as handle:
            ppl[local] = {(r["method"], r["bucket"]): float(r["ppl"]) for r in csv.DictReader(handle)}
    assert ppl[None] == ppl["3"] != ppl["0"]
    assert ppl["0"][("h2o", "all")] != ppl["0"][("tova", "all")]   # another selection


def test_eval_methods_agree_before_the_cache_fills(tiny_model, docs, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_model, docs, run, "--steps", "1") == 0
    out = tmp_path / "eval"
    # 20 tokens never overflow M + beta = 20 entries: every method is the full cache
    assert cli.main(["eval", "--model", str(tiny_model), "--compressor", str(run), "--docs",
                     docs[0], "--max-tokens", "20", "--buckets", "0,20", "--output", str(out),
                     "--no-progress"]) == 0
    with open(out / "ppl_by_position.csv") as handle:
        ppl = {r["method"]: float(r["ppl"]) for r in csv.DictReader(handle) if r["bucket"] == "all"}
    assert ppl["lococo"] == pytest.approx(ppl["full"], rel=1e-5)
    assert ppl["h2o"] == pytest.approx(ppl["full"], rel=1e-5)
    assert ppl["tova"] == pytest.approx(ppl["full"], rel=1e-5)
    assert ppl["streaming"] == pytest.approx(ppl["full"], rel=1e-5)


def test_eval_rejects_lococo_without_a_compressor(tiny_model, docs, tmp_path):
    with pytest.raises(SystemExit, match="needs --compressor"):
        cli.main(["eval", "--model", str(tiny_model), "--docs", *docs, "--methods",
                  "full,lococo", "--output", str(tmp_path)])
