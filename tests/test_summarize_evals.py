"""benchmarks/summarize_evals.py: merging eval folders, the share of the gap, refusing mixed text."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("summarize_evals", ROOT / "benchmarks" / "summarize_evals.py")
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)

BUCKETS = {"0-1K": (0, 1024), "1K-2K": (1024, 2048)}


def write_run(folder: Path, ppl: dict, docs=("a", "b"), num_local=None, budgets=None, storage=None) -> Path:
    """An eval folder (float32) with the given perplexity per (method, M) and bucket, 100 tokens per bucket.

    The compressed slots take 1 KiB per M (0.5 KiB in a bf16 model); ``budgets`` names the per-layer budgets
    of a method; ``storage`` (method -> (label, bytes per M)) quantizes its slots.
    """
    folder.mkdir()
    meta = {"args": {"start_token": 0, "max_tokens": 2048, "buckets": [0, 1024, 2048], "chunk_size": 128,
                     "beta": 16}, "documents": list(docs)}
    (folder / "eval_meta.json").write_text(json.dumps(meta))
    with open(folder / "ppl_by_position.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "num_slots", "bucket", "start", "end", "tokens", "nll", "ppl"])
        for (method, slots), values in ppl.items():
            for bucket, value in values.items():
                writer.writerow([method, slots or "", bucket, *BUCKETS[bucket], 100, math.log(value), value])
    with open(folder / "methods.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "num_slots", "num_local", "budgets", "kv_storage", "slot_kv_bytes",
                         "slot_kv_bytes_bf16"])
        for method, slots in ppl:
            kind, per_slot = (storage or {}).get(method, ("", None))
            writer.writerow([method, slots or "", (num_local or {}).get(method, 0), (budgets or {}).get(method, ""),
                             kind, 1024 * slots if slots else "",
                             "" if not slots else per_slot * slots if per_slot else 512 * slots])
    return folder


def test_runs_merge_and_the_share_is_against_the_better_baseline(tmp_path, capsys):
    base = write_run(tmp_path / "base", {("full", None): {"0-1K": 10, "1K-2K": 10},
                                         ("h2o", 64): {"0-1K": 20, "1K-2K": 14},
                                         ("streaming", 64): {"0-1K": 16, "1K-2K": 18}}, num_local={"h2o": 8})
    ours = write_run(tmp_path / "ours", {("lococo", 64): {"0-1K": 13, "1K-2K": 15}})
    tova = write_run(tmp_path / "tova", {("tova", 64): {"0-1K": 17, "1K-2K": 13}}, num_local={"tova": 8})
    assert summarize.main([str(base), str(ours), str(tova), "--plot", str(tmp_path / "q.png"),
                          "--span", "0", "2048"]) == 0
    out = capsys.readouterr().out
    assert "| H2O (8 recent) | 64 | 20.00 | 14.00 | 16.73 |" in out
    assert "| 0-1K | 10.00 | 13.00 | StreamingLLM 16.00 | 50% |" in out
    assert "| 1K-2K | 10.00 | 15.00 | TOVA (8 recent) 13.00 | -67% |" in out
    against_memory = out.split("Perplexity over tokens 0-2K against M")[1]   # the plot's numbers
    assert "| M | full cache | LoCoCo | H2O (8 recent) | TOVA (8 recent) | StreamingLLM |" in against_memory
    assert "| 64 | 10.00 | 13.96 (0.03) | 16.73 (0.03) | 14.87 (0.03) | 16.97 (0.03) |" in against_memory
    assert (tmp_path / "q.png").stat().st_size > 0


def test_runs_on_other_documents_are_refused(tmp_path):
    one = write_run(tmp_path / "one", {("full", None): {"0-1K": 10}})
    two = write_run(tmp_path / "two", {("h2o", 64): {"0-1K": 12}}, docs=("a", "c"))
    with pytest.raises(SystemExit, match="other documents"):
        summarize.main([str(one), str(two)])


def test_one_method_with_two_results_is_refused(tmp_path):
    one = write_run(tmp_path / "one", {("h2o", 64): {"0-1K": 12}})
    two = write_run(tmp_path / "two", {("h2o", 64): {"0-1K": 13}})
    with pytest.raises(SystemExit, match="differs between runs"):
        summarize.main([str(one), str(two)])


def test_budgets_rows_are_apart_and_their_share_is_against_uniform_h2o(tmp_path, capsys):
    uniform = write_run(tmp_path / "uniform", {("full", None): {"0-1K": 10, "1K-2K": 10},
                                               ("h2o", 64): {"0-1K": 20, "1K-2K": 14}}, num_local={"h2o": 8})
    calibrated = write_run(tmp_path / "calibrated", {("h2o", 64): {"0-1K": 18, "1K-2K": 13},
                                                     ("lococo", 64): {"0-1K": 16, "1K-2K": 13.5}},
                           num_local={"h2o": 8, "lococo": 8}, budgets={"h2o": "calibrated", "lococo": "calibrated"})
    assert summarize.main([str(uniform), str(calibrated), "--span", "0", "2048"]) == 0
    out = capsys.readouterr().out
    assert "| H2O (8 recent) | 64 | 20.00 | 14.00 |" in out
    assert "| H2O (8 recent, calibrated budgets) | 64 | 18.00 | 13.00 |" in out
    # LoCoCo's better baseline is the one with its budgets
    assert "| 0-1K | 10.00 | 16.00 | H2O (8 recent, calibrated budgets) 18.00 | 25% |" in out
    shares = out.split("per-layer budgets or quantized slots closes:")[1]
    assert "| H2O (8 recent, calibrated budgets) | 64 | H2O (8 recent), M = 64 | 20% | 25% |" in shares
    assert "| LoCoCo (calibrated budgets) | 64 | H2O (8 recent), M = 64 | 40% | 12% |" in shares


def test_quantized_rows_are_against_uniform_h2o_at_the_same_bytes(tmp_path, capsys):
    """4-bit slots at 4 times the M take the bytes of uniform bf16 H2O at M = 64; 8-bit at the same M cost 1%."""
    uniform = write_run(tmp_path / "uniform", {("full", None): {"0-1K": 10, "1K-2K": 10},
                                               ("h2o", 64): {"0-1K": 20, "1K-2K": 14}}, num_local={"h2o": 8})
    larger = write_run(tmp_path / "larger", {("h2o", 256): {"0-1K": 15, "1K-2K": 12}}, num_local={"h2o": 8})
    int4 = write_run(tmp_path / "int4", {("h2o", 256): {"0-1K": 16, "1K-2K": 12.5}}, num_local={"h2o": 8},
                     storage={"h2o": ("int4, groups of 32", 128)})
    int8 = write_run(tmp_path / "int8", {("h2o", 64): {"0-1K": 20.2, "1K-2K": 14}}, num_local={"h2o": 8},
                     storage={"h2o": ("int8, groups of 64", 264)})
    assert summarize.main([str(uniform), str(larger), str(int4), str(int8), "--span", "0", "2048",
                           "--plot", str(tmp_path / "q.png")]) == 0
    out = capsys.readouterr().out
    shares = out.split("per-layer budgets or quantized slots closes:")[1]
    assert "| H2O (8 recent, int4, groups of 32) | 256 | H2O (8 recent), M = 64 | 40% | 37% |" in shares
    assert "| H2O (8 recent, int8, groups of 64) | 64 | H2O (8 recent), M = 64 | -2% | 0% |" in shares
    changes = out.split("in the model's dtype:")[1]
    assert "| H2O (8 recent, int4, groups of 32) | 256 | +6.67% | +4.17% |" in changes
    assert "| H2O (8 recent, int8, groups of 64) | 64 | +1.00% | +0.00% |" in changes
    assert "| 256 | 10.00 | 13.42 (0.12) | 14.14 (0.03) | - |" in out   # 4-bit: 256 slots in the bytes of 64
