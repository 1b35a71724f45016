"""The transformers integration: scored attention, fixed-size caches, patching and chunked forward."""

from . import compat  # noqa: F401  first: without transformers, its import error names the 'hf' extra
from .caches import CACHE_KINDS, FixedSlotCache, H2OCache, LoCoCoCache, StreamingLLMCache, TOVACache, build_cache
from .chunked import chunked_nll, iter_chunks
from .compat import cache_kwarg, get_output_cache
from .patching import SUPPORTED_MODEL_TYPES, apply_lococo, is_patched, remove_lococo

__all__ = ["CACHE_KINDS", "SUPPORTED_MODEL_TYPES", "FixedSlotCache", "H2OCache", "LoCoCoCache", "StreamingLLMCache",
           "TOVACache", "apply_lococo", "build_cache", "cache_kwarg", "chunked_nll", "get_output_cache", "is_patched",
           "iter_chunks", "remove_lococo"]
