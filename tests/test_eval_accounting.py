"""`lococo eval`'s numbers against an independent computation on a tiny model.

Each bucket's token count and mean NLL must equal a slice of the per-token NLL computed here
separately: one plain forward for the full cache, ``chunked_nll`` through a cache built here with
the documented settings spelled out for the others. Target token t (t >= 1, counted from the
start of the evaluated range) falls in bucket [lo, hi) when lo <= t < hi.
"""

from __future__ import annotations

import csv
import math
import random

import pytest
import torch
import torch.nn.functional as F

import lococo
from lococo.recipes import cli

from hf_models import save_byte_level_model, tiny_compressor, transformers

M, BETA, CHUNK = 16, 4, 8
START, TOKENS = 5, 90
EDGES = [0, 10, 40, 90]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model, a saved compressor with a non-zero bias and alpha 0.3, two documents."""
    root = tmp_path_factory.mktemp("eval-accounting")
    save_byte_level_model(root / "model", seed=70)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    compressor = tiny_compressor(model, seed=71, num_slots=M, beta=BETA, chunk_size=CHUNK, kernel_size=3)
    with torch.no_grad():
        for layer in compressor.layers:
            layer.alpha.fill_(0.3)
            layer.bias.normal_(0.0, 0.5)
    compressor.save_pretrained(root / "compressor")
    rng = random.Random(72)
    docs = []
    for i in range(2):
        path = root / f"doc{i}.txt"
        path.write_text(" ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7)))
                                 for _ in range(60)))
        docs.append(str(path))
    return root, docs


def independent_nll(root, docs) -> dict[str, list[torch.Tensor]]:
    """Per-token NLL [T - 1] of each document's range, per method, computed without `lococo eval`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
    compressor = lococo.LoCoCoCompressor.from_pretrained(root / "compressor")
    lococo.apply_lococo(model, compressor)
    layers = len(model.model.layers)
    caches = {"lococo": lambda: lococo.LoCoCoCache(compressor),
              "h2o": lambda: lococo.H2OCache(layers, M, beta=BETA, num_local=0),
              "streaming": lambda: lococo.StreamingLLMCache(layers, M, beta=BETA, num_sink=4)}
    out = {method: [] for method in ("full", *caches)}
    for path in docs:
        text = open(path, encoding="utf-8").read()
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids[START:START + TOKENS]])
        assert ids.shape[1] == TOKENS
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0]
            out["full"].append(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none"))
            for method, make in caches.items():
                out[method].append(lococo.chunked_nll(model, ids, make(), CHUNK).nll[0])
    return out


def stored_peak() -> int:
    """Entries a fixed-slot layer stores at most between chunks, from the documented schedule."""
    stored = peak = 0
    for start in range(0, TOKENS, CHUNK):
        stored = (M if stored > M + BETA else stored) + min(CHUNK, TOKENS - start)
        peak = max(peak, stored)
    return peak


def test_buckets_equal_slices_of_the_per_token_nll(setup, tmp_path):
    root, docs = setup
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(root / "model"), "--compressor", str(root / "compressor"),
                     "--docs", *docs, "--start-token", str(START), "--max-tokens", str(TOKENS),
                     "--buckets", ",".join(map(str, EDGES)), "--device", "cpu", "--output", str(out),
                     "--no-progress"]) == 0
    with open(out / "ppl_by_position.csv") as handle:
        rows = {(r["method"], r["bucket"]): r for r in csv.DictReader(handle)}
    want = independent_nll(root, docs)
    labels = ["0-10", "10-40", "40-90"]
    for method, per_doc in want.items():
        totals, counts = [], []
        for lo, hi in zip(EDGES, EDGES[1:]):
            # target t sits at index t - 1 of the NLL; target 0 does not exist
            part = [nll[max(lo, 1) - 1:hi - 1] for nll in per_doc]
            totals.append(sum(float(p.double().sum()) for p in part))
            counts.append(sum(p.numel() for p in part))
        assert counts == [2 * 9, 2 * 30, 2 * 50]
        for label, total, n in zip(labels + ["all"], totals + [sum(totals)], counts + [sum(counts)]):
            row = rows[(method, label)]
            assert int(row["tokens"]) == n, (method, label)
            assert float(row["nll"]) == pytest.approx(total / n, abs=2e-5), (method, label)
            assert float(row["ppl"]) == pytest.approx(math.exp(total / n), rel=1e-4), (method, label)
    # once compression starts the methods differ: the comparison above tells them apart
    assert len({rows[(m, "40-90")]["nll"] for m in want}) == 4

    with open(out / "methods.csv") as handle:
        methods = {r["method"]: r for r in csv.DictReader(handle)}
    entry_bytes = 2 * 2 * 2 * 16 * 4          # layers x (keys, values) x KV heads x head_dim x float32
    assert int(methods["full"]["peak_entries_per_layer"]) == TOKENS
    assert int(methods["full"]["peak_kv_bytes"]) == TOKENS * entry_bytes
    for method in ("lococo", "h2o", "streaming"):
        assert int(methods[method]["peak_entries_per_layer"]) == stored_peak() == M + CHUNK
        assert int(methods[method]["peak_kv_bytes"]) == stored_peak() * entry_bytes
        assert int(methods[method]["tokens"]) == 2 * (TOKENS - 1)
