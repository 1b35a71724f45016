// The portable SIMT kernels: every dtype (float64 included) and every size.
//
// They are the correctness baseline: plain loops, reductions in a fixed order, no size limits
// beyond the grid. The forward never stores the score or weight matrices; the backward keeps
// P and dL/dZ of the rest in global scratch ([rows, C, L - H]) between its kernels.
#pragma once

#include "fuse_kv_args.cuh"

namespace lococo::cuda {

constexpr int kGenericThreads = 128;
constexpr int kCopyThreads = 128;
constexpr int kCopySlotsPerBlock = 16;  // blocks per row: ceil(M / 16)
constexpr int kCopyThreadsPerSlot = kCopyThreads / kCopySlotsPerBlock;

// What one thread of copy_kept_kernel or scatter_kept_grad_kernel moves: kept slot s of a row
// (block b of a row takes slots 16 b .. 16 b + 15) and the entry behind it: heavy hitter s of a
// compressed row, or entry L - M + s of a row kept whole (right-aligned); entry -1 for the zero
// slots in front of a short row. `slot` is the offset of the slot in the [rows, M, d] outputs.
struct KeptSlot {
  bool active;
  int row, entry, part;
  int64_t slot;
};

template <typename T>
__device__ __forceinline__ KeptSlot kept_slot(const FuseArgs<T>& a) {
  const Problem& pb = a.pb;
  const int M = pb.slots(), blocks_per_row = ceil_div(M, kCopySlotsPerBlock);
  const int row = blockIdx.x / blocks_per_row;
  const int s = (blockIdx.x - row * blocks_per_row) * kCopySlotsPerBlock + threadIdx.x / kCopyThreadsPerSlot;
  const int n_valid = a.sel.valid[row];
  const bool whole = n_valid < M;
  if (s >= (whole ? M : pb.num_heavy)) return {false, row, -1, 0, 0};
  const int entry = whole ? (s >= M - n_valid ? pb.length - M + s : -1)
                          : a.sel.heavy[static_cast<int64_t>(row) * pb.num_heavy + s];
  return {true, row, entry, static_cast<int>(threadIdx.x % kCopyThreadsPerSlot),
          (static_cast<int64_t>(row) * M + s) * pb.d};
}

// Copies the d features of one entry (to[c * to_stride] = from[c * from_stride]; zeros when
// from is null), split over the kCopyThreadsPerSlot threads of the slot: 16 bytes at a time
// where both sides are contiguous and aligned, several loads in flight per thread.
template <typename T>
__device__ __forceinline__ void copy_entry(T* __restrict__ to, int64_t to_stride, const T* __restrict__ from,
                                           int64_t from_stride, int d, int part) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectors = d % kVec == 0 && to_stride == 1 && from_stride == 1 &&
                       reinterpret_cast<uintptr_t>(to) % 16 == 0 &&
                       (from == nullptr || reinterpret_cast<uintptr_t>(from) % 16 == 0);
  if (vectors) {
    auto* to4 = reinterpret_cast<uint4*>(to);
    const auto* from4 = reinterpret_cast<const uint4*>(from);
#pragma unroll 4
    for (int v = part; v < d / kVec; v += kCopyThreadsPerSlot) to4[v] = from ? from4[v] : make_uint4(0, 0, 0, 0);
  } else {
    for (int c = part; c < d; c += kCopyThreadsPerSlot) to[c * to_stride] = from ? from[c * from_stride] : from_acc<T>(0);
  }
}

// Heavy-hitter slots of compressed rows, and every slot of rows kept whole (right-aligned,
// zeros in front). Forward: cache -> out, several blocks per row.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads) copy_kept_kernel(FuseArgs<T> a) {
  const KeptSlot k = kept_slot(a);
  if (!k.active) return;  // no barriers in this kernel
  const auto keys = a.keys.row(k.row), values = a.values.row(k.row);
  const int j = k.entry, d = a.pb.d;
  copy_entry(a.out_k + k.slot, 1, j < 0 ? nullptr : &keys.at(j, 0), j < 0 ? 1 : keys.dim_stride(j), d, k.part);
  copy_entry(a.out_v + k.slot, 1, j < 0 ? nullptr : &values.at(j, 0), j < 0 ? 1 : values.dim_stride(j), d, k.part);
}

