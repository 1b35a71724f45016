"""`python -m lococo.info`: what this build of lococo contains and what it can run on."""

from __future__ import annotations

import argparse
import platform

import torch

from . import __version__
from .ops import library as _library


def collect() -> dict:
    info = {
        "lococo": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "GPU": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "compiled library": "loaded" if _library.compiled() else f"missing ({_library.load_error()})",
    }
    if _library.compiled():
        from . import _C

        info["built with CUDA"] = _C.built_with_cuda()
        info["CUDA archs"] = _C.cuda_archs() or "-"
        info["compiler"] = _C.compiler()
    for device in ("cpu", "cuda"):
        info[f"fuse_kv on {device}"] = ("compiled kernel" if _library.has_kernel(device)
                                        else "PyTorch reference (fallback)")
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lococo.info", description=__doc__)
    parser.add_argument("--short", action="store_true", help="one line")
    args = parser.parse_args(argv)
    info = collect()
    if args.short:
        print("lococo", info["lococo"], "| torch", info["torch"], "| kernels:",
              ", ".join(_library.kernel_devices()) or "none")
        return
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
