// The tensor-core backward: three kernels after the statistics pass (mma_fuse_kernel with
// kStats), all recomputing from the inputs like FlashAttention's backward.
//
//   mma_grad_z_kernel       per (row, tile, CB slots): Z = conv(X) again and G . x on tensor
//                           cores; writes P and dL/dZ = alpha P (G . x - G . F) where the ReLU
//                           is active, and the tile's share of the bias gradient
//                           (grad_bias_rows as [rows, tiles of R, C]).
//   mma_grad_x_kernel       per (row, tile, 64 channels): dX = alpha P G + conv^T(dL/dZ, W),
//                           plus (1 - alpha) G for picked entries, written into the cache grads.
//   mma_grad_weight_kernel  per (tap, 64 channels, 64 slots): dW = sum over rows and positions
//                           of X (shifted by the tap) times dL/dZ, in a fixed order.
// P and dL/dZ travel between them as [rows, C, L - H] fp32 in global memory. The last two
// multiply fp32 operands (P, dL/dZ) on TF32 tensor cores with a hi/lo split (about 21 bits).
#pragma once

#include "mma_common.cuh"

namespace lococo::cuda {

constexpr int kMmaChannelBlock = 64;  // output channels per block of grad_x, and of grad_weight
constexpr int kMmaSlotChunk = 32;     // slots per staged chunk in grad_x
constexpr int kMmaSlotBlock = 64;     // slots per block of grad_weight

// G[c, ch] of a row: the incoming gradient of fused slot c.
template <typename T>
__device__ __forceinline__ T slot_grad(const FuseArgs<T>& a, int row, int c, int ch) {
  const int64_t slot = (static_cast<int64_t>(row) * a.pb.slots() + a.pb.num_heavy + c) * a.pb.d;
  return ch < a.pb.d ? a.grad_k[slot + ch] : a.grad_v[slot + ch - a.pb.d];
}

template <typename S, int CB>
struct MmaGradZShared {
  static constexpr int ldz = CB + 8;
  int ldx, ldw, ldg;
  S* x;       // [kMmaTile + k - 1, ldx] X with halo rows
  S* w;       // [w_chunk, ldw]
  S* g;       // [2d, ldg] G^T of the block's slots
  float* z;   // [kMmaTile, ldz] pre-ReLU Z
  float* gx;  // [kMmaTile, ldz] G . x
  __host__ __device__ static MmaGradZShared carve(SharedCarver& c, int channels, int kernel, int w_chunk) {
    MmaGradZShared s;
    s.ldx = skewed<S>(channels);
    s.ldw = skewed<S>(CB);
    s.ldg = skewed<S>(CB);
    s.x = c.take<S>(static_cast<size_t>(kMmaTile + kernel - 1) * s.ldx);
    s.w = c.take<S>(static_cast<size_t>(w_chunk) * s.ldw);
    s.g = c.take<S>(static_cast<size_t>(channels) * s.ldg);
    s.z = c.take<float>(static_cast<size_t>(kMmaTile) * ldz);
    s.gx = c.take<float>(static_cast<size_t>(kMmaTile) * ldz);
    return s;
  }
};

template <typename T, int CB>
__global__ void __launch_bounds__(kMmaThreads, 1) mma_grad_z_kernel(FuseArgs<T> a, MmaWeights<T> mw) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Ops = MmaOps<T>;
  using S = typename Ops::Stored;
  using FragC = typename Ops::FragC;
  constexpr int kZFrags = (kMmaTile / 16) * (CB / 16);
  constexpr int kZPerWarp = (kZFrags + kMmaWarps - 1) / kMmaWarps;
  constexpr int kThreadsPerSlot = kMmaThreads / CB;