// The backward of copy_kept_kernel: gradients of those slots go back to their entries.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads) scatter_kept_grad_kernel(FuseArgs<T> a) {
  const KeptSlot k = kept_slot(a);
  if (!k.active || k.entry < 0) return;  // a zero slot has no entry behind it
  const auto d_keys = a.d_keys.row(k.row), d_values = a.d_values.row(k.row);
  const int j = k.entry, d = a.pb.d;
  copy_entry(&d_keys.at(j, 0), d_keys.dim_stride(j), a.grad_k + k.slot, 1, d, k.part);
  copy_entry(&d_values.at(j, 0), d_values.dim_stride(j), a.grad_v + k.slot, 1, d, k.part);
}

// Pre-ReLU convolution output Z[c, i] of position i of R (bias included).
template <typename T>
__device__ __forceinline__ acc_t<T> conv_at(const FuseArgs<T>& a, const RowEntries<const T>& keys,
                                            const RowEntries<const T>& values, const int32_t* rest,
                                            int n, int c, int i) {
  using Acc = acc_t<T>;
  const Problem& pb = a.pb;
  const int d = pb.d, k = pb.kernel, pad = pb.pad();
  Acc z = a.bias ? to_acc(a.bias[c]) : Acc(0);
  const T* w = a.weight + static_cast<int64_t>(c) * pb.channels() * k;  // W[c, ch, t]
  for (int t = 0; t < k; ++t) {
    const int src = i + t - pad;
    if (src < 0 || src >= n) continue;
    const int j = rest[src];
    for (int ch = 0; ch < d; ++ch) z += to_acc(w[ch * k + t]) * to_acc(keys.at(j, ch));
    for (int ch = 0; ch < d; ++ch) z += to_acc(w[(d + ch) * k + t]) * to_acc(values.at(j, ch));
  }
  return z;
}

template <typename Acc>
struct GenericShared {
  Acc* fused;    // [2d]  running sum of p * x, then the softmax mix F of the slot
  Acc* p_tile;   // [threads]
  Acc* scratch;  // block reductions
  __host__ __device__ static GenericShared carve(SharedCarver& c, int channels, int threads) {
    GenericShared s;
    s.fused = c.take<Acc>(channels);
    s.p_tile = c.take<Acc>(threads);
    s.scratch = c.take<Acc>(block_scratch_count<Acc>(threads));
    return s;
  }
};

// One block per (row, fused slot c); blockIdx.x = row * C + c. Walks R in tiles of blockDim
// positions with an online softmax (running max and sum), so nothing of size L - H is stored.
// kStats = false: the forward, writes slot H + c of the outputs.
// kStats = true:  the first pass of the backward, writes the softmax max and sum and two dot
//                 products with the incoming gradient G of the slot to a.stats.
template <typename T, bool kStats>
__global__ void __launch_bounds__(kGenericThreads) generic_fuse_kernel(FuseArgs<T> a) {
  using Acc = acc_t<T>;
  SharedCarver carver{dynamic_shared_memory()};
  const Problem& pb = a.pb;
  const GenericShared<Acc> sh = GenericShared<Acc>::carve(carver, pb.channels(), blockDim.x);
  const int C = pb.num_fused, H = pb.num_heavy, d = pb.d, ch2 = pb.channels();
  const int row = blockIdx.x / C, c = blockIdx.x - row * C;
  const auto [n, rest, keys, values] = a.row_rest(row);
  if (n + H < pb.slots()) return;

  for (int ch = threadIdx.x; ch < ch2; ch += blockDim.x) sh.fused[ch] = Acc(0);
  Acc run_max = neg_inf<Acc>(), run_sum = Acc(0);
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const Acc z = i < n ? relu_keep_nan(conv_at(a, keys, values, rest, n, c, i)) : neg_inf<Acc>();
    const Acc new_max = max_acc(run_max, block_max(z, sh.scratch));
    const Acc scale = exp_acc(run_max - new_max);
    const Acc p = exp_acc(z - new_max);
    sh.p_tile[threadIdx.x] = p;
    run_sum = run_sum * scale + block_sum(p, sh.scratch);  // its barriers publish p_tile
    run_max = new_max;
    const int tile = min(static_cast<int>(blockDim.x), n - base);
    for (int ch = threadIdx.x; ch < ch2; ch += blockDim.x) {
      Acc acc = sh.fused[ch] * scale;
      for (int t = 0; t < tile; ++t) acc += sh.p_tile[t] * a.x_at(keys, values, rest[base + t], ch);
      sh.fused[ch] = acc;
    }
    __syncthreads();  // p_tile is rewritten by the next tile
  }

  const int M = pb.slots();
  const int pick = rest[a.sel.picks[static_cast<int64_t>(row) * C + c]];
  const int64_t slot = (static_cast<int64_t>(row) * M + H + c) * d;
  Acc dot = Acc(0), dot_alpha = Acc(0);
  for (int ch = threadIdx.x; ch < ch2; ch += blockDim.x) {
    const Acc f = sh.fused[ch] / run_sum;
    const Acc x = a.x_at(keys, values, pick, ch);
    if constexpr (kStats) {
      const Acc g = to_acc(ch < d ? a.grad_k[slot + ch] : a.grad_v[slot + ch - d]);
      dot += g * f;
      dot_alpha += g * (f - x);
    } else {
      const Acc alpha = to_acc(*a.alpha);
      const T out = from_acc<T>(alpha * f + (Acc(1) - alpha) * x);
      if (ch < d) {
        a.out_k[slot + ch] = out;
      } else {
        a.out_v[slot + ch - d] = out;
      }
    }
  }
  if constexpr (kStats) {
    dot = block_sum(dot, sh.scratch);
    dot_alpha = block_sum(dot_alpha, sh.scratch);
    if (threadIdx.x == 0) {
      Acc* st = a.stats + (static_cast<int64_t>(row) * C + c) * kStatCount;
      st[kStatMax] = run_max;
      st[kStatSum] = run_sum;
      st[kStatDot] = dot;
      st[kStatAlpha] = dot_alpha;
    }
  }
}

