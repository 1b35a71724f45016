"""lococo: a fixed-size KV cache for Hugging Face causal LMs (LoCoCo, ICML 2024).

The package has three layers, each a subpackage:

- ``lococo.ops``: the op ``fuse_kv`` (compiled kernels, fake kernel, autograd) and its reference;
- ``lococo.hf``: the transformers integration (scored attention, caches, patching, chunked forward);
- ``lococo.recipes``: the command line (assets, train, eval, demo).

The op, the reference and the compressor need only torch; the transformers integration is imported
on first use and needs the ``hf`` extra.
"""

import importlib

from .budgets import Budgets
from .compressor import LayerCompressor, LoCoCoCompressor
from .config import LoCoCoConfig
from .ops import compiled, fuse_kv, has_kernel, kernel_devices, reference
from .quantization import SlotQuantization

try:
    from ._version import __version__
except ImportError:  # a source tree that was never built
    __version__ = "0.0.0+unbuilt"

# public names of lococo.hf, imported lazily because they need transformers
_HF_EXPORTS = ("FixedSlotCache", "LoCoCoCache", "H2OCache", "TOVACache", "StreamingLLMCache", "build_cache",
               "apply_lococo", "remove_lococo", "SUPPORTED_MODEL_TYPES", "cache_kwarg", "get_output_cache",
               "chunked_nll", "iter_chunks")


def __getattr__(name):
    if name == "hf":
        return importlib.import_module(".hf", __name__)
    if name in _HF_EXPORTS:
        value = getattr(importlib.import_module(".hf", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lococo' has no attribute {name!r}")


__all__ = ["Budgets", "LayerCompressor", "LoCoCoCompressor", "LoCoCoConfig", "SlotQuantization", "__version__",
           "compiled", "fuse_kv", "has_kernel", "kernel_devices", "reference", *_HF_EXPORTS]
