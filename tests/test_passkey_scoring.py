"""Passkey scoring: a trial succeeds only when the generated answer, not the prompt, holds the key.

The prompt's first number is the key itself, so scoring must read the generated tokens alone. A model
stub that answers a fixed number (or none) through the real scoring loop (``passkey.run``) and tables
(``passkey.write_results``) gives failures, and one that answers the key gives successes.
"""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from lococo.recipes import passkey

from hf_models import transformers


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level tokenizer: digits, filler and all, so that decoding the prompt would show the key."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


class AnsweringModel(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` returns the prompt followed by a fixed answer (or the key)."""

    def __init__(self, tokenizer, answer: str | None):
        super().__init__()
        self.tokenizer, self.answer, self.caches = tokenizer, answer, []

    def forward(self, input_ids=None, past_key_values=None, **kwargs):   # only its signature is read (cache_kwarg)
        raise AssertionError("the stub is only generated from")

    def generate(self, ids, attention_mask=None, max_new_tokens=0, **kwargs):
        assert ids.shape[0] == 1 and attention_mask.shape == ids.shape
        self.caches.append(kwargs.get("cache", kwargs.get("past_key_values")))
        if self.answer is None:   # the key, read back from the prompt: a model that remembers it
            answer = f" {passkey.first_number(self.tokenizer.decode(ids[0]))}. It is"
        else:
            answer = self.answer
        new = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids[:, :max_new_tokens]
        return torch.cat([ids, new], dim=1)


def _run(tokenizer, answer, methods=("full", "streaming")):
    args = argparse.Namespace(lengths=[400, 480], depths=[0.0, 1.0], trials=2, seed=7, no_progress=True)
    model = AnsweringModel(tokenizer, answer)
    rows = passkey.run(args, model, tokenizer, list(methods), make_cache=lambda method: f"cache of {method}",
                       chunk_size=32, device="cpu")
    assert model.caches == [f"cache of {m}" for _ in range(2 * 2 * 2) for m in methods]   # each trial, each method
    return rows


def _successes(rows, method=None) -> tuple[int, int]:
    cells = [r for r in rows if method is None or r["method"] == method]
    return sum(int(r["successes"]) for r in cells), sum(int(r["trials"]) for r in cells)


@pytest.mark.parametrize("answer", [" 12. The pass key", " none, sorry", " 00000"])
def test_a_model_that_does_not_know_the_key_fails_every_trial(tokenizer, tmp_path, answer):
    rows = _run(tokenizer, answer)
    assert _successes(rows) == (0, 2 * 2 * 2 * 2)
    # what makes the scoring easy to get wrong: the prompt's first number is the key
    assert passkey.first_number(tokenizer.decode(passkey.prompt_ids(tokenizer, 400, 1.0, 54321))) == 54321

    text = passkey.write_results(tmp_path, rows, {"full": "Full cache", "streaming": "StreamingLLM"}, num_slots=16)
    assert "| Full cache | 0.00 | 0.00 | 0.00 |" in text and "| StreamingLLM | 0.00 | 0.00 | 0.00 |" in text
    with open(tmp_path / "passkey.csv") as handle:
        assert sum(int(r["successes"]) for r in csv.DictReader(handle)) == 0


def test_a_model_that_answers_the_key_succeeds_and_each_method_is_scored_alone(tokenizer, tmp_path):
    rows = _run(tokenizer, None)
    assert _successes(rows) == (16, 16)

    # full answers the key, streaming a wrong number: accuracy 1 and 0, per method
    class Mixed(AnsweringModel):
        def generate(self, ids, attention_mask=None, max_new_tokens=0, **kwargs):
            self.answer = None if kwargs.get("cache", kwargs.get("past_key_values")) == "full" else " 99999"
            return super().generate(ids, attention_mask, max_new_tokens, **kwargs)

    args = argparse.Namespace(lengths=[400], depths=[0.5], trials=3, seed=8, no_progress=True)
    rows = passkey.run(args, Mixed(tokenizer, None), tokenizer, ["full", "streaming"], make_cache=lambda m: m,
                       chunk_size=32, device="cpu")
    assert _successes(rows, "full") == (3, 3) and _successes(rows, "streaming") == (0, 3)
    text = passkey.write_results(tmp_path, rows, {"full": "Full cache", "streaming": "StreamingLLM"}, num_slots=16)
    assert "| Full cache | 1.00 | 1.00 |" in text and "| StreamingLLM | 0.00 | 0.00 |" in text
