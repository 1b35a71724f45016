// The launch sequence of lococo::fuse_kv and lococo::fuse_kv_backward on CUDA, written once
// against a `Launcher` (the real one in fuse_kv_cuda.cu; tools/emulator runs the same sequence
// on the CPU). A Launcher is built from the device after the argument checks; it holds the
// device guard and stream, reports compute_capability(), max_shared_memory() and
// multiprocessor_count(), and launches with launch(kernel, blocks, threads, shared_bytes,
// params...).
//
// Path choice: the tensor-core kernels (mma_forward.cuh, mma_backward.cuh) run for fp16, bf16
// and fp32 on sm_80 and newer when d % 8 == 0, d <= 512 and their shared memory fits (the
// k - 1 halo rows grow with the kernel size); everything else, float64 included, runs the
// generic SIMT kernels. LOCOCO_CUDA_PATH (below) lets tests pick a path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../fuse_kv_checks.h"
#include "prepared_weights.h"
#include "generic_kernels.cuh"
#include "mma_backward.cuh"
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

// LOCOCO_CUDA_PATH, for the forward and the backward: auto (default) takes the tensor-core
// kernels where they apply, mma requires them (an error names why they do not apply), simt
// forces the generic kernels.
enum class KernelPath { kAuto, kMma, kSimt };

inline KernelPath requested_kernel_path() {
  const char* v = std::getenv("LOCOCO_CUDA_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return KernelPath::kAuto;
  if (std::strcmp(v, "mma") == 0) return KernelPath::kMma;
  TORCH_CHECK(std::strcmp(v, "simt") == 0, "LOCOCO_CUDA_PATH must be auto, mma or simt, got '", v, "'");
  return KernelPath::kSimt;
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
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), "fuse_kv: ", kernel, " would need ", blocks,
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
  TORCH_CHECK_VALUE(s.length() < (int64_t{1} << 31) && s.batch * s.heads < (int64_t{1} << 31),
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
  const at::Tensor scores_rows = scores.contiguous();
  at::Tensor valid;
  if (valid_len.has_value()) valid = valid_len->contiguous();
  const int64_t* valid_ptr = valid.defined() ? valid.data_ptr<int64_t>() : nullptr;
  SharedCarver carver{nullptr};
  SelectShared::carve(carver, kSelectThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "fuse_kv_select", [&] {
    using S = typename KernelType<scalar_t>::type;
    const SelectArgs<S> args{pb, buf.view(), reinterpret_cast<const S*>(scores_rows.data_ptr()), valid_ptr};
    launch(select_kernel<S>, pb.rows, kSelectThreads, carver.size(), args);
  });
  return buf;
}

inline int64_t copy_blocks(const Problem& pb) {
  return checked_blocks(int64_t{pb.rows} * ceil_div(pb.slots(), kCopySlotsPerBlock), "copy_kept_kernel");
}

// Shared memory of a kernel whose only shared memory is the block reduction scratch.
template <typename Acc>
size_t block_scratch_bytes() {
  SharedCarver carver{nullptr};
  carver.take<Acc>(block_scratch_count<Acc>(kGenericThreads));
  return carver.size();
}

// Weight, bias and alpha as the kernels read them: in the element type, contiguous (no copy
// unless a caller passes a strided one), converted to the accumulation type on load.
struct Params {
  at::Tensor weight, bias, alpha;
};

inline Params contiguous_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& alpha) {
  return {weight.contiguous(), bias.has_value() ? bias->contiguous() : at::Tensor(), alpha.contiguous()};
}

template <typename T>
FuseArgs<T> fuse_args(const Problem& pb, const SelectionBuffers& sel, const at::Tensor& mem_k,
                      const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
                      const Params& p) {
  FuseArgs<T> a{};
  a.pb = pb;
  a.sel = sel.view();
  a.keys = entries<const T>(mem_k, new_k);
  a.values = entries<const T>(mem_v, new_v);
  a.weight = reinterpret_cast<const T*>(p.weight.data_ptr());
  a.bias = p.bias.defined() ? reinterpret_cast<const T*>(p.bias.data_ptr()) : nullptr;
  a.alpha = reinterpret_cast<const T*>(p.alpha.data_ptr());
  return a;
}

