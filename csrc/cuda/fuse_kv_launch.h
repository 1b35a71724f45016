// The launch sequence of lococo::fuse_kv and lococo::fuse_kv_backward on CUDA, written once
// against a `Launcher` (the real one in fuse_kv_cuda.cu; emulation/ runs the same sequence
// on the CPU). A Launcher is built from the device after the argument checks; it holds the
// device guard and stream, reports compute_capability() and max_shared_memory(), and launches
// with launch(kernel, blocks, threads, shared_bytes, params...). Tensors are allocated with ATen on the inputs' device; kernels live in the
// .cuh headers next to this file.
//
// Path choice: the tensor-core forward (mma_forward.cuh) runs for fp16/bf16/fp32 on sm_80 and
// newer when d % 8 == 0, 2d <= 1024 and its shared memory fits; everything else, float64
// included, runs the generic SIMT kernels (LOCOCO_CUDA_PATH below lets tests pick a path).
// The backward always runs the generic kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../fuse_kv_checks.h"
#include "generic_kernels.cuh"
#include "mma_forward.cuh"
#include "select_kernel.cuh"

namespace lococo::cuda {

// The element type the kernels use for an ATen scalar type.
template <typename T>
struct KernelType {
  using type = T;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// LOCOCO_CUDA_PATH: auto (default) picks the tensor-core forward where it applies, mma
// requires it (an error names why it does not apply), simt forces the generic kernels.
enum class ForwardPath { kAuto, kMma, kSimt };

inline ForwardPath requested_forward_path() {
  const char* v = std::getenv("LOCOCO_CUDA_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return ForwardPath::kAuto;
  if (std::strcmp(v, "mma") == 0) return ForwardPath::kMma;
  TORCH_CHECK(std::strcmp(v, "simt") == 0, "LOCOCO_CUDA_PATH must be auto, mma or simt, got '", v, "'");
  return ForwardPath::kSimt;
}

template <typename T>
Strided4<T> strided(const at::Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
CacheEntries<T> entries(const at::Tensor& mem, const at::Tensor& fresh) {
  return {strided<T>(mem), strided<T>(fresh), static_cast<int>(mem.size(2)), static_cast<int>(mem.size(1))};
}

inline int64_t checked_blocks(int64_t blocks, const char* kernel) {
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fuse_kv: ", kernel, " would need ", blocks,
              " thread blocks, more than CUDA's grid limit of 2^31 - 1");
  return blocks;
}

// Index scratch of the selection, owned for the duration of one op call.
struct SelectionBuffers {
  at::Tensor valid, heavy, rest, picks, pick_slot;
  Selection view() const {
    return {valid.data_ptr<int32_t>(), heavy.data_ptr<int32_t>(), rest.data_ptr<int32_t>(),
            picks.data_ptr<int32_t>(), pick_slot.data_ptr<int32_t>()};
  }
};

inline Problem problem_of(const FuseKvShape& s) {
  TORCH_CHECK(s.length() < (int64_t{1} << 31) && s.batch * s.heads < (int64_t{1} << 31),
              "fuse_kv: the CUDA kernels index rows and positions with 32-bit integers; got ",
              s.batch * s.heads, " rows of ", s.length(), " entries");
  return {static_cast<int>(s.batch * s.heads), static_cast<int>(s.heads), static_cast<int>(s.length()),
          static_cast<int>(s.d), static_cast<int>(s.num_heavy), static_cast<int>(s.num_local),
          static_cast<int>(s.num_fused), static_cast<int>(s.kernel)};
}

template <typename Launcher>
SelectionBuffers select_entries(Launcher& launch, const Problem& pb, const at::Tensor& scores,
                                const std::optional<at::Tensor>& valid_len) {
  const auto opts = scores.options().dtype(at::kInt);
  SelectionBuffers buf{at::empty({pb.rows}, opts), at::empty({pb.rows, pb.num_heavy}, opts),
                       at::empty({pb.rows, pb.rest_stride()}, opts), at::empty({pb.rows, pb.num_fused}, opts),
                       at::empty({pb.rows, pb.rest_stride()}, opts)};
  const at::Tensor scores_d = scores.to(at::kDouble).contiguous();
  at::Tensor valid;
  if (valid_len.has_value()) valid = valid_len->contiguous();
  SelectArgs args{pb, buf.view(), scores_d.data_ptr<double>(),
                  valid.defined() ? valid.data_ptr<int64_t>() : nullptr};
  SharedCarver carver{nullptr};
  SelectShared::carve(carver, kSelectThreads);
  launch(select_kernel, pb.rows, kSelectThreads, carver.size(), args);
  return buf;
}

// Weights, bias and alpha in the accumulation type, as the generic kernels read them.
struct AccParams {
  at::Tensor weight, bias, alpha;
};

inline AccParams acc_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& alpha) {
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {weight.to(acc).contiguous(), bias.has_value() ? bias->to(acc).contiguous() : at::Tensor(),
          alpha.to(acc).reshape({1}).contiguous()};
}

template <typename T>
FuseArgs<T> fuse_args(const Problem& pb, const SelectionBuffers& sel, const at::Tensor& mem_k,
                      const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
                      const AccParams& p) {
  using Acc = acc_t<T>;
  FuseArgs<T> a{};
  a.pb = pb;
  a.sel = sel.view();
  a.keys = entries<const T>(mem_k, new_k);
  a.values = entries<const T>(mem_v, new_v);
  a.weight = p.weight.data_ptr<Acc>();
  a.bias = p.bias.defined() ? p.bias.data_ptr<Acc>() : nullptr;
  a.alpha = p.alpha.data_ptr<Acc>();
  return a;
}

template <typename T, typename Launcher>
void launch_generic_forward(Launcher& launch, const FuseArgs<T>& a) {
  SharedCarver carver{nullptr};
  GenericShared<acc_t<T>>::carve(carver, a.pb.channels(), kGenericThreads);
  launch(generic_fuse_kernel<T, false>, checked_blocks(int64_t{a.pb.rows} * a.pb.num_fused, "generic_fuse_kernel"),
         kGenericThreads, carver.size(), a);
}

// Launches the tensor-core forward if it supports this call; otherwise returns why not.
template <typename T, typename Launcher>
const char* try_mma_forward(Launcher& launch, const FuseArgs<T>& a, const at::Tensor& weight) {
  if constexpr (std::is_same_v<T, double>) {
    return "float64 runs on the SIMT kernels";
  } else {
    const Problem& pb = a.pb;
    const int ch2 = pb.channels();
    if (launch.compute_capability() < 80) return "tensor-core kernels need compute capability 8.0 or newer";
    if (pb.d % 8 != 0) return "the head dim d is not a multiple of 8";
    if (ch2 > kMmaMaxSlotChannels / 16) return "the head dim d is over 512";
    const int slots_per_block = ch2 <= 256 ? 64 : ch2 <= 512 ? 32 : 16;
    const int64_t c_pad = ceil_div(pb.num_fused, slots_per_block) * int64_t{slots_per_block};
    using Ops = MmaOps<T>;
    using S = typename Ops::Stored;
    // The largest weight chunk (channels of one tap in shared memory) that fits.
    auto smem_for = [&](int chunk) {
      SharedCarver carver{nullptr};
      switch (slots_per_block) {
        case 64: MmaShared<S, 64>::carve(carver, ch2, pb.kernel, chunk, Ops::kPParts); break;
        case 32: MmaShared<S, 32>::carve(carver, ch2, pb.kernel, chunk, Ops::kPParts); break;
        default: MmaShared<S, 16>::carve(carver, ch2, pb.kernel, chunk, Ops::kPParts); break;
      }
      return carver.size();
    };
    int chunk = ch2;
    while (chunk > 16 && smem_for(chunk) > launch.max_shared_memory()) chunk = ceil_div(chunk / 2, 16) * 16;
    const size_t smem = smem_for(chunk);
    if (smem > launch.max_shared_memory()) return "the tile of X with its k - 1 halo rows does not fit in shared memory";

    at::Tensor w = at::zeros({pb.kernel, ch2, c_pad}, weight.options());
    w.narrow(2, 0, pb.num_fused).copy_(weight.permute({2, 1, 0}));
    const MmaWeights<T> mw{reinterpret_cast<const T*>(w.data_ptr()), static_cast<int>(c_pad), chunk};
    const int64_t blocks = checked_blocks(pb.rows * (c_pad / slots_per_block), "mma_fuse_kernel");
    switch (slots_per_block) {
      case 64: launch(mma_fuse_kernel<T, 64>, blocks, kMmaThreads, smem, a, mw); break;
      case 32: launch(mma_fuse_kernel<T, 32>, blocks, kMmaThreads, smem, a, mw); break;
      default: launch(mma_fuse_kernel<T, 16>, blocks, kMmaThreads, smem, a, mw); break;
    }
    return nullptr;
  }
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> fuse_kv_forward(
    const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k,
    const at::Tensor& new_v, const at::Tensor& scores, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& alpha, int64_t num_heavy, int64_t num_local,
    const std::optional<at::Tensor>& valid_len) {
  const FuseKvShape s = check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                           num_heavy, num_local, valid_len);
  Launcher launch(mem_k.device());  // after the checks: they name a tensor on the wrong device
  auto out_k = at::empty({s.batch, s.heads, s.slots(), s.d}, mem_k.options());
  auto out_v = at::empty_like(out_k);
  if (out_k.numel() == 0) return {out_k, out_v};
  const Problem pb = problem_of(s);
  const ForwardPath path = requested_forward_path();
  const SelectionBuffers sel = select_entries(launch, pb, scores, valid_len);
  const AccParams params = acc_params(weight, bias, alpha);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem_k.scalar_type(), "fuse_kv_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    FuseArgs<T> a = fuse_args<T>(pb, sel, mem_k, mem_v, new_k, new_v, params);
    a.out_k = reinterpret_cast<T*>(out_k.data_ptr());
    a.out_v = reinterpret_cast<T*>(out_v.data_ptr());
    launch(copy_kept_kernel<T>, pb.rows, kCopyThreads, 0, a);
    if (pb.num_fused == 0) return;
    const char* why_not = path == ForwardPath::kSimt ? "LOCOCO_CUDA_PATH=simt" : try_mma_forward(launch, a, weight);
    TORCH_CHECK(why_not == nullptr || path != ForwardPath::kMma,
                "fuse_kv: LOCOCO_CUDA_PATH=mma but the tensor-core kernel does not apply: ", why_not);
    if (why_not != nullptr) launch_generic_forward(launch, a);
  });
  return {out_k, out_v};
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fuse_kv_backward(const at::Tensor& grad_k_in, const at::Tensor& grad_v_in,
                 const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k,
                 const at::Tensor& new_v, const at::Tensor& scores, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& alpha, int64_t num_heavy,
                 int64_t num_local, const std::optional<at::Tensor>& valid_len) {
  const FuseKvShape s = check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                           num_heavy, num_local, valid_len);
  check_fuse_kv_grads(grad_k_in, grad_v_in, s, mem_k);
  Launcher launch(mem_k.device());
  auto d_mem_k = at::zeros_like(mem_k, at::MemoryFormat::Contiguous);
  auto d_mem_v = at::zeros_like(mem_v, at::MemoryFormat::Contiguous);
  auto d_new_k = at::zeros_like(new_k, at::MemoryFormat::Contiguous);
  auto d_new_v = at::zeros_like(new_v, at::MemoryFormat::Contiguous);
  auto d_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  auto d_bias = at::zeros({s.num_fused}, weight.options());
  auto d_alpha = at::zeros_like(alpha);
  if (s.batch * s.heads == 0 || s.d == 0) return {d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha};
  const Problem pb = problem_of(s);
  const auto grad_k = grad_k_in.contiguous(), grad_v = grad_v_in.contiguous();
  const SelectionBuffers sel = select_entries(launch, pb, scores, valid_len);
  const AccParams params = acc_params(weight, bias, alpha);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem_k.scalar_type(), "fuse_kv_backward_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = acc_t<T>;
    FuseArgs<T> a = fuse_args<T>(pb, sel, mem_k, mem_v, new_k, new_v, params);
    a.grad_k = reinterpret_cast<const T*>(grad_k.data_ptr());
    a.grad_v = reinterpret_cast<const T*>(grad_v.data_ptr());
    a.d_keys = entries<T>(d_mem_k, d_new_k);
    a.d_values = entries<T>(d_mem_v, d_new_v);
    launch(scatter_kept_grad_kernel<T>, pb.rows, kCopyThreads, 0, a);
    if (pb.num_fused == 0) return;

