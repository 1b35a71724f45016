"""The op ``torch.ops.lococo.fuse_kv``: loading the compiled library, argument checks, fake kernel and
autograd registration, the typed entry point, and the pure-PyTorch reference."""

from . import reference
from .dispatch import fuse_kv
from .library import compiled, has_kernel, kernel_devices, load_error

__all__ = ["compiled", "fuse_kv", "has_kernel", "kernel_devices", "load_error", "reference"]
