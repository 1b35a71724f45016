// CUDA registration of lococo::fuse_kv and lococo::fuse_kv_backward: a device guard, the
// current stream, and kernel launches with their error checks. The sequence of kernels is in
// fuse_kv_launch.h.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fuse_kv_launch.h"

namespace lococo::cuda {
namespace {

constexpr size_t kDefaultSharedMemory = 48 * 1024;

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Device& device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream(device.index()).stream()) {
    const int index = device.index();
    int major = 0, minor = 0, optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
    compute_capability_ = 10 * major + minor;
    max_shared_memory_ = static_cast<size_t>(optin);
  }

  int compute_capability() const { return compute_capability_; }
  size_t max_shared_memory() const { return max_shared_memory_; }

  template <typename... Params>
  void operator()(void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_memory,
                  const Params&... params) const {
    TORCH_CHECK(shared_memory <= max_shared_memory_, "fuse_kv: a kernel needs ", shared_memory,
                " bytes of shared memory but this GPU allows ", max_shared_memory_,
                " per block (the head dim is too large for the generic CUDA kernel)");
    if (shared_memory > kDefaultSharedMemory) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared_memory)));
    }
    kernel<<<static_cast<unsigned>(blocks), threads, shared_memory, stream_>>>(params...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
  int compute_capability_ = 0;
  size_t max_shared_memory_ = 0;
};

std::tuple<at::Tensor, at::Tensor> fuse_kv_cuda(
    const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
    const at::Tensor& scores, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t num_heavy, int64_t num_local, const std::optional<at::Tensor>& valid_len) {
  return fuse_kv_forward<CudaLauncher>(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy, num_local,
                         valid_len);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fuse_kv_backward_cuda(const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& mem_k,
                      const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
                      const at::Tensor& scores, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& alpha, int64_t num_heavy, int64_t num_local,
                      const std::optional<at::Tensor>& valid_len) {
  return fuse_kv_backward<CudaLauncher>(grad_k, grad_v, mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                          num_heavy, num_local, valid_len);
}

}  // namespace

TORCH_LIBRARY_IMPL(lococo, CUDA, m) {
  m.impl("fuse_kv", &fuse_kv_cuda);
  m.impl("fuse_kv_backward", &fuse_kv_backward_cuda);
}

}  // namespace lococo::cuda