template <typename T, typename Launcher>
void launch_generic_forward(Launcher& launch, const FuseArgs<T>& a) {
  SharedCarver carver{nullptr};
  GenericShared<acc_t<T>>::carve(carver, a.pb.channels(), kGenericThreads);
  launch(generic_fuse_kernel<T, false>, checked_blocks(int64_t{a.pb.rows} * a.pb.num_fused, "generic_fuse_kernel"),
         kGenericThreads, carver.size(), a);
}

// Calls f(std::integral_constant<int, CB>) for the slots per block of the tensor-core kernels.
template <typename F>
decltype(auto) with_slots_per_block(int slots_per_block, F&& f) {
  switch (slots_per_block) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

// How the tensor-core kernels run one call, or why they do not apply (why_not).
struct MmaPlan {
  const char* why_not = nullptr;
  int slots_per_block = 0, w_chunk = 0;
  int64_t c_pad = 0;
  size_t fuse_smem = 0, grad_z_smem = 0, grad_x_smem = 0, grad_weight_smem = 0;
};

template <typename T, typename Launcher>
MmaPlan plan_mma(const Launcher& launch, const Problem& pb, bool backward) {
  MmaPlan plan;
  if constexpr (std::is_same_v<T, double>) {
    plan.why_not = "float64 runs on the SIMT kernels";
  } else {
    using Ops = MmaOps<T>;
    using S = typename Ops::Stored;
    const int ch2 = pb.channels();
    const size_t limit = launch.max_shared_memory();
    if (launch.compute_capability() < 80) {
      plan.why_not = "tensor-core kernels need compute capability 8.0 or newer";
    } else if (pb.d % 8 != 0) {
      plan.why_not = "the head dim d is not a multiple of 8";
    } else if (ch2 > kMmaMaxSlotChannels / 16) {
      plan.why_not = "the head dim d is over 512";
    }
    if (plan.why_not) return plan;
    plan.slots_per_block = mma_slots_per_block(ch2);
    plan.c_pad = ceil_div(pb.num_fused, plan.slots_per_block) * int64_t{plan.slots_per_block};
    // The largest weight chunk (channels of one tap in shared memory) with which all fit.
    auto sizes = [&](int chunk) {
      return with_slots_per_block(plan.slots_per_block, [&](auto cb) {
        SharedCarver fuse{nullptr}, grad_z{nullptr};
        MmaForwardShared<S, cb.value>::carve(fuse, ch2, pb.kernel, chunk, Ops::kPParts, backward);
        if (backward) MmaGradZShared<S, cb.value>::carve(grad_z, ch2, pb.kernel, chunk);
        return std::pair<size_t, size_t>{fuse.size(), grad_z.size()};
      });
    };
    int chunk = ch2;
    auto fits = [&](int c) { return std::max(sizes(c).first, sizes(c).second) <= limit; };
    while (chunk > 16 && !fits(chunk)) chunk = ceil_div(chunk / 2, 16) * 16;
    plan.w_chunk = chunk;
    std::tie(plan.fuse_smem, plan.grad_z_smem) = sizes(chunk);
    if (backward) {
      SharedCarver grad_x{nullptr}, grad_weight{nullptr};
      MmaGradXShared::carve(grad_x, pb.kernel);
      MmaGradWeightShared::carve(grad_weight);
      plan.grad_x_smem = grad_x.size();
      plan.grad_weight_smem = grad_weight.size();
    }
    if (std::max({plan.fuse_smem, plan.grad_z_smem, plan.grad_x_smem, plan.grad_weight_smem}) > limit) {
      plan.why_not = "the tiles with their k - 1 halo rows do not fit in shared memory";
    }
  }
  return plan;
}

// The weights as [k, 2d, C_pad] in the tensor-core operand type, zero past C (cached).
inline at::Tensor mma_weights(const at::Tensor& weight, const MmaPlan& plan) {
  return prepared_weights().get(weight, plan.c_pad, [&] {
    at::Tensor w = at::zeros({weight.size(2), weight.size(1), plan.c_pad}, weight.options());
    w.narrow(2, 0, weight.size(0)).copy_(weight.detach().permute({2, 1, 0}));
    return w;
  });
}

// The weights as [k, C, 2d] in float, as the tensor-core backward's grad_x reads them (cached).
inline at::Tensor weights_by_tap(const at::Tensor& weight) {
  return prepared_weights().get(weight, PreparedWeights::kByTap, [&] {
    return weight.detach().to(at::kFloat).permute({2, 0, 1}).contiguous();
  });
}

template <typename T>
MmaWeights<T> mma_weight_args(const at::Tensor& w, const MmaPlan& plan) {
  return {reinterpret_cast<const typename MmaOps<T>::Stored*>(w.data_ptr()), static_cast<int>(plan.c_pad),
          plan.w_chunk};
}

// Decides between the paths for LOCOCO_CUDA_PATH; returns true for the tensor cores.
inline bool use_mma(KernelPath path, const MmaPlan& plan) {
  if (path == KernelPath::kSimt) return false;
  TORCH_CHECK(plan.why_not == nullptr || path != KernelPath::kMma,
              "fuse_kv: LOCOCO_CUDA_PATH=mma but the tensor-core kernels do not apply: ", plan.why_not);
  return plan.why_not == nullptr;
}

// Blocks that share the positions of one slot group in the tensor-core forward: 1 when the
// groups fill half the GPU, else enough to fill it, at most one per tile and kMaxSplits.
inline int forward_splits(int multiprocessors, int64_t groups, int positions) {
  constexpr int64_t kMaxSplits = 16;
  if (groups * 2 > multiprocessors) return 1;
  const int64_t fill = (multiprocessors + groups - 1) / groups;
  return static_cast<int>(std::max<int64_t>(1, std::min({fill, int64_t{ceil_div(positions, kMmaTile)}, kMaxSplits})));
}

template <typename T, typename Launcher>
void launch_mma_forward(Launcher& launch, const FuseArgs<T>& args, const at::Tensor& weight, const MmaPlan& plan) {
  if constexpr (!std::is_same_v<T, double>) {
    const Problem& pb = args.pb;
    const at::Tensor w = mma_weights(weight, plan);
    const MmaWeights<T> mw = mma_weight_args<T>(w, plan);
    const int64_t groups = int64_t{pb.rows} * (plan.c_pad / plan.slots_per_block);
    FuseArgs<T> a = args;
    a.splits = forward_splits(launch.multiprocessor_count(), groups, pb.rest_stride());
    at::Tensor partial;
    if (a.splits > 1) {
      partial = at::empty({pb.rows, pb.num_fused, a.splits, kPartialO + pb.channels()},
                          weight.options().dtype(at::kFloat));
      a.partial = partial.data_ptr<float>();
    }
    const int64_t blocks = checked_blocks(groups * a.splits, "mma_fuse_kernel");
    with_slots_per_block(plan.slots_per_block, [&](auto cb) {
      launch(mma_fuse_kernel<T, cb.value, false>, blocks, kMmaThreads, plan.fuse_smem, a, mw);
    });
    if (a.splits > 1) {
      launch(mma_combine_kernel<T>, checked_blocks(int64_t{pb.rows} * pb.num_fused, "mma_combine_kernel"),
             kCombineThreads, 0, a);
    }
  }
}

// The backward of the fused slots, after the statistics of the softmax: dL/dZ and P, then
// the gradients of X and W. The bias and alpha reductions follow in the caller.
template <typename T, typename Launcher>
void launch_mma_backward(Launcher& launch, const FuseArgs<T>& args, const at::Tensor& weight, const MmaPlan& plan) {
  if constexpr (!std::is_same_v<T, double>) {
    const Problem& pb = args.pb;
    const at::Tensor w = mma_weights(weight, plan);
    const MmaWeights<T> mw = mma_weight_args<T>(w, plan);
    const at::Tensor w_by_tap = weights_by_tap(weight);
    FuseArgs<T> a = args;
    a.weight_by_tap = w_by_tap.data_ptr<float>();
    const int64_t rows = pb.rows, tiles = a.bias_parts, slot_blocks = plan.c_pad / plan.slots_per_block;
    const int64_t ch_blocks = ceil_div(pb.channels(), kMmaChannelBlock);
    with_slots_per_block(plan.slots_per_block, [&](auto cb) {
      launch(mma_fuse_kernel<T, cb.value, true>, checked_blocks(rows * slot_blocks, "mma_fuse_kernel"), kMmaThreads,
             plan.fuse_smem, a, mw);
      launch(mma_grad_z_kernel<T, cb.value>, checked_blocks(rows * tiles * slot_blocks, "mma_grad_z_kernel"),
             kMmaThreads, plan.grad_z_smem, a, mw);
    });
    launch(mma_grad_x_kernel<T>, checked_blocks(rows * tiles * ch_blocks, "mma_grad_x_kernel"), kMmaThreads,
           plan.grad_x_smem, a);
    launch(mma_grad_weight_kernel<T>,
           checked_blocks(pb.kernel * ch_blocks * ceil_div(pb.num_fused, kMmaSlotBlock), "mma_grad_weight_kernel"),
           kMmaThreads, plan.grad_weight_smem, a);
  }
}

template <typename T, typename Launcher>
void launch_generic_backward(Launcher& launch, const FuseArgs<T>& a) {
  using Acc = acc_t<T>;
  const Problem& pb = a.pb;
  const int64_t slot_blocks = checked_blocks(int64_t{pb.rows} * pb.num_fused, "generic_fuse_kernel");
  SharedCarver fuse_carver{nullptr};
  GenericShared<Acc>::carve(fuse_carver, pb.channels(), kGenericThreads);
  launch(generic_fuse_kernel<T, true>, slot_blocks, kGenericThreads, fuse_carver.size(), a);
  launch(generic_grad_z_kernel<T>, slot_blocks, kGenericThreads, block_scratch_bytes<Acc>(), a);
  launch(generic_grad_x_kernel<T>, checked_blocks(int64_t{pb.rows} * pb.rest_stride(), "generic_grad_x_kernel"),
         kGenericThreads, 0, a);
  launch(generic_grad_weight_kernel<T>,
         checked_blocks((int64_t{pb.kernel} * pb.channels() * pb.num_fused + kGenericThreads - 1) / kGenericThreads,
                        "generic_grad_weight_kernel"),
         kGenericThreads, 0, a);
}

// What the kernels of one call read and write, after the checks and the selection.
struct CallTensors {
  const at::Tensor &mem_k, &mem_v, &new_k, &new_v, &weight;
  Params params;
  SelectionBuffers sel;
  Problem pb;
  KernelPath path;
};

// The forward kernels of one element type: the kept slots, then the fused ones.
template <typename T, typename Launcher>
void forward_kernels(Launcher& launch, const CallTensors& c, at::Tensor& out_k, at::Tensor& out_v) {
  const Problem& pb = c.pb;
  FuseArgs<T> a = fuse_args<T>(pb, c.sel, c.mem_k, c.mem_v, c.new_k, c.new_v, c.params);
  a.out_k = reinterpret_cast<T*>(out_k.data_ptr());
  a.out_v = reinterpret_cast<T*>(out_v.data_ptr());
  launch(copy_kept_kernel<T>, copy_blocks(pb), kCopyThreads, 0, a);
  if (pb.num_fused == 0) return;
  const MmaPlan plan = plan_mma<T>(launch, pb, false);
  if (use_mma(c.path, plan)) {
    launch_mma_forward(launch, a, c.weight, plan);
  } else {
    launch_generic_forward(launch, a);
  }
}

// The backward kernels of one element type; fills the zeroed gradients `grads` (mem_k, mem_v,
// new_k, new_v, weight, bias, alpha).
template <typename T, typename Launcher>
void backward_kernels(Launcher& launch, const CallTensors& c, const at::Tensor& grad_k, const at::Tensor& grad_v,
                      FuseKvGrads& grads) {
  using Acc = acc_t<T>;
  const Problem& pb = c.pb;
  auto& [d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha] = grads;
  FuseArgs<T> a = fuse_args<T>(pb, c.sel, c.mem_k, c.mem_v, c.new_k, c.new_v, c.params);
  a.grad_k = reinterpret_cast<const T*>(grad_k.data_ptr());
  a.grad_v = reinterpret_cast<const T*>(grad_v.data_ptr());
  a.d_keys = entries<T>(d_mem_k, d_new_k);
  a.d_values = entries<T>(d_mem_v, d_new_v);
  launch(scatter_kept_grad_kernel<T>, copy_blocks(pb), kCopyThreads, 0, a);
  if (pb.num_fused == 0) return;

  const auto acc_opts = c.weight.options().dtype(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat);
  const int C = pb.num_fused, stride = pb.rest_stride(), ch2 = pb.channels();
  const MmaPlan plan = plan_mma<T>(launch, pb, true);
  const bool mma = use_mma(c.path, plan);
  a.bias_parts = mma ? ceil_div(stride, kMmaTile) : 1;
  const at::Tensor stats = at::zeros({pb.rows, C, kStatCount}, acc_opts);
  const at::Tensor probs = at::empty({pb.rows, C, stride}, acc_opts);
  const at::Tensor grad_z = at::empty({pb.rows, C, stride}, acc_opts);
  const at::Tensor grad_bias_rows = at::zeros({pb.rows, a.bias_parts, C}, acc_opts);
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

  if (mma) {
    launch_mma_backward(launch, a, c.weight, plan);
  } else {
    launch_generic_backward(launch, a);
  }
  launch(generic_grad_bias_alpha_kernel<T>, 1, kGenericThreads, block_scratch_bytes<Acc>(), a);

  d_weight.copy_(grad_weight.permute({2, 1, 0}));
  d_bias.copy_(grad_bias);
  d_alpha.copy_(grad_alpha.reshape(d_alpha.sizes()));
}

// Declares (with `extern`) or instantiates (without) the kernels of one element type, so that
// a build can compile each type in its own translation unit, in parallel.
#define LOCOCO_FUSE_KV_KERNELS(EXTERN, T, LAUNCHER)                                                          \
  EXTERN template void forward_kernels<T, LAUNCHER>(LAUNCHER&, const CallTensors&, at::Tensor&, at::Tensor&); \
  EXTERN template void backward_kernels<T, LAUNCHER>(LAUNCHER&, const CallTensors&, const at::Tensor&,       \
                                                     const at::Tensor&, FuseKvGrads&)

// Calls f(T{}) with the kernel element type of `dtype`.
template <typename F>
void with_kernel_type(at::ScalarType dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fuse_kv_cuda", [&] {
    f(typename KernelType<scalar_t>::type{});
  });
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> fuse_kv_forward(
    const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& new_k,
    const at::Tensor& new_v, const at::Tensor& scores, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& alpha, int64_t num_heavy, int64_t num_local,
    const std::optional<at::Tensor>& valid_len) {
  const FuseKvShape s = check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                           num_heavy, num_local, valid_len, /*check_values=*/false);
  Launcher launch(mem_k.device());  // after the checks: they name a tensor on the wrong device
  auto out_k = at::empty({s.batch, s.heads, s.slots(), s.d}, mem_k.options());
  auto out_v = at::empty_like(out_k);
  if (out_k.numel() == 0) return {out_k, out_v};
  const Problem pb = problem_of(s);
  const CallTensors call{mem_k, mem_v, new_k, new_v, weight, contiguous_params(weight, bias, alpha),
                         select_entries(launch, pb, scores, valid_len), pb, requested_kernel_path()};
  with_kernel_type(mem_k.scalar_type(), [&](auto type) {
    forward_kernels<decltype(type)>(launch, call, out_k, out_v);
  });
  return {out_k, out_v};
}

