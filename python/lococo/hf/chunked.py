"""Chunked forward over sequences much longer than M: per-token NLL, optionally with gradients.

The sequence is fed B tokens at a time through a cache (any of them: LoCoCo, H2O,
StreamingLLM, or transformers' DynamicCache for the full-cache reference). Position t's logits
predict token t + 1, so NLL[:, t] = -log p(x[t+1] | x[<=t]) for t in [0, T - 1).

Training (docs/design.md#the-original-recipe): gradients flow from each chunk's loss into the compressor through the
compression done at the start of that chunk; the cache is detached after every chunk (one-chunk
truncated backprop), so ``chunk.loss.backward()`` inside the loop is the recipe:

    for chunk in lococo.iter_chunks(model, input_ids, lococo.LoCoCoCache(compressor), 512):
        chunk.loss.backward()
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .compat import cache_kwarg, get_output_cache

if TYPE_CHECKING:
    from torch import nn
    from transformers.cache_utils import Cache

__all__ = ["ChunkOutput", "NLLOutput", "chunked_nll", "iter_chunks"]


@dataclass
class ChunkOutput:
    """One chunk [start, stop) of the input."""

    start: int
    stop: int
    logits: torch.Tensor        # [b, stop - start, vocab], as the model returns them
    nll: torch.Tensor           # [b, n] float32, n = stop - start (one less for the last chunk)
    target_mask: torch.Tensor   # [b, n] bool: the target and its context token are both real tokens
    loss: torch.Tensor          # mean NLL over the chunk's real targets (0 when it has none)


@dataclass
class NLLOutput:
    nll: torch.Tensor           # [b, T - 1] float32; 0 where target_mask is False
    target_mask: torch.Tensor   # [b, T - 1] bool
    logits: torch.Tensor | None = None  # [b, T, vocab] when asked for
    cache: object = None

    def mean(self) -> torch.Tensor:
        return self.nll.sum() / self.target_mask.sum().clamp(min=1)


def _detach(cache) -> None:
    if hasattr(cache, "detach_"):
        cache.detach_()
        return
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


def iter_chunks(model: nn.Module, input_ids: torch.Tensor, cache: Cache, chunk_size: int,
                attention_mask: torch.Tensor | None = None) -> Iterator[ChunkOutput]:
    """Feeds ``input_ids`` [b, T] through ``model`` and ``cache`` in chunks of ``chunk_size``.

    ``attention_mask`` [b, T] (or [b, seen + T] for a cache that already holds ``seen`` tokens):
    1 for tokens, 0 for left padding. The cache is detached after each chunk. Gradients are
    recorded when autograd is enabled.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, T], got shape {tuple(input_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cache is None:
        raise ValueError("iter_chunks needs a cache (e.g. lococo.build_cache(kind, model, ...))")
    b, T = input_ids.shape
    device = input_ids.device
    seen = cache.get_seq_length()
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if attention_mask.shape == (b, T) and seen > 0:
            attention_mask = torch.cat([attention_mask.new_ones(b, seen), attention_mask], dim=1)
        if attention_mask.shape != (b, seen + T):
            raise ValueError(f"attention_mask must be [{b}, {T}] or [{b}, {seen + T}], got "
                             f"{tuple(attention_mask.shape)}")
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, seen:]
        real = attention_mask[:, seen:].bool()
    else:
        positions = torch.arange(seen, seen + T, device=device).expand(b, T)
        real = torch.ones(b, T, dtype=torch.bool, device=device)
    name = cache_kwarg(model)

    for start in range(0, T, chunk_size):
        stop = min(T, start + chunk_size)
        kwargs = {name: cache, "use_cache": True, "position_ids": positions[:, start:stop]}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, : seen + stop]
        out = model(input_ids=input_ids[:, start:stop], **kwargs)
        returned = get_output_cache(out)
        if returned is not None and returned is not cache:
            raise RuntimeError("the model returned a different cache object than the one passed in")
        logits = out.logits
        n = min(stop, T - 1) - start
        targets = input_ids[:, start + 1: start + 1 + n]
        nll = F.cross_entropy(logits[:, :n].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              reduction="none").view(b, n)
        mask = real[:, start:start + n] & real[:, start + 1:start + 1 + n]
        nll = nll.masked_fill(~mask, 0.0)
        loss = nll.sum() / mask.sum().clamp(min=1)
        _detach(cache)
        yield ChunkOutput(start, stop, logits, nll, mask, loss)


def chunked_nll(model: nn.Module, input_ids: torch.Tensor, cache: Cache, chunk_size: int,
                attention_mask: torch.Tensor | None = None, return_logits: bool = False) -> NLLOutput:
    """Per-token NLL [b, T - 1] of ``input_ids`` through ``cache``, chunk by chunk (see ``iter_chunks``).

    For evaluation, call it under ``torch.no_grad()``: otherwise every chunk's graph is kept.
    """
    nlls, masks, logits = [], [], []
    for chunk in iter_chunks(model, input_ids, cache, chunk_size, attention_mask):
        nlls.append(chunk.nll)
        masks.append(chunk.target_mask)
        if return_logits:
            logits.append(chunk.logits)
    return NLLOutput(torch.cat(nlls, dim=1), torch.cat(masks, dim=1),
                     torch.cat(logits, dim=1) if return_logits else None, cache)
