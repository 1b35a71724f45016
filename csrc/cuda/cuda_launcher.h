// The Launcher of fuse_kv_launch.h on a GPU: a device guard, the current stream, and kernel
// launches with their error checks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <unordered_map>

#include "fuse_kv_launch.h"

namespace lococo::cuda {

constexpr size_t kDefaultSharedMemory = 48 * 1024;

// What the launch sequence asks of a GPU, queried once per device (not on every op call).
struct DeviceLimits {
  int compute_capability, multiprocessors;
  size_t max_shared_memory;
};

inline DeviceLimits device_limits(int index) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceLimits> known;
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(index); it != known.end()) return it->second;
  int major = 0, minor = 0, optin = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, index));
  const DeviceLimits limits{10 * major + minor, multiprocessors, static_cast<size_t>(optin)};
  known.emplace(index, limits);
  return limits;
}

class CudaLauncher {
 public:
  explicit CudaLauncher(const at::Device& device)
      : guard_(device),
        stream_(c10::cuda::getCurrentCUDAStream(device.index()).stream()),
        limits_(device_limits(device.index())) {}

  int compute_capability() const { return limits_.compute_capability; }
  size_t max_shared_memory() const { return limits_.max_shared_memory; }
  int multiprocessor_count() const { return limits_.multiprocessors; }

  template <typename... Params>
  void operator()(void (*kernel)(Params...), int64_t blocks, int threads, size_t shared_memory,
                  const Params&... params) const {
    TORCH_CHECK(shared_memory <= limits_.max_shared_memory, "fuse_kv: a kernel needs ", shared_memory,
                " bytes of shared memory but this GPU allows ", limits_.max_shared_memory,
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
  DeviceLimits limits_;
};

}  // namespace lococo::cuda