// Backward, second pass, one block per (row, fused slot c): P[c, i] and
// dL/dZ[c, i] = alpha * P * (G[c] . x_i - G[c] . F[c]) where the ReLU is active, and the
// row's share of the bias gradient.
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) generic_grad_z_kernel(FuseArgs<T> a) {
  using Acc = acc_t<T>;
  SharedCarver carver{dynamic_shared_memory()};
  Acc* scratch = carver.take<Acc>(block_scratch_count<Acc>(blockDim.x));
  const Problem& pb = a.pb;
  const int C = pb.num_fused, H = pb.num_heavy, d = pb.d, stride = pb.rest_stride();
  const int row = blockIdx.x / C, c = blockIdx.x - row * C;
  const auto [n, rest, keys, values] = a.row_rest(row);
  if (n + H < pb.slots()) return;
  const Acc* st = a.stats + (static_cast<int64_t>(row) * C + c) * kStatCount;
  const Acc run_max = st[kStatMax], run_sum = st[kStatSum], dot = st[kStatDot];
  const Acc alpha = to_acc(*a.alpha);
  const int64_t slot = (static_cast<int64_t>(row) * pb.slots() + H + c) * d;
  const int64_t out = (static_cast<int64_t>(row) * C + c) * stride;
  Acc bias_part = Acc(0);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const Acc pre = conv_at(a, keys, values, rest, n, c, i);
    const Acc p = exp_acc(relu_keep_nan(pre) - run_max) / run_sum;
    const int j = rest[i];
    Acc g_dot_x = Acc(0);
    for (int ch = 0; ch < d; ++ch) g_dot_x += to_acc(a.grad_k[slot + ch]) * to_acc(keys.at(j, ch));
    for (int ch = 0; ch < d; ++ch) g_dot_x += to_acc(a.grad_v[slot + ch]) * to_acc(values.at(j, ch));
    const Acc dz = pre > Acc(0) ? alpha * p * (g_dot_x - dot) : Acc(0);
    a.probs[out + i] = p;
    a.grad_z[out + i] = dz;
    bias_part += dz;
  }
  bias_part = block_sum(bias_part, scratch);
  if (threadIdx.x == 0) a.grad_bias_rows[static_cast<int64_t>(row) * C + c] = bias_part;
}

