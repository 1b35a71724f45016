// torch.ops.lococo_emu.fuse_kv / fuse_kv_backward: the CUDA launch sequence and kernels of
// csrc/cuda/fuse_kv_launch.h run on CPU tensors through emulation.h. A verification tool for
// machines without a GPU (see check_emulated.py); the real build never compiles this file.
#include "emulation.h"  // first: the CUDA built-ins the production headers use

#include <torch/library.h>

#include "cuda/fuse_kv_launch.h"
#include "fuse_kv_schema.h"

namespace lococo::cuda {
namespace {

// Reports an sm_90 part with the H100/H200 shared-memory limit, so the tensor-core path runs.
struct EmulatedLauncher {
  explicit EmulatedLauncher(const at::Device& device) {
    TORCH_CHECK(device.is_cpu(), "lococo_emu runs on CPU tensors, got ", device);
  }
  int compute_capability() const { return 90; }
  size_t max_shared_memory() const { return 227 * 1024; }
  // An H200's 132 by default; EMU_SM_COUNT changes it (1: the forward never splits positions).
  int multiprocessor_count() const {
    const char* v = std::getenv("EMU_SM_COUNT");
    return v != nullptr ? std::atoi(v) : 132;
  }
  template <typename... Params>
  void operator()(void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_memory,
                  const Params&... params) const {
    TORCH_CHECK(shared_memory <= max_shared_memory(), "shared memory over the limit: ", shared_memory);
    emu::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), shared_memory, params...);
  }
};

std::tuple<at::Tensor, at::Tensor> fuse_kv_emulated(
    const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
    const at::Tensor& scores, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t num_heavy, int64_t num_local, const std::optional<at::Tensor>& valid_len) {
  return fuse_kv_forward<EmulatedLauncher>(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy,
                                           num_local, valid_len);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fuse_kv_backward_emulated(const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& mem_k,
                          const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
                          const at::Tensor& scores, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& alpha, int64_t num_heavy,
                          int64_t num_local, const std::optional<at::Tensor>& valid_len) {
  return fuse_kv_backward<EmulatedLauncher>(grad_k, grad_v, mem_k, mem_v, new_k, new_v, scores, weight, bias,
                                            alpha, num_heavy, num_local, valid_len);
}

}  // namespace

TORCH_LIBRARY(lococo_emu, m) {
  m.def(LOCOCO_FUSE_KV_SCHEMA);
  m.def(LOCOCO_FUSE_KV_BACKWARD_SCHEMA);
}

TORCH_LIBRARY_IMPL(lococo_emu, CPU, m) {
  m.impl("fuse_kv", &fuse_kv_emulated);
  m.impl("fuse_kv_backward", &fuse_kv_backward_emulated);
}

}  // namespace lococo::cuda
