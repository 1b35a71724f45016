"""Build of record for lococo: the extension lococo._C with torch.utils.cpp_extension.

Knobs (environment variables):
  LOCOCO_CUDA=auto|0|1   build the CUDA kernels: auto = when torch is a CUDA build and nvcc exists
  TORCH_CUDA_ARCH_LIST   GPU architectures; default: the entry of cuda_matrix.json for torch's CUDA
  MAX_JOBS               parallel compile jobs; default: from cores and free memory
  CUDA_HOME              the CUDA toolkit; default: /usr/local/cuda when it exists
The version label is computed here: +cuXYZ for a CUDA build, +cpu otherwise.
"""

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"

if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would guess /usr/local

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def cuda_variant() -> dict | None:
    """The cuda_matrix.json entry for the torch we build against, or None for a CPU build."""
    mode = os.environ.get("LOCOCO_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LOCOCO_CUDA must be auto, 0 or 1, got {mode!r}")
    have_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "0" or (mode == "auto" and not have_toolkit):
        return None
    if not have_toolkit:
        raise SystemExit("LOCOCO_CUDA=1 needs a CUDA build of torch and nvcc (set CUDA_HOME)")
    matrix = json.loads((ROOT / "cuda_matrix.json").read_text())["variants"]
    major_minor = ".".join(torch.version.cuda.split(".")[:2])
    for variant in matrix:
        if variant["cuda"] == major_minor:
            return variant
    label = "cu" + major_minor.replace(".", "")
    return {"label": label, "cuda": major_minor, "arch_list": "8.0;9.0"}  # a toolkit the matrix does not list


def default_max_jobs() -> int:
    """Cores, capped so that each compile job has about 3 GiB (nvcc on big kernels needs it)."""
    cores = os.cpu_count() or 1
    try:
        free_kib = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return max(1, min(cores, free_kib // (3 * 1024 * 1024)))
    except (OSError, AttributeError):
        return cores


VARIANT = cuda_variant()
VERSION = f"{BASE_VERSION}+{VARIANT['label'] if VARIANT else 'cpu'}"
if "sdist" in sys.argv:  # the source distribution builds any variant: no local label
    VERSION = BASE_VERSION
os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
if VARIANT:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", VARIANT["arch_list"])

(ROOT / "python" / "lococo" / "_version.py").write_text(
    "# Written by setup.py at build time.\n"
    f'__version__ = "{VERSION}"\n'
    f'torch_version = "{torch.__version__}"\n'
    f'cuda_variant = {VARIANT["label"] if VARIANT else None!r}\n'
)

sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
cxx_flags = ["-O3", "-g0", "-fvisibility=hidden"]
extension_kwargs = {}
if VARIANT:
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    cxx_flags += ["-DLOCOCO_WITH_CUDA", f'-DLOCOCO_CUDA_ARCHS="{archs}"']
    # torch's own CUDA headers (cusparse.h and friends) when the toolkit lacks them.
    nvidia = Path(torch.__file__).parent.parent / "nvidia"
    include_dirs = [str(p) for p in sorted(nvidia.glob("cu*/include"))]
    extension_kwargs = {
        "include_dirs": include_dirs,
        "extra_compile_args": {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DLOCOCO_WITH_CUDA"],
        },
    }
    Extension = cpp_extension.CUDAExtension
else:
    extension_kwargs = {"extra_compile_args": {"cxx": cxx_flags}}
    Extension = cpp_extension.CppExtension

setup(
    name="lococo",
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"lococo": ["py.typed", "data/*.json", "pretrained/*/*"]},
    ext_modules=[Extension("lococo._C", sources, **extension_kwargs)],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=[f"torch=={torch.__version__.split('+')[0].rsplit('.', 1)[0]}.*"],
)
