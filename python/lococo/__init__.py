"""lococo: a fixed-size KV cache for Hugging Face causal LMs (LoCoCo, ICML 2024)."""

from . import reference
from ._library import compiled, has_kernel, kernel_devices
from .compressor import LayerCompressor
from .ops import fuse_kv

try:
    from ._version import __version__
except ImportError:  # a source tree that was never built
    __version__ = "0.0.0+unbuilt"

__all__ = ["LayerCompressor", "__version__", "compiled", "fuse_kv", "has_kernel", "kernel_devices", "reference"]
