#include "fuse_kv_checks.h"

#include <ATen/ATen.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace lococo {
namespace {

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& mem_k) {
  TORCH_CHECK_VALUE(t.device() == mem_k.device(), "fuse_kv: ", name, " is on ", t.device(),
              " but mem_k is on ", mem_k.device(), "; all tensors must be on one device");
}

void check_kv(const at::Tensor& t, const char* name, const at::Tensor& mem_k) {
  TORCH_CHECK_VALUE(t.dim() == 4, "fuse_kv: ", name, " must have rank 4 [batch, heads, seq, d], got rank ",
              t.dim());
  check_same_device(t, name, mem_k);
  TORCH_CHECK_VALUE(t.scalar_type() == mem_k.scalar_type(), "fuse_kv: ", name, " has dtype ",
              t.scalar_type(), " but mem_k has dtype ", mem_k.scalar_type());
}

}  // namespace

FuseKvShape check_fuse_kv_args(const at::Tensor& mem_k, const at::Tensor& mem_v,
                               const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& scores, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                               int64_t num_heavy, int64_t num_local,
                               const std::optional<at::Tensor>& valid_len, bool check_values) {
  const auto dtype = mem_k.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              "fuse_kv: mem_k must be float32, float16, bfloat16 or float64, got ", dtype);
  check_kv(mem_k, "mem_k", mem_k);
  check_kv(mem_v, "mem_v", mem_k);
  check_kv(new_k, "new_k", mem_k);
  check_kv(new_v, "new_v", mem_k);
  const int64_t b = mem_k.size(0), h = mem_k.size(1), la = mem_k.size(2), d = mem_k.size(3);
  const int64_t lb = new_k.size(2);
  TORCH_CHECK_VALUE(mem_v.sizes() == mem_k.sizes(), "fuse_kv: mem_v must have the shape of mem_k ",
              mem_k.sizes(), ", got ", mem_v.sizes());
  TORCH_CHECK_VALUE(new_k.size(0) == b && new_k.size(1) == h && new_k.size(3) == d,
              "fuse_kv: new_k must be [", b, ", ", h, ", Lb, ", d, "] to match mem_k, got ",
              new_k.sizes());
  TORCH_CHECK_VALUE(new_v.sizes() == new_k.sizes(), "fuse_kv: new_v must have the shape of new_k ",
              new_k.sizes(), ", got ", new_v.sizes());

  TORCH_CHECK_VALUE(scores.dim() == 3 && scores.size(0) == b && scores.size(1) == h &&
                  scores.size(2) == la + lb,
              "fuse_kv: scores must be [", b, ", ", h, ", ", la + lb, "] (batch, heads, La + Lb), got ",
              scores.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(scores.scalar_type()), "fuse_kv: scores must be a float tensor, got ",
              scores.scalar_type());
  check_same_device(scores, "scores", mem_k);

  TORCH_CHECK_VALUE(weight.dim() == 3, "fuse_kv: weight must have rank 3 [C, 2d, k], got rank ", weight.dim());
  check_same_device(weight, "weight", mem_k);
  TORCH_CHECK_VALUE(weight.scalar_type() == dtype, "fuse_kv: weight has dtype ", weight.scalar_type(),
              " but mem_k has dtype ", dtype);
  const int64_t c = weight.size(0), k = weight.size(2);
  TORCH_CHECK_VALUE(weight.size(1) == 2 * d, "fuse_kv: weight must have 2d = ", 2 * d,
              " input channels (keys and values of head dim ", d, "), got ", weight.size(1));
  TORCH_CHECK_VALUE(k % 2 == 1, "fuse_kv: weight kernel size must be odd, got ", k);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c, "fuse_kv: bias must be [", c, "], got ",
                bias->sizes());
    check_same_device(*bias, "bias", mem_k);
    TORCH_CHECK_VALUE(bias->scalar_type() == dtype, "fuse_kv: bias has dtype ", bias->scalar_type(),
                " but mem_k has dtype ", dtype);
  }
  TORCH_CHECK_VALUE(alpha.numel() == 1 && alpha.dim() <= 1,
              "fuse_kv: alpha must be a 0-d or 1-element tensor, got shape ", alpha.sizes());
  check_same_device(alpha, "alpha", mem_k);
  TORCH_CHECK_VALUE(alpha.scalar_type() == dtype, "fuse_kv: alpha has dtype ", alpha.scalar_type(),
              " but mem_k has dtype ", dtype);

  TORCH_CHECK_VALUE(num_heavy >= 0, "fuse_kv: num_heavy must be >= 0, got ", num_heavy);
  TORCH_CHECK_VALUE(num_local >= 0 && num_local <= num_heavy, "fuse_kv: num_local must be in [0, num_heavy = ",
              num_heavy, "], got ", num_local);
  // Compared without forming num_heavy + C, which overflows for num_heavy near INT64_MAX.
  TORCH_CHECK_VALUE(num_heavy <= la + lb - c, "fuse_kv: num_heavy + C = ",
              num_heavy <= INT64_MAX - c ? std::to_string(num_heavy + c)
                                         : std::to_string(num_heavy) + " + " + std::to_string(c),
              " slots exceed the La + Lb = ", la + lb, " cached entries");
  if (valid_len.has_value()) {
    TORCH_CHECK_VALUE(valid_len->scalar_type() == at::kLong, "fuse_kv: valid_len must be int64, got ",
                valid_len->scalar_type());
    TORCH_CHECK_VALUE(valid_len->dim() == 1 && valid_len->size(0) == b, "fuse_kv: valid_len must be [", b,
                "], got ", valid_len->sizes());
    check_same_device(*valid_len, "valid_len", mem_k);
    if (check_values && valid_len->numel() > 0) {
      const auto lo = valid_len->min().item<int64_t>(), hi = valid_len->max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi <= la + lb, "fuse_kv: valid_len entries must be in [0, La + Lb = ",
                  la + lb, "], got values in [", lo, ", ", hi, "]");
    }
  }
  return {b, h, la, lb, d, c, k, num_heavy, num_local};
}