template <typename Launcher>
FuseKvGrads fuse_kv_backward(const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& mem_k,
                             const at::Tensor& mem_v, const at::Tensor& new_k, const at::Tensor& new_v,
                             const at::Tensor& scores, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& alpha, int64_t num_heavy,
                             int64_t num_local, const std::optional<at::Tensor>& valid_len) {
  const FuseKvShape s = check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                           num_heavy, num_local, valid_len, /*check_values=*/false);
  check_fuse_kv_grads(grad_k, grad_v, s, mem_k);
  Launcher launch(mem_k.device());
  FuseKvGrads grads = zero_fuse_kv_grads(mem_k, mem_v, new_k, new_v, weight, alpha);
  if (s.batch * s.heads == 0 || s.d == 0) return grads;
  const Problem pb = problem_of(s);
  const CallTensors call{mem_k, mem_v, new_k, new_v, weight, contiguous_params(weight, bias, alpha),
                         select_entries(launch, pb, scores, valid_len), pb, requested_kernel_path()};
  const at::Tensor grad_k_rows = grad_k.contiguous(), grad_v_rows = grad_v.contiguous();
  with_kernel_type(mem_k.scalar_type(), [&](auto type) {
    backward_kernels<decltype(type)>(launch, call, grad_k_rows, grad_v_rows, grads);
  });
  return grads;
}

}  // namespace lococo::cuda