  SharedCarver carver{dynamic_shared_memory()};
  const Problem& pb = a.pb;
  const int ch2 = pb.channels(), k = pb.kernel, pad = pb.pad(), C = pb.num_fused, stride = pb.rest_stride();
  const auto sh = MmaGradZShared<S, CB>::carve(carver, ch2, k, mw.w_chunk);
  const int slot_blocks = mw.c_pad / CB, tiles = ceil_div(stride, kMmaTile);
  const int row = blockIdx.x / (tiles * slot_blocks), rem = blockIdx.x - row * tiles * slot_blocks;
  const int tile = rem / slot_blocks, c0 = (rem - tile * slot_blocks) * CB;
  const int base = tile * kMmaTile;
  const auto [n, rest, keys, values] = a.row_rest(row);
  if (n + pb.num_heavy < pb.slots() || base >= n) return;
  const int warp = threadIdx.x / kWarpSize, z_row = (warp % 4) * 16;

  gather_x(sh.x, sh.ldx, kMmaTile + k - 1, base - pad, a, keys, values, rest, n);
  for (int e = threadIdx.x; e < ch2 * CB; e += blockDim.x) {
    const int ch = e / CB, c = e - ch * CB;
    sh.g[ch * sh.ldg + c] = c0 + c < C ? slot_grad(a, row, c0 + c, ch) : from_acc<S>(0.0f);
  }
  FragC z[kZPerWarp], gx[kZPerWarp];
#pragma unroll
  for (int q = 0; q < kZPerWarp; ++q) {
    wmma::fill_fragment(z[q], 0.0f);
    wmma::fill_fragment(gx[q], 0.0f);
  }
  conv_tile<T, CB>(z, sh.x, sh.ldx, sh.w, sh.ldw, mw, c0, ch2, k);  // its barriers publish x and g
  for (int kk = 0; kk < ch2; kk += Ops::kK) {
#pragma unroll
    for (int q = 0; q < kZPerWarp; ++q) {
      const int f = warp + kMmaWarps * q;
      if (f < kZFrags) Ops::step(gx[q], sh.x + (pad + z_row) * sh.ldx + kk, sh.ldx, sh.g + kk * sh.ldg + (f / 4) * 16, sh.ldg);
    }
  }
#pragma unroll
  for (int q = 0; q < kZPerWarp; ++q) {
    const int f = warp + kMmaWarps * q;
    if (f < kZFrags) {
      wmma::store_matrix_sync(sh.z + z_row * sh.ldz + (f / 4) * 16, z[q], sh.ldz, wmma::mem_row_major);
      wmma::store_matrix_sync(sh.gx + z_row * sh.ldz + (f / 4) * 16, gx[q], sh.ldz, wmma::mem_row_major);
    }
  }
  __syncthreads();

  const int col = threadIdx.x / kThreadsPerSlot, part = threadIdx.x % kThreadsPerSlot, c = c0 + col;
  float bias_part = 0.0f;
  if (c < C) {
    const float* st = a.stats + (static_cast<int64_t>(row) * C + c) * kStatCount;
    const float run_max = st[kStatMax], run_sum = st[kStatSum], dot = st[kStatDot];
    const float bias = a.bias ? to_acc(a.bias[c]) : 0.0f, alpha = to_acc(*a.alpha);
    float* probs = a.probs + (static_cast<int64_t>(row) * C + c) * stride;
    float* grad_z = a.grad_z + (static_cast<int64_t>(row) * C + c) * stride;
    for (int r = part; r < kMmaTile && base + r < n; r += kThreadsPerSlot) {
      const float pre = sh.z[r * sh.ldz + col] + bias;
      const float p = expf(relu_keep_nan(pre) - run_max) / run_sum;
      const float dz = pre > 0.0f ? alpha * p * (sh.gx[r * sh.ldz + col] - dot) : 0.0f;
      probs[base + r] = p;
      grad_z[base + r] = dz;
      bias_part += dz;
    }
  }
#pragma unroll
  for (int s = kThreadsPerSlot / 2; s > 0; s /= 2) bias_part += __shfl_xor_sync(kFullMask, bias_part, s);
  if (part == 0 && c < C) a.grad_bias_rows[(static_cast<int64_t>(row) * tiles + tile) * C + c] = bias_part;
#endif
}

