// The schemas of every lococo op, in one place, and the Python module lococo._C.
// Backends register their kernels from their own files (cpu/, cuda/).
#include <Python.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "fuse_kv_schema.h"

#ifndef LOCOCO_CUDA_ARCHS
#define LOCOCO_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(lococo, m) {
  m.def(LOCOCO_FUSE_KV_SCHEMA);
  m.def(LOCOCO_FUSE_KV_BACKWARD_SCHEMA);
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "lococo compiled kernels; the ops live in torch.ops.lococo";
  module.def("built_with_cuda", [] {
#ifdef LOCOCO_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  module.def("cuda_archs", [] { return std::string(LOCOCO_CUDA_ARCHS); },
             "The CUDA architectures this build was compiled for (empty without CUDA).");
  module.def("compiler", [] {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return std::string("gcc ") + __VERSION__;
#else
    return std::string("unknown");
#endif
  }, "The host compiler of this build.");
}
