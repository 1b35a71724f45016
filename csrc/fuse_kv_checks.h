// Argument checks for torch.ops.lococo.fuse_kv, shared by every backend's launcher.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace lococo {

// Sizes of one call, read off validated arguments.
struct FuseKvShape {
  int64_t batch, heads, mem_len, new_len, d, num_fused, kernel, num_heavy, num_local;
  int64_t length() const { return mem_len + new_len; }
  int64_t slots() const { return num_heavy + num_fused; }
};

// Throws a c10::ValueError naming the offending argument and what was expected. The values of
// valid_len are read (a host sync on accelerators) only with check_values; the CUDA launcher
// skips that read, so that the op never waits for the device, and its kernels clamp each
// length to [0, La + Lb] as the reference does.
FuseKvShape check_fuse_kv_args(const at::Tensor& mem_k, const at::Tensor& mem_v,
                               const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& scores, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                               int64_t num_heavy, int64_t num_local,
                               const std::optional<at::Tensor>& valid_len, bool check_values = true);

// The gradients of the two outputs must have the shape of the outputs.
void check_fuse_kv_grads(const at::Tensor& grad_k, const at::Tensor& grad_v,
                         const FuseKvShape& shape, const at::Tensor& mem_k);

using FuseKvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>;

// The zero-filled outputs of fuse_kv_backward (gradients of mem_k, mem_v, new_k, new_v, weight,
// bias, alpha), contiguous, for every backend's launcher to fill.
FuseKvGrads zero_fuse_kv_grads(const at::Tensor& mem_k, const at::Tensor& mem_v,
                               const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& weight, const at::Tensor& alpha);

}  // namespace lococo