// Backward, gradient of the entries of R: one block per (row, i), threads over the 2d
// channels. dx_i = alpha * sum_c P[c, i] G[c] + (1 - alpha) G[slot picking i]
//                 + sum_t sum_c dZ[c, i - t + pad] W[c, :, t].
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) generic_grad_x_kernel(FuseArgs<T> a) {
  using Acc = acc_t<T>;
  const Problem& pb = a.pb;
  const int C = pb.num_fused, H = pb.num_heavy, d = pb.d, ch2 = pb.channels();
  const int k = pb.kernel, pad = pb.pad(), stride = pb.rest_stride(), M = pb.slots();
  const int row = blockIdx.x / stride, i = blockIdx.x - row * stride;
  const int n_valid = a.sel.valid[row];
  if (n_valid < M || i >= n_valid - H) return;
  const int n = n_valid - H;
  const int j = a.sel.rest[static_cast<int64_t>(row) * stride + i];
  const int picked_by = a.sel.pick_slot[static_cast<int64_t>(row) * stride + i];
  const Acc alpha = to_acc(*a.alpha);
  const int64_t slots = static_cast<int64_t>(row) * M + H;  // first fused slot of the row
  const Acc* probs = a.probs + static_cast<int64_t>(row) * C * stride;
  const Acc* grad_z = a.grad_z + static_cast<int64_t>(row) * C * stride;
  const auto d_keys = a.d_keys.row(row), d_values = a.d_values.row(row);
  for (int ch = threadIdx.x; ch < ch2; ch += blockDim.x) {
    const T* g = ch < d ? a.grad_k + slots * d + ch : a.grad_v + slots * d + ch - d;  // G[c, ch] = g[c * d]
    Acc acc = Acc(0);
    for (int c = 0; c < C; ++c) acc += probs[static_cast<int64_t>(c) * stride + i] * to_acc(g[c * d]);
    acc *= alpha;
    if (picked_by >= 0) acc += (Acc(1) - alpha) * to_acc(g[picked_by * d]);
    for (int t = 0; t < k; ++t) {
      const int q = i - t + pad;
      if (q < 0 || q >= n) continue;
      for (int c = 0; c < C; ++c) {
        acc += grad_z[static_cast<int64_t>(c) * stride + q] * to_acc(a.weight[(static_cast<int64_t>(c) * ch2 + ch) * k + t]);
      }
    }
    if (ch < d) {
      d_keys.at(j, ch) = from_acc<T>(acc);
    } else {
      d_values.at(j, ch - d) = from_acc<T>(acc);
    }
  }
}

// Backward, weight gradient: one thread per element of dW laid out [k, 2d, C], summing over
// rows and positions in a fixed order (deterministic without atomics).
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) generic_grad_weight_kernel(FuseArgs<T> a) {
  using Acc = acc_t<T>;
  const Problem& pb = a.pb;
  const int C = pb.num_fused, ch2 = pb.channels(), pad = pb.pad(), stride = pb.rest_stride();
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= static_cast<int64_t>(pb.kernel) * ch2 * C) return;
  const int c = static_cast<int>(e % C), ch = static_cast<int>((e / C) % ch2);
  const int t = static_cast<int>(e / (static_cast<int64_t>(C) * ch2));
  Acc acc = Acc(0);
  for (int row = 0; row < pb.rows; ++row) {
    const auto [n, rest, keys, values] = a.row_rest(row);
    if (n + pb.num_heavy < pb.slots()) continue;
    const Acc* grad_z = a.grad_z + (static_cast<int64_t>(row) * C + c) * stride;
    const int lo = pad - t > 0 ? pad - t : 0, hi = n + pad - t < n ? n + pad - t : n;
    for (int i = lo; i < hi; ++i) acc += grad_z[i] * a.x_at(keys, values, rest[i + t - pad], ch);
  }
  a.grad_weight[e] = acc;
}

// Backward, bias and alpha gradients: sums over rows (and their partial sums) in a fixed
// order. One block.
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) generic_grad_bias_alpha_kernel(FuseArgs<T> a) {
  using Acc = acc_t<T>;
  SharedCarver carver{dynamic_shared_memory()};
  Acc* scratch = carver.take<Acc>(block_scratch_count<Acc>(blockDim.x));
  const Problem& pb = a.pb;
  const int C = pb.num_fused;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    Acc acc = Acc(0);
    for (int row = 0; row < pb.rows; ++row) {
      if (a.sel.valid[row] < pb.slots()) continue;
      for (int part = 0; part < a.bias_parts; ++part) {
        acc += a.grad_bias_rows[(static_cast<int64_t>(row) * a.bias_parts + part) * C + c];
      }
    }
    a.grad_bias[c] = acc;
  }
  Acc part = Acc(0);
  const int64_t total = static_cast<int64_t>(pb.rows) * C;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    if (a.sel.valid[e / C] >= pb.slots()) part += a.stats[e * kStatCount + kStatAlpha];
  }
  part = block_sum(part, scratch);
  if (threadIdx.x == 0) *a.grad_alpha = part;
}

}  // namespace lococo::cuda
