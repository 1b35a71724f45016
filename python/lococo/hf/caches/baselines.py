"""Baseline fixed-slot caches at the same M as LoCoCo, or the same per-layer budgets (docs/design.md#baseline-caches).

- H2O: same trigger and same scores as LoCoCo (latest attention call); keeps the top-M entries
  (ties to the lower index, NaN scores last), in cache order, nothing fused.
- TOVA: H2O's selection with another score, the attention that the latest call's last query pays
  each entry, summed over all heads, so that every head keeps the same entries.
- StreamingLLM: the first ``num_sink`` valid entries (4) plus the most recent M - num_sink. Keys
  keep their original positions (no re-rotation, as every cache here). Needs no scores, so it
  works on any attention backend.

Rows with fewer than M valid entries keep them all, right-aligned, as in ``fuse_kv``.
"""

from __future__ import annotations

import torch

from ...budgets import per_layer_slots
from ...ops.reference import rank_order
from .fixed_slot import FixedSlotCache, FixedSlotLayer

__all__ = ["H2OCache", "H2OLayer", "StreamingLLMCache", "StreamingLLMLayer", "TOVACache", "TOVALayer"]


def _gather_slots(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, keep: torch.Tensor):
    """keys/values [b, h, L, d] gathered at index [b, h, M]; slots where keep is False are zeroed."""
    idx = index.unsqueeze(-1)
    k = keys.gather(2, idx.expand(-1, -1, -1, keys.shape[-1]))
    v = values.gather(2, idx.expand(-1, -1, -1, values.shape[-1]))
    drop = ~keep.unsqueeze(-1)
    return k.masked_fill(drop, 0), v.masked_fill(drop, 0)


class H2OLayer(FixedSlotLayer):
    """Keeps the M stored entries with the largest scores (the ``num_local`` most recent always)."""

    def __init__(self, num_slots: int, beta: int = 16, num_local: int = 0, quantization=None):
        super().__init__(num_slots, beta, quantization)
        if not 0 <= num_local <= num_slots:
            raise ValueError(f"num_local must be in [0, num_slots = {num_slots}], got {num_local}")
        self.num_local = num_local

    def compress(self) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._scores_for_compression()
        b, h, stored = scores.shape
        valid = self._valid_mask().unsqueeze(1).expand(b, h, stored)
        recent = torch.arange(stored, device=self.device) >= stored - self.num_local
        # The protected recent entries rank first; pads rank last (fewer than M valid: they fill the
        # front and are zeroed, which right-aligns the row)
        ranked = scores.masked_fill(recent & valid, float("inf"))
        order = rank_order(ranked.reshape(b * h, stored), valid.reshape(b * h, stored))[:, : self.num_slots]
        index = torch.sort(order, dim=-1).values.view(b, h, self.num_slots)
        return _gather_slots(*self.entries(), index, valid.gather(2, index))


class TOVALayer(H2OLayer):
    """Keeps the M entries that the last query attends to most, over all heads (``num_local`` recent always)."""

    scores_from_last_query = True

    def _scores_for_compression(self) -> torch.Tensor:
        scores = super()._scores_for_compression()
        return scores.sum(dim=1, keepdim=True).expand_as(scores)


class StreamingLLMLayer(FixedSlotLayer):
    """Keeps the first ``num_sink`` valid entries and the most recent M - num_sink."""

    needs_scores = False

    def __init__(self, num_slots: int, beta: int = 16, num_sink: int = 4, quantization=None):
        super().__init__(num_slots, beta, quantization)
        if not 0 <= num_sink <= num_slots:
            raise ValueError(f"num_sink must be in [0, num_slots = {num_slots}], got {num_sink}")
        self.num_sink = num_sink

    def compress(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.entries()
        b, h, stored, _ = keys.shape
        M, sinks = self.num_slots, self.num_sink
        first_valid = (stored - self.valid_len).unsqueeze(-1)                   # [b, 1]
        slot = torch.arange(M, device=self.device)
        streaming = torch.where(slot < sinks, first_valid + slot, stored - M + slot)
        short = self.valid_len.unsqueeze(-1) < M                               # keep all, right-aligned
        index = torch.where(short, stored - M + slot, streaming)
        keep = index >= first_valid
        index = index.unsqueeze(1).expand(b, h, M)
        return _gather_slots(keys, values, index, keep.unsqueeze(1).expand(b, h, M))


class H2OCache(FixedSlotCache):
    """H2O: needs the scores of ``lococo_sdpa``/``lococo_eager`` (apply_lococo).

    ``num_slots``: one M for every layer, or per-layer budgets (a list, a ``lococo.Budgets`` or a budget file).
    ``quantization``: how the slots are stored: None or 16 (the model's dtype), 8, 4 or a ``lococo.SlotQuantization``.
    """

    def __init__(self, num_layers: int, num_slots, beta: int = 16, num_local: int = 0, quantization=None):
        super().__init__([H2OLayer(m, beta, num_local, quantization) for m in per_layer_slots(num_slots, num_layers)])


class TOVACache(FixedSlotCache):
    """TOVA: needs the scores of ``lococo_sdpa``/``lococo_eager`` (apply_lococo); the arguments as ``H2OCache``."""

    def __init__(self, num_layers: int, num_slots, beta: int = 16, num_local: int = 0, quantization=None):
        super().__init__([TOVALayer(m, beta, num_local, quantization) for m in per_layer_slots(num_slots, num_layers)])


class StreamingLLMCache(FixedSlotCache):
    """StreamingLLM (attention sinks plus a recent window); ``num_slots`` and ``quantization`` as ``H2OCache``.

    Any attention backend with one M for every layer; per-layer budgets need ``apply_lococo`` (the lococo
    attention fits each layer's mask).
    """

    def __init__(self, num_layers: int, num_slots, beta: int = 16, num_sink: int = 4, quantization=None):
        super().__init__([StreamingLLMLayer(m, beta, num_sink, quantization)
                          for m in per_layer_slots(num_slots, num_layers)])