void check_fuse_kv_grads(const at::Tensor& grad_k, const at::Tensor& grad_v,
                         const FuseKvShape& s, const at::Tensor& mem_k) {
  const std::vector<int64_t> want_v{s.batch, s.heads, s.slots(), s.d};
  const at::IntArrayRef want(want_v);
  TORCH_CHECK_VALUE(grad_k.sizes() == want, "fuse_kv_backward: grad_k must be ", want, ", got ", grad_k.sizes());
  TORCH_CHECK_VALUE(grad_v.sizes() == want, "fuse_kv_backward: grad_v must be ", want, ", got ", grad_v.sizes());
  TORCH_CHECK_VALUE(grad_k.scalar_type() == mem_k.scalar_type() && grad_v.scalar_type() == mem_k.scalar_type(),
              "fuse_kv_backward: grad_k and grad_v must have the dtype of mem_k");
  check_same_device(grad_k, "grad_k", mem_k);
  check_same_device(grad_v, "grad_v", mem_k);
}

FuseKvGrads zero_fuse_kv_grads(const at::Tensor& mem_k, const at::Tensor& mem_v,
                               const at::Tensor& new_k, const at::Tensor& new_v,
                               const at::Tensor& weight, const at::Tensor& alpha) {
  const auto contiguous = at::MemoryFormat::Contiguous;
  return {at::zeros_like(mem_k, contiguous), at::zeros_like(mem_v, contiguous),
          at::zeros_like(new_k, contiguous), at::zeros_like(new_v, contiguous),
          at::zeros_like(weight, contiguous), at::zeros({weight.size(0)}, weight.options()),
          at::zeros_like(alpha)};
}

}  // namespace lococo
