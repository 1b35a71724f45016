// CPU launchers of lococo::fuse_kv and lococo::fuse_kv_backward: parallel over (row, head),
// the per-row math in fuse_kv_row.h, matrix products through ATen's BLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../fuse_kv_checks.h"
#include "conv_dft.h"
#include "fuse_kv_row.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace lococo {
namespace {

// Row-major C[m, n] = op(A) @ op(B) + beta * C on raw buffers, through at::mm (MKL/OpenBLAS).
template <typename Acc>
struct AtenGemm {
  void operator()(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const Acc* a,
                  int64_t lda, const Acc* b, int64_t ldb, Acc beta, Acc* c, int64_t ldc) const {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value);
    auto view = [&](const Acc* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
      return trans ? at::from_blob(const_cast<Acc*>(p), {cols, rows}, {ld, 1}, opts).t()
                   : at::from_blob(const_cast<Acc*>(p), {rows, cols}, {ld, 1}, opts);
    };
    at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    if (m == 0 || n == 0) return;
    if (beta == Acc(0)) {
      at::mm_out(out, view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb));
    } else {
      out.addmm_(view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb), beta, 1);
    }
  }
};

template <typename T>
cpu::RowCache<T> row_of(const at::Tensor& seg_a, const at::Tensor& seg_b, int64_t b, int64_t h) {
  auto seg = [&](const at::Tensor& t) {
    return cpu::Segment<T>{t.data_ptr<T>() + b * t.stride(0) + h * t.stride(1), t.size(2),
                           t.stride(2), t.stride(3)};
  };
  return {seg(seg_a), seg(seg_b)};
}

// Everything both directions need: accumulation-typed weight [k * 2d, C], bias, alpha, scores
// in float64 (exact for every float dtype), and the first valid entry of each batch row.
struct Prepared {
  at::Tensor bias, alpha, scores, start;
};

// The weight in the accumulation type, laid out [k * 2d, C] for the im2col product: built only
// by the paths that use it (the DFT path wants it tap-major instead).
at::Tensor weight_by_tap_channel(const at::Tensor& weight, at::ScalarType acc) {
  return weight.to(acc).permute({2, 1, 0}).contiguous();
}

Prepared prepare(const FuseKvShape& s, const at::Tensor& scores, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                 const std::optional<at::Tensor>& valid_len, at::ScalarType acc) {
  Prepared p;
  p.bias = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  p.alpha = alpha.to(acc).reshape({});
  p.scores = scores.to(at::kDouble).contiguous();
  p.start = valid_len.has_value() ? (s.length() - *valid_len).contiguous()
                                  : at::zeros({s.batch}, at::kLong);
  return p;
}

// Direct (im2col GEMM) or DFT-domain convolution: LOCOCO_CPU_CONV=direct|dft forces one (tests
// cover both), auto takes the DFT when it needs at most half the flops of the direct one.
bool use_dft(const std::vector<int64_t>& lengths, const cpu::Dims& dm) {
  const char* mode = std::getenv("LOCOCO_CPU_CONV");
  if (mode != nullptr && std::strcmp(mode, "direct") == 0) return false;
  if (mode != nullptr && std::strcmp(mode, "dft") == 0) return true;
  TORCH_CHECK(mode == nullptr || std::strcmp(mode, "auto") == 0,
              "LOCOCO_CPU_CONV must be auto, direct or dft, got ", mode);
  double direct = 0;
  for (int64_t n : lengths) direct += 2.0 * n * dm.kernel * dm.channels() * dm.num_fused;
  const auto plan = cpu::plan_dft(*std::max_element(lengths.begin(), lengths.end()), dm.kernel);
  return 2 * cpu::dft_flops(plan, lengths, dm.num_fused, dm.channels()) < direct;
}

