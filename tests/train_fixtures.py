"""Fixtures of the command-line tests: a tiny saved Llama and short documents (load with pytest_plugins)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = ("the cache keeps a fixed number of slots while the text grows and a small "
         "convolution mixes old entries into them so that memory stays bounded").split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (GQA, head_dim 8) with a byte-level tokenizer, saved like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(alphabet), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    paths = []
    for i in range(2):
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(rng.choice(WORDS) for _ in range(120)))
        paths.append(str(path))
    return paths
