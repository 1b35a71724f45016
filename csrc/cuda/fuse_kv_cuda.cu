// CUDA registration of lococo::fuse_kv and lococo::fuse_kv_backward. The sequence of kernels is
// in fuse_kv_launch.h; the kernels of each element type are compiled in their own translation
// unit (fuse_kv_cuda_<type>.cu), so that a build runs them in parallel.
#include <torch/library.h>

#include "cuda_launcher.h"

namespace lococo::cuda {

LOCOCO_FUSE_KV_KERNELS(extern, float, CudaLauncher);
LOCOCO_FUSE_KV_KERNELS(extern, double, CudaLauncher);
LOCOCO_FUSE_KV_KERNELS(extern, __half, CudaLauncher);
LOCOCO_FUSE_KV_KERNELS(extern, __nv_bfloat16, CudaLauncher);

namespace {

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
