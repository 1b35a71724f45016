"""lococo: a fixed-size KV cache for Hugging Face causal LMs (LoCoCo, ICML 2024).

The op, the reference and the compressor need only torch; the transformers integration (caches,
attention, ``apply_lococo``, chunked forward) is imported on first use and needs the ``hf`` extra.
"""

import importlib

from . import reference
from ._library import compiled, has_kernel, kernel_devices
from .compressor import LayerCompressor, LoCoCoCompressor
from .config import LoCoCoConfig
from .ops import fuse_kv

try:
    from ._version import __version__
except ImportError:  # a source tree that was never built
    __version__ = "0.0.0+unbuilt"

# public name -> submodule, imported lazily because they need transformers
_HF_EXPORTS = {
    "FixedSlotCache": "cache", "LoCoCoCache": "cache",
    "H2OCache": "baselines", "StreamingLLMCache": "baselines", "build_cache": "baselines",
    "apply_lococo": "patching", "remove_lococo": "patching", "SUPPORTED_MODEL_TYPES": "patching",
    "cache_kwarg": "patching", "get_output_cache": "patching",
    "chunked_nll": "chunked", "iter_chunks": "chunked",
}
_HF_MODULES = ("attention", "baselines", "cache", "chunked", "patching")


def __getattr__(name):
    if name in _HF_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _HF_EXPORTS:
        value = getattr(importlib.import_module(f".{_HF_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lococo' has no attribute {name!r}")


__all__ = ["LayerCompressor", "LoCoCoCompressor", "LoCoCoConfig", "__version__", "compiled", "fuse_kv",
           "has_kernel", "kernel_devices", "reference", *_HF_EXPORTS]