struct MmaGradXShared {
  static constexpr int ldk = kMmaSlotChunk + 8;
  static constexpr int ldc = kMmaChannelBlock + 8;
  float* p;      // [kMmaTile, ldk] alpha * P of the tile, one chunk of slots
  float* g;      // [kMmaSlotChunk, ldc] G of the chunk, the block's channels
  float* dz;     // [kMmaTile + k - 1, ldk] dL/dZ with halo rows
  float* w;      // [kMmaSlotChunk, ldc] W[c, ch, t] of one tap
  float* stage;  // [kMmaWarps, 256]
  __host__ __device__ static MmaGradXShared carve(SharedCarver& c, int kernel) {
    MmaGradXShared s;
    s.p = c.take<float>(static_cast<size_t>(kMmaTile) * ldk);
    s.g = c.take<float>(static_cast<size_t>(kMmaSlotChunk) * ldc);
    s.dz = c.take<float>(static_cast<size_t>(kMmaTile + kernel - 1) * ldk);
    s.w = c.take<float>(static_cast<size_t>(kMmaSlotChunk) * ldc);
    s.stage = c.take<float>(static_cast<size_t>(kMmaWarps) * 256);
    return s;
  }
};

// acc[q] += A [16 rows, kMmaSlotChunk] @ B [kMmaSlotChunk, column tile w / 4 + 2 q] for the
// two column tiles of warp w that lie below `columns`; A (fp32 P or dL/dZ) is split, B when
// kSplitB. Both row-major float tiles in shared memory.
template <bool kSplitB>
__device__ __forceinline__ void chunk_product(Tf32::FragC (&acc)[2], const float* a_rows, int lda, const float* b,
                                              int ldb, int columns) {
  const int warp = threadIdx.x / kWarpSize;
  for (int kk = 0; kk < kMmaSlotChunk; kk += Tf32::kK) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int ct = warp / 4 + 2 * q;
      if (ct * 16 < columns) {
        Tf32::step<true, kSplitB, wmma::row_major, wmma::row_major>(acc[q], a_rows + kk, lda, b + kk * ldb + ct * 16,
                                                                    ldb);
      }
    }
  }
}

