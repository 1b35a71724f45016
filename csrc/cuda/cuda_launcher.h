// The Launcher of fuse_kv_launch.h on a GPU: a device guard, the current stream, and kernel
// launches with their error checks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fuse_kv_launch.h"

namespace lococo::cuda {

constexpr size_t kDefaultSharedMemory = 48 * 1024;

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Device& device)
      : guard_(device), stream_(c10::cuda::getCurrentCUDAStream(device.index()).stream()) {
    const int index = device.index();
    int major = 0, minor = 0, optin = 0, multiprocessors = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, index));
    multiprocessors_ = multiprocessors;
    compute_capability_ = 10 * major + minor;
    max_shared_memory_ = static_cast<size_t>(optin);
  }

  int compute_capability() const { return compute_capability_; }
  size_t max_shared_memory() const { return max_shared_memory_; }
  int multiprocessor_count() const { return multiprocessors_; }

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
  int multiprocessors_ = 0;
};

}  // namespace lococo::cuda