// The direct convolution of many rows as few large GEMMs: rows are stacked into one im2col
// matrix (at most ~64 MiB at a time), so BLAS threads share the work however few rows there are.
template <typename Acc>
void conv_direct_stacked(const std::vector<int64_t>& todo, const std::vector<int64_t>& lengths,
                         const Acc* wt, const cpu::Dims& dm, std::vector<cpu::Workspace<Acc>>& ws,
                         AtenGemm<Acc>& gemm) {
  const int64_t width = dm.kernel * dm.channels(), C = dm.num_fused;
  const int64_t budget = std::max<int64_t>(1, (int64_t{64} << 20) / (sizeof(Acc) * width));
  const int64_t count = static_cast<int64_t>(todo.size());
  for (int64_t first = 0; first < count;) {
    std::vector<int64_t> offset{0};
    int64_t last = first;
    while (last < count && (last == first || offset.back() + lengths[last] <= budget)) {
      offset.push_back(offset.back() + lengths[last++]);
    }
    const int64_t total = offset.back();
    std::vector<Acc> cols(total * width), z(total * C);
    at::parallel_for(first, last, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) cpu::im2col(ws[todo[i]], dm, &cols[offset[i - first] * width]);
    });
    gemm(false, false, total, C, width, cols.data(), width, wt, C, Acc(0), z.data(), C);
    for (int64_t i = first; i < last; ++i) {
      ws[todo[i]].probs.assign(z.begin() + offset[i - first] * C, z.begin() + offset[i - first + 1] * C);
    }
    first = last;
  }
}