// Output tile [kMmaTile positions, 64 channels]; warp w owns rows 16 (w % 4) and column
// tiles w / 4 and w / 4 + 2.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 1) mma_grad_x_kernel(FuseArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool kSplitExact = std::is_same_v<T, float>;  // G and W are exact in TF32 otherwise
  using L = MmaGradXShared;
  SharedCarver carver{dynamic_shared_memory()};
  const Problem& pb = a.pb;
  const int ch2 = pb.channels(), k = pb.kernel, pad = pb.pad(), C = pb.num_fused, stride = pb.rest_stride();
  const auto sh = L::carve(carver, k);
  const int ch_blocks = ceil_div(ch2, kMmaChannelBlock), tiles = ceil_div(stride, kMmaTile);
  const int row = blockIdx.x / (tiles * ch_blocks), rem = blockIdx.x - row * tiles * ch_blocks;
  const int tile = rem / ch_blocks, ch0 = (rem - tile * ch_blocks) * kMmaChannelBlock;
  const int n_valid = a.sel.valid[row], base = tile * kMmaTile;
  if (n_valid < pb.slots() || base >= n_valid - pb.num_heavy) return;
  const int n = n_valid - pb.num_heavy;
  const float alpha = to_acc(*a.alpha);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, r0 = (warp % 4) * 16;
  const int ch_here = min(kMmaChannelBlock, ch2 - ch0);
  const float* probs = a.probs + static_cast<int64_t>(row) * C * stride;
  const float* grad_z = a.grad_z + static_cast<int64_t>(row) * C * stride;

  Tf32::FragC acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int s0 = 0; s0 < C; s0 += kMmaSlotChunk) {
    __syncthreads();  // the previous chunk is no longer read
    for (int e = threadIdx.x; e < kMmaTile * kMmaSlotChunk; e += blockDim.x) {
      const int r = e % kMmaTile, c = e / kMmaTile, pos = base + r;
      sh.p[r * L::ldk + c] = pos < n && s0 + c < C ? alpha * probs[static_cast<int64_t>(s0 + c) * stride + pos] : 0.0f;
    }
    for (int e = threadIdx.x; e < kMmaSlotChunk * kMmaChannelBlock; e += blockDim.x) {
      const int c = e / kMmaChannelBlock, j = e - c * kMmaChannelBlock;
      sh.g[c * L::ldc + j] = s0 + c < C && j < ch_here ? to_acc(slot_grad(a, row, s0 + c, ch0 + j)) : 0.0f;
    }
    for (int e = threadIdx.x; e < (kMmaTile + k - 1) * kMmaSlotChunk; e += blockDim.x) {
      const int q = e % (kMmaTile + k - 1), c = e / (kMmaTile + k - 1), pos = base - pad + q;
      sh.dz[q * L::ldk + c] =
          pos >= 0 && pos < n && s0 + c < C ? grad_z[static_cast<int64_t>(s0 + c) * stride + pos] : 0.0f;
    }
    __syncthreads();
    chunk_product<kSplitExact>(acc, sh.p + r0 * L::ldk, L::ldk, sh.g, L::ldc, ch_here);
    // dX[i] += sum_t dZ[i + pad - t] W[:, :, t]: the A operand of tap t is dZ shifted by rows.
    for (int t = 0; t < k; ++t) {
      __syncthreads();
      for (int e = threadIdx.x; e < kMmaSlotChunk * kMmaChannelBlock; e += blockDim.x) {
        const int c = e / kMmaChannelBlock, j = e - c * kMmaChannelBlock;
        sh.w[c * L::ldc + j] =
            s0 + c < C && j < ch_here ? a.weight_by_tap[(static_cast<int64_t>(t) * C + s0 + c) * ch2 + ch0 + j] : 0.0f;
      }
      __syncthreads();
      chunk_product<kSplitExact>(acc, sh.dz + (r0 + 2 * pad - t) * L::ldk, L::ldk, sh.w, L::ldc, ch_here);
    }
  }

  const int32_t* rest = a.sel.rest + static_cast<int64_t>(row) * stride;
  const int32_t* pick_slot = a.sel.pick_slot + static_cast<int64_t>(row) * stride;
  const auto d_keys = a.d_keys.row(row), d_values = a.d_values.row(row);
  float* stage = sh.stage + warp * 256;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int ct = warp / 4 + 2 * q;
    if (ct * 16 < ch_here) {
      wmma::store_matrix_sync(stage, acc[q], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += kWarpSize) {
        const int pos = base + r0 + e / 16, ch = ch0 + ct * 16 + e % 16;
        if (pos < n) {
          float v = stage[e];
          const int slot = pick_slot[pos];
          if (slot >= 0) v += (1.0f - alpha) * to_acc(slot_grad(a, row, slot, ch));
          const int j = rest[pos];
          if (ch < pb.d) {
            d_keys.at(j, ch) = from_acc<T>(v);
          } else {
            d_values.at(j, ch - pb.d) = from_acc<T>(v);
          }
        }
      }
      __syncwarp();
    }
  }
#endif
}

struct MmaGradWeightShared {
  static constexpr int ld = kMmaChannelBlock + 8;
  float* x;      // [kMmaTile, ld] X of positions shifted by the tap, the block's channels
  float* dz;     // [kMmaTile, ld] dL/dZ of the positions, the block's slots
  float* stage;  // [kMmaWarps, 256]
  __host__ __device__ static MmaGradWeightShared carve(SharedCarver& c) {
    MmaGradWeightShared s;
    s.x = c.take<float>(static_cast<size_t>(kMmaTile) * ld);
    s.dz = c.take<float>(static_cast<size_t>(kMmaTile) * ld);
    s.stage = c.take<float>(static_cast<size_t>(kMmaWarps) * 256);
    return s;
  }
};

