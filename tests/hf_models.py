"""Tiny Hugging Face models built from configs (no downloads) for the integration tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lococo  # noqa: E402

VOCAB = 96

# 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA), head_dim 16
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(arch: str = "llama", **overrides):
    fields = dict(_COMMON, **overrides)
    if arch == "llama":
        config = transformers.LlamaConfig(**fields)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**fields)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **fields)
    elif arch == "mistral":
        config = transformers.MistralConfig(**{"sliding_window": None, **fields})
    else:
        raise ValueError(arch)
    return config


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    """A randomly initialised causal LM in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None   # fixed-length generations
    return model.eval()


def tiny_compressor(model, seed: int = 0, **fields) -> lococo.LoCoCoCompressor:
    """A compressor with small M, beta and kernel so that short tests compress many times."""
    fields = {"num_slots": 12, "beta": 3, "kernel_size": 5, "init_std": 0.2, **fields}
    torch.manual_seed(seed)
    return lococo.LoCoCoCompressor.for_model(model, **fields)


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def cache_kw(model, cache) -> dict:
    """``cache=`` or ``past_key_values=``, as this transformers version wants it."""
    return {lococo.hf.cache_kwarg(model): cache}


def save_byte_level_model(folder, seed: int = 0, arch: str = "llama", **overrides) -> None:
    """A tiny Llama (GQA; or ``arch`` with config ``overrides``) with a byte-level tokenizer saved like a real
    checkpoint, for the command line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(alphabet), pad_token_id=None, **overrides)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def save_model_and_document(root, seed: int, words: int, arch: str = "llama", **overrides) -> str:
    """``save_byte_level_model`` into root/model and a document of ``words`` random words; the document's path."""
    import random

    save_byte_level_model(root / "model", seed=seed, arch=arch, **overrides)
    rng = random.Random(seed + 1)
    doc = root / "doc.txt"
    doc.write_text(" ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(words)))
    return str(doc)


def spy_attention_outputs(monkeypatch) -> list:
    """Every attention output that ``lococo.hf.attention.biased_attention`` computes from now on (detached copies),
    appended to the list returned, as the replay and the cache layers compute them."""
    from lococo.hf import attention

    outputs = []
    biased = attention.biased_attention

    def spy(*args, **kwargs):
        result = biased(*args, **kwargs)
        outputs.append(result[0].detach().clone())
        return result

    monkeypatch.setattr(attention, "biased_attention", spy)
    return outputs
