"""Loading of the compiled library lococo._C, with a warning and a fallback when it fails."""

from __future__ import annotations

import warnings

import torch

OP = "lococo::fuse_kv"
_load_error: str | None = None

try:
    from .. import _C  # registers torch.ops.lococo.*
except (ImportError, OSError) as exc:  # missing build, or built against another torch
    _C = None
    _load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "lococo: the compiled kernels could not be loaded, falling back to the PyTorch "
        f"reference (slower). Reason: {_load_error}. Rebuild with `python setup.py build_ext "
        "--inplace` or install the wheel matching your torch and CUDA.",
        RuntimeWarning,
        stacklevel=2,
    )


def compiled() -> bool:
    """True when lococo._C loaded and torch.ops.lococo.fuse_kv exists."""
    return _C is not None


def load_error() -> str | None:
    """Why lococo._C did not load, or None."""
    return _load_error


def has_kernel(device: torch.device | str) -> bool:
    """True when a compiled fuse_kv kernel is registered for this device type."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP, key)


def kernel_devices() -> list[str]:
    """Device types with a compiled kernel in this build."""
    return [dev for dev in ("cpu", "cuda") if has_kernel(dev)]