// Output tile dW[t, 64 channels, 64 slots] (laid out [k, 2d, C]); warp w owns channel rows
// 16 (w % 4) and slot column tiles w / 4 and w / 4 + 2. Sums rows, then positions, in order.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 1) mma_grad_weight_kernel(FuseArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool kSplitX = std::is_same_v<T, float>;
  using L = MmaGradWeightShared;
  SharedCarver carver{dynamic_shared_memory()};
  const Problem& pb = a.pb;
  const int ch2 = pb.channels(), pad = pb.pad(), C = pb.num_fused, stride = pb.rest_stride();
  const auto sh = L::carve(carver);
  const int ch_blocks = ceil_div(ch2, kMmaChannelBlock), c_blocks = ceil_div(C, kMmaSlotBlock);
  const int t = blockIdx.x / (ch_blocks * c_blocks), rem = blockIdx.x - t * ch_blocks * c_blocks;
  const int ch0 = (rem / c_blocks) * kMmaChannelBlock, c0 = (rem % c_blocks) * kMmaSlotBlock;
  const int ch_here = min(kMmaChannelBlock, ch2 - ch0), c_here = min(kMmaSlotBlock, C - c0);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, r0 = (warp % 4) * 16;
  const bool rows_here = r0 < ch_here;

  Tf32::FragC acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (int row = 0; row < pb.rows; ++row) {
    const auto [n, rest, keys, values] = a.row_rest(row);
    if (n + pb.num_heavy < pb.slots()) continue;
    const float* grad_z = a.grad_z + (static_cast<int64_t>(row) * C + c0) * stride;
    for (int base = 0; base < n; base += kMmaTile) {
      __syncthreads();  // the previous positions are no longer read
      for (int e = threadIdx.x; e < kMmaTile * kMmaChannelBlock; e += blockDim.x) {
        const int r = e / kMmaChannelBlock, j = e - r * kMmaChannelBlock, pos = base + r, src = pos + t - pad;
        sh.x[r * L::ld + j] =
            pos < n && src >= 0 && src < n && j < ch_here ? a.x_at(keys, values, rest[src], ch0 + j) : 0.0f;
      }
      for (int e = threadIdx.x; e < kMmaTile * kMmaSlotBlock; e += blockDim.x) {
        const int r = e % kMmaTile, c = e / kMmaTile, pos = base + r;
        sh.dz[r * L::ld + c] = pos < n && c < c_here ? grad_z[static_cast<int64_t>(c) * stride + pos] : 0.0f;
      }
      __syncthreads();
      for (int kk = 0; kk < kMmaTile; kk += Tf32::kK) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int ct = warp / 4 + 2 * q;
          if (rows_here && ct * 16 < c_here) {
            Tf32::step<kSplitX, true, wmma::col_major, wmma::row_major>(
                acc[q], sh.x + kk * L::ld + r0, L::ld, sh.dz + kk * L::ld + ct * 16, L::ld);
          }
        }
      }
    }
  }

  float* stage = sh.stage + warp * 256;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int ct = warp / 4 + 2 * q;
    if (rows_here && ct * 16 < c_here) {
      wmma::store_matrix_sync(stage, acc[q], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += kWarpSize) {
        const int ch = ch0 + r0 + e / 16, c = c0 + ct * 16 + e % 16;
        if (ch < ch2 && c < C) a.grad_weight[(static_cast<int64_t>(t) * ch2 + ch) * C + c] = stage[e];
      }
      __syncwarp();
    }
  }
#endif
}

}  // namespace lococo::cuda
