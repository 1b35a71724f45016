"""What a user sees: `lococo --version`, `python -m lococo.info`, the passkey task's help and its answers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import lococo
from lococo import extras, info
from lococo.recipes import cli


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"lococo {lococo.__version__} (torch {torch.__version__}, transformers ")
    assert (extras.installed_version("transformers") or "not installed") in out


def test_info_reports_versions_ranges_compressors_budgets_and_assets(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    shipped = tmp_path / "pretrained"
    lococo.LoCoCoCompressor.for_model(_geometry(), num_slots=16).save_pretrained(shipped / "tiny-m16")
    (shipped / "tiny-m16" / "lococo_budgets.json").write_text(json.dumps({"num_slots": [8, 16, 24]}))
    (shipped / "budgets").mkdir()
    (shipped / "budgets" / "tiny-pyramid.json").write_text("not json")
    monkeypatch.setattr(info, "PRETRAINED_DIR", shipped)
    report = info.collect(assets_dir=str(tmp_path / "no-assets"))
    assert report["lococo"] == lococo.__version__ and report["torch"] == torch.__version__
    assert report["transformers"].startswith(extras.installed_version("transformers") or "not installed")
    assert report["tested with"] == "transformers 5.17 to 5.25"
    assert "torch" in report["built against"] or report["built against"] == "-"
    assert set(report["extras"]) == {"hf", "train", "test"}
    assert report["compressors"] == {"tiny-m16": "M = 16, B = 128, for llama with 2 layers"}
    assert report["budgets"] == {"budgets/tiny-pyramid.json": "unreadable",
                                 "tiny-m16/lococo_budgets.json": "3 layers, M from 8 to 24 (mean 16)"}
    assets = report["assets"]
    assert assets["cache"] == str(tmp_path / "no-assets")
    assert assets["model"] == "missing (python -m lococo assets fetch)"
    # a model fetched on request only is "not fetched", with the command that fetches it
    assert assets["gemma3-270m"] == "not fetched (python -m lococo assets fetch --only gemma3-270m)"
    assert all(v.startswith("missing") for k, v in assets.items() if k not in ("cache", "gemma3-270m"))


def _geometry():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def test_info_command_lists_the_shipped_compressors_and_the_assets(tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-m", "lococo.info", "--assets-dir", str(tmp_path)], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    lines = out.splitlines()
    assert f"lococo            {lococo.__version__}" in lines
    assert "tested with       transformers 5.17 to 5.25" in lines
    assert any(line.startswith("transformers      ") for line in lines)
    for name in lococo.LoCoCoCompressor.pretrained_names():
        assert any(line.startswith(f"  {name}  ") and "M = " in line for line in lines), name
    assert "compressors:" in lines and "assets:" in lines
    assert any(line.split() == ["model", "missing", "(python", "-m", "lococo", "assets", "fetch)"] for line in lines)
    as_json = json.loads(subprocess.run([sys.executable, "-m", "lococo.info", "--json", "--no-assets"],
                                        capture_output=True, text=True, check=True, timeout=300).stdout)
    assert "assets" not in as_json and set(as_json["compressors"]) == set(lococo.LoCoCoCompressor.pretrained_names())


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_passkey_has_a_help_of_its_own(capsys):
    eval_help = _help(capsys, ["eval", "--help"])
    passkey_help = _help(capsys, ["passkey", "--help"])
    assert passkey_help != eval_help
    assert passkey_help.startswith("usage: lococo passkey")
    assert "Passkey retrieval" in passkey_help and "the model's answer" in passkey_help
    for option in ("--lengths", "--depths", "--trials", "--seed", "--compressor", "--num-slots", "--methods"):
        assert option in passkey_help, option
    for option in ("--buckets", "--max-tokens", "--docs", "--bootstrap", "--task"):   # the perplexity task's
        assert f"  {option} " not in passkey_help and f"[{option} " not in passkey_help, option
    assert "--buckets" in eval_help and "lococo passkey --help" in eval_help
    for argv in (["eval", "--task", "passkey", "--help"], ["eval", "--task=passkey", "-h"],
                 ["eval", "--help", "--task", "passkey"]):
        assert _help(capsys, argv) == passkey_help, argv
    assert _help(capsys, ["eval", "--task", "ppl", "--help"]) == eval_help


def test_passkey_csv_has_the_answer_of_every_trial(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lococo.recipes import passkey

    from hf_models import save_byte_level_model

    save_byte_level_model(tmp_path / "model", seed=80)
    out = tmp_path / "out"
    assert cli.main(["passkey", "--model", str(tmp_path / "model"), "--methods", "full,streaming", "-M", "16",
                     "-B", "32", "--lengths", "480", "--depths", "0,1", "--trials", "2", "--output", str(out),
                     "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "passkey.csv", newline="")))
    assert list(rows[0]) == ["method", "length", "depth", "trial", "key", "answer", "trials", "successes"]
    assert [(r["method"], r["depth"], r["trial"]) for r in rows] == [
        (m, d, t) for m in ("full", "streaming") for d in ("0.0", "1.0") for t in ("0", "1")]
    keys = {(r["depth"], r["trial"]): r["key"] for r in rows if r["method"] == "full"}
    assert len(set(keys.values())) == 4 and all(len(k) == 5 for k in keys.values())
    assert all(r["key"] == keys[(r["depth"], r["trial"])] for r in rows)   # every method gets the same keys

    # each answer is what the model generates from the trial's prompt, decoded
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    row = rows[0]
    ids = torch.tensor([passkey.prompt_ids(tokenizer, 480, float(row["depth"]), int(row["key"]))])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=passkey.ANSWER_TOKENS,
                                   do_sample=False, prefill_chunk_size=32, pad_token_id=tokenizer.eos_token_id)
    assert row["answer"] == tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    for r in rows:
        assert r["trials"] == "1"
        assert int(r["successes"]) == int(passkey.first_number(r["answer"]) == int(r["key"]))
    table = (out / "passkey.md").read_text()
    full = sum(int(r["successes"]) for r in rows if r["method"] == "full") / 4
    assert f"| full cache | {full:.2f} | {full:.2f} |" in table