    const auto acc_opts = params.weight.options();
    const int C = pb.num_fused, stride = pb.rest_stride(), ch2 = pb.channels();
    const at::Tensor stats = at::zeros({pb.rows, C, kStatCount}, acc_opts);
    const at::Tensor probs = at::empty({pb.rows, C, stride}, acc_opts);
    const at::Tensor grad_z = at::empty({pb.rows, C, stride}, acc_opts);
    const at::Tensor grad_bias_rows = at::zeros({pb.rows, C}, acc_opts);
    const at::Tensor grad_weight = at::empty({pb.kernel, ch2, C}, acc_opts);
    const at::Tensor grad_bias = at::empty({C}, acc_opts);
    const at::Tensor grad_alpha = at::empty({1}, acc_opts);
    a.stats = stats.data_ptr<Acc>();
    a.probs = probs.data_ptr<Acc>();
    a.grad_z = grad_z.data_ptr<Acc>();
    a.grad_bias_rows = grad_bias_rows.data_ptr<Acc>();
    a.grad_weight = grad_weight.data_ptr<Acc>();
    a.grad_bias = grad_bias.data_ptr<Acc>();
    a.grad_alpha = grad_alpha.data_ptr<Acc>();

    const int64_t slot_blocks = checked_blocks(int64_t{pb.rows} * C, "generic_fuse_kernel");
    SharedCarver fuse_carver{nullptr};
    GenericShared<Acc>::carve(fuse_carver, ch2, kGenericThreads);
    launch(generic_fuse_kernel<T, true>, slot_blocks, kGenericThreads, fuse_carver.size(), a);
    SharedCarver reduce_carver{nullptr};
    reduce_carver.take<Acc>(block_scratch_count<Acc>(kGenericThreads));
    launch(generic_grad_z_kernel<T>, slot_blocks, kGenericThreads, reduce_carver.size(), a);
    launch(generic_grad_x_kernel<T>, checked_blocks(int64_t{pb.rows} * stride, "generic_grad_x_kernel"),
           kGenericThreads, 0, a);
    launch(generic_grad_weight_kernel<T>,
           checked_blocks((int64_t{pb.kernel} * ch2 * C + kGenericThreads - 1) / kGenericThreads,
                          "generic_grad_weight_kernel"),
           kGenericThreads, 0, a);
    launch(generic_grad_bias_alpha_kernel<T>, 1, kGenericThreads, reduce_carver.size(), a);

    d_weight.copy_(grad_weight.permute({2, 1, 0}));
    d_bias.copy_(grad_bias);
    d_alpha.copy_(grad_alpha.reshape(d_alpha.sizes()));
  });
  return {d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha};
}

}  // namespace lococo::cuda
