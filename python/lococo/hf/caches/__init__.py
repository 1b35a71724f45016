"""Fixed-size caches: LoCoCo and the training-free baselines at the same memory, and ``build_cache``.

"full" is transformers' own ``DynamicCache``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.cache_utils import Cache, DynamicCache

from ...budgets import per_layer_slots, slots_for_budget
from ...compressor import LoCoCoCompressor, ModelGeometry
from ...quantization import SlotQuantization
from .baselines import H2OCache, StreamingLLMCache, TOVACache
from .fixed_slot import FixedSlotCache, FixedSlotLayer, LoCoCoCache, LoCoCoLayer, kv_bytes

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedConfig

__all__ = ["CACHE_KINDS", "FixedSlotCache", "FixedSlotLayer", "H2OCache", "LoCoCoCache", "LoCoCoLayer",
           "StreamingLLMCache", "TOVACache", "build_cache", "kv_bytes"]


CACHE_KINDS = ("lococo", "h2o", "tova", "streaming", "full")


def build_cache(kind: str, model: nn.Module | PreTrainedConfig, compressor: LoCoCoCompressor | None = None,
                num_slots=None, beta: int | None = None, num_local: int | None = None, quantization=None, *,
                compression_ratio: float | None = None, context_length: int | None = None,
                kv_tokens: int | None = None) -> Cache:
    """A fresh cache of one kind for ``model``: "lococo", "h2o", "tova", "streaming" or "full".

    "lococo" needs ``compressor``, or a model that ``apply_lococo`` gave one. In a model that mixes sliding-window
    and full-attention layers (Gemma 3), only the full-attention layers are fixed-slot layers: each sliding-window
    layer keeps transformers' window cache, and its entry in per-layer budgets is not used. The baselines take
    ``num_slots`` (one M for every layer, or per-layer budgets: a list, a ``lococo.Budgets``, a budget file
    or a shipped budget name), ``beta`` and (H2O, TOVA) ``num_local``, the recent entries always kept, from
    the arguments, else from ``compressor`` when given, else beta 16 and num_local 0: an H2O or TOVA cache
    built beside a compressor keeps as many slots in each layer and as many recent entries as LoCoCo.

    Instead of ``num_slots``, the budget may be ``compression_ratio`` (keep that share of ``context_length``
    tokens, default the model's positions) or ``kv_tokens`` (the most entries a layer holds while decoding,
    M + beta); ``lococo.budgets.slots_for_budget`` turns either into M.

    ``quantization``: how the compressed slots are stored (docs/design.md#quantized-slots): 16 (the model's
    dtype), 8, 4 or a ``lococo.SlotQuantization``; None: the compressor's (LoCoCo, and the baselines built
    beside one), else the model's dtype. The full cache refuses it.
    """
    if kind not in CACHE_KINDS:
        raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind!r}")
    config = getattr(model, "config", model)
    if compression_ratio is not None or kv_tokens is not None or context_length is not None:
        budget_beta = beta if beta is not None else compressor.config.beta if compressor is not None else 16
        num_slots = slots_for_budget(num_slots, compression_ratio=compression_ratio, context_length=context_length,
                                     kv_tokens=kv_tokens, beta=budget_beta, model=config)
    quantization = SlotQuantization.of(quantization) if quantization != 16 else 16
    if kind == "full":
        if quantization not in (None, 16):
            raise ValueError("build_cache('full', ...) keeps every entry in the model's dtype: quantization "
                             "applies to the fixed-slot caches")
        return DynamicCache(config=config)
    if compressor is None and kind == "lococo":
        state = getattr(model, "_lococo_state", None)  # lococo.apply_lococo(model, compressor)
        compressor = None if state is None else state.compressor
    if kind == "lococo":
        if compressor is None:
            raise ValueError("build_cache('lococo', ...) needs a compressor, or a model that "
                             "lococo.apply_lococo(model, compressor) prepared")
        compressor.check_model(config)
        num_layers = ModelGeometry.of(config).num_layers
        own = compressor.config.slots_per_layer(num_layers)
        if isinstance(quantization, SlotQuantization):
            quantization.check(compressor.geometry.head_dim)
        if num_slots is not None and per_layer_slots(num_slots, num_layers) != own:
            raise ValueError(f"build_cache('lococo', ...): num_slots differs from the compressor's ({own}); LoCoCo "
                             "keeps its compressor's slots")
        return LoCoCoCache(compressor, quantization)
    num_layers = ModelGeometry.of(config).num_layers
    if isinstance(quantization, SlotQuantization):
        quantization.check(ModelGeometry.of(config).head_dim)
    if compressor is not None:
        compressor.check_model(config)
        num_slots = compressor.config.slots_per_layer(num_layers) if num_slots is None else num_slots
        beta = compressor.config.beta if beta is None else beta
        num_local = compressor.config.num_local if num_local is None else num_local
        quantization = compressor.config.quantization if quantization is None else quantization
    if num_slots is None:
        raise ValueError(f"build_cache({kind!r}, ...) needs num_slots (or a compressor to take it from)")
    num_slots = per_layer_slots(num_slots, num_layers)
    beta = 16 if beta is None else beta
    num_local = 0 if num_local is None else num_local
    if kind == "h2o":
        cache = H2OCache(num_layers, num_slots, beta, num_local, quantization)
    elif kind == "tova":
        cache = TOVACache(num_layers, num_slots, beta, num_local, quantization)
    else:
        cache = StreamingLLMCache(num_layers, num_slots, beta, quantization=quantization)
    geometry = ModelGeometry.of(config)
    cache.num_kv_heads = geometry.num_kv_heads
    return cache.keep_windows(geometry)   # a mixed model's sliding-window layers keep transformers' window