std::tuple<at::Tensor, at::Tensor> fuse_kv_cpu(
    const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k,
    const at::Tensor& new_v, const at::Tensor& scores, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& alpha, int64_t num_heavy,
    int64_t num_local, const std::optional<at::Tensor>& valid_len) {
  const FuseKvShape s = check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                           num_heavy, num_local, valid_len);
  auto out_k = at::empty({s.batch, s.heads, s.slots(), s.d}, mem_k.options());
  auto out_v = at::empty_like(out_k);
  if (out_k.numel() == 0) return {out_k, out_v};
  const cpu::Dims dm{s.d, s.num_heavy, s.num_local, s.num_fused, s.kernel};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem_k.scalar_type(), "fuse_kv_cpu", [&] {
    using T = scalar_t;
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const Prepared p = prepare(s, scores, weight, bias, alpha, valid_len,
                               c10::CppTypeToScalarType<Acc>::value);
    const Acc* bias_ptr = p.bias.defined() ? p.bias.data_ptr<Acc>() : nullptr;
    const Acc alpha_v = p.alpha.item<Acc>();
    const int64_t* start = p.start.data_ptr<int64_t>();
    const int64_t rows = s.batch * s.heads, out_stride = s.slots() * s.d;
    T* out_k_ptr = out_k.data_ptr<T>();
    T* out_v_ptr = out_v.data_ptr<T>();
    std::vector<cpu::Workspace<Acc>> ws(rows);
    std::vector<char> pending(rows, 0);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / s.heads, h = r % s.heads;
        pending[r] = cpu::begin_row(row_of<T>(mem_k, new_k, b, h), row_of<T>(mem_v, new_v, b, h),
                                    p.scores.data_ptr<double>() + r * s.length(), start[b], dm,
                                    out_k_ptr + r * out_stride, out_v_ptr + r * out_stride, ws[r]);
      }
    });
    // The convolution scores of every row still pending, by the cheaper of the two algorithms.
    std::vector<int64_t> todo, lengths;
    for (int64_t r = 0; r < rows; ++r) {
      if (pending[r]) {
        todo.push_back(r);
        lengths.push_back(static_cast<int64_t>(ws[r].sel.rest.size()));
      }
    }
    if (todo.empty()) return;
    AtenGemm<Acc> gemm;
    if (use_dft(lengths, dm)) {
      std::vector<const Acc*> xs;
      std::vector<Acc*> zs;
      for (int64_t r : todo) {
        ws[r].probs.resize(ws[r].sel.rest.size() * dm.num_fused);
        xs.push_back(ws[r].x.data());
        zs.push_back(ws[r].probs.data());
      }
      const auto w_taps = weight.to(c10::CppTypeToScalarType<Acc>::value).permute({2, 0, 1}).contiguous();
      const auto plan = cpu::plan_dft(*std::max_element(lengths.begin(), lengths.end()), dm.kernel);
      cpu::conv_dft(plan, xs, lengths, w_taps.data_ptr<Acc>(), dm.num_fused, dm.channels(), zs, gemm,
                    [](int64_t b, int64_t e, const auto& fn) { at::parallel_for(b, e, 1, fn); });
    } else {
      const auto wt = weight_by_tap_channel(weight, c10::CppTypeToScalarType<Acc>::value);
      conv_direct_stacked(todo, lengths, wt.data_ptr<Acc>(), dm, ws, gemm);
    }
    at::parallel_for(0, static_cast<int64_t>(todo.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = todo[i];
        cpu::finish_row(bias_ptr, alpha_v, dm, out_k_ptr + r * out_stride,
                        out_v_ptr + r * out_stride, ws[r], gemm);
      }
    });
  });
  return {out_k, out_v};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fuse_kv_backward_cpu(const at::Tensor& grad_k_in, const at::Tensor& grad_v_in,
                     const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k,
                     const at::Tensor& new_v, const at::Tensor& scores, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& alpha,
                     int64_t num_heavy, int64_t num_local,
                     const std::optional<at::Tensor>& valid_len) {
  const FuseKvShape s = check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                           num_heavy, num_local, valid_len);
  check_fuse_kv_grads(grad_k_in, grad_v_in, s, mem_k);
  const auto grad_k = grad_k_in.contiguous(), grad_v = grad_v_in.contiguous();
  at::Tensor d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha;
  std::tie(d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha) =
      zero_fuse_kv_grads(mem_k, mem_v, new_k, new_v, weight, alpha);
  const int64_t rows = s.batch * s.heads;
  if (rows == 0 || s.d == 0) return {d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha};
  const cpu::Dims dm{s.d, s.num_heavy, s.num_local, s.num_fused, s.kernel};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem_k.scalar_type(), "fuse_kv_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<Acc>::value;
    const Prepared p = prepare(s, scores, weight, bias, alpha, valid_len, acc);
    const at::Tensor wt_tensor = weight_by_tap_channel(weight, acc);
    const Acc* wt = wt_tensor.data_ptr<Acc>();
    const Acc* bias_ptr = p.bias.defined() ? p.bias.data_ptr<Acc>() : nullptr;
    const Acc alpha_v = p.alpha.item<Acc>();
    const int64_t* start = p.start.data_ptr<int64_t>();
    std::vector<cpu::RowGrads<Acc>> per_row(rows);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      cpu::Workspace<Acc> ws;
      AtenGemm<Acc> gemm;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / s.heads, h = r % s.heads;
        cpu::fuse_row_backward(row_of<T>(mem_k, new_k, b, h), row_of<T>(mem_v, new_v, b, h),
                               p.scores.data_ptr<double>() + r * s.length(), start[b], wt, bias_ptr,
                               alpha_v, dm, grad_k.data_ptr<T>() + r * s.slots() * s.d,
                               grad_v.data_ptr<T>() + r * s.slots() * s.d,
                               row_of<T>(d_mem_k, d_new_k, b, h), row_of<T>(d_mem_v, d_new_v, b, h),
                               per_row[r], ws, gemm);
      }
    });

    // Reductions over rows in a fixed order, so results do not depend on the thread count.
    const int64_t ch = dm.channels(), C = s.num_fused, taps = s.kernel;
    auto d_wt = at::zeros({taps, ch, C}, wt_tensor.options());
    Acc* d_wt_ptr = d_wt.data_ptr<Acc>();
    at::parallel_for(0, taps, 1, [&](int64_t begin, int64_t end) {
      AtenGemm<Acc> gemm;
      for (int64_t t = begin; t < end; ++t) {
        for (const auto& g : per_row) {
          if (g.n == 0) continue;
          gemm(true, false, ch, C, g.n, g.x_padded.data() + t * ch, ch, g.grad_z.data(), C, Acc(1),
               d_wt_ptr + t * ch * C, C);
        }
      }
    });
    d_weight.copy_(d_wt.permute({2, 1, 0}));
    auto d_bias_acc = at::zeros({C}, wt_tensor.options());
    Acc grad_alpha = Acc(0);
    for (const auto& g : per_row) {
      grad_alpha += g.grad_alpha;
      for (int64_t c = 0; c < C; ++c) d_bias_acc.data_ptr<Acc>()[c] += g.grad_bias[c];
    }
    d_bias.copy_(d_bias_acc);
    d_alpha.fill_(grad_alpha);
  });
  return {d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(lococo, CPU, m) {
  m.impl("fuse_kv", &fuse_kv_cpu);
  m.impl("fuse_kv_backward", &fuse_kv_backward_cpu);
}

}  // namespace lococo
