// The tensor-core forward (fp16, bf16, fp32 through 3xTF32), flash-attention shaped.
//
// One block of 8 warps per (row, block of CB fused slots). It walks R in tiles of kMmaTile
// positions; per tile it
//   1. gathers X = [K_R ; V_R] of the tile plus the k - 1 halo rows into shared memory,
//   2. computes Z[tile, CB] = conv(X) as an implicit GEMM over (tap, channel) on tensor cores,
//   3. applies bias and ReLU and updates an online softmax per slot (running max and sum),
//   4. accumulates O[CB, 2d] = O * rescale + P^T X on tensor cores, O in registers.
// The epilogue writes alpha * O / sum + (1 - alpha) * X[pick] per slot (kStats = false), or,
// as the first pass of the backward (kStats = true), the softmax max and sum and the dot
// products G[c] . F[c] and G[c] . (F[c] - X[pick_c]) with F = O / sum and G the incoming
// gradient of the slot. Nothing larger than a tile leaves the chip.
#pragma once

#include "mma_common.cuh"

namespace lococo::cuda {

constexpr int kMmaMaxOFrags = 8;  // O fragments per warp: CB * 2d <= 8 warps * 8 * 256
constexpr int kMmaMaxSlotChannels = kMmaWarps * kMmaMaxOFrags * 256;

// Slots per block for 2d channels, so that O fits the registers of 8 warps.
__host__ __device__ constexpr int mma_slots_per_block(int channels) {
  return channels <= 256 ? 64 : channels <= 512 ? 32 : 16;
}

// Shared-memory layout of mma_fuse_kernel; the host computes its size with a null base.
template <typename S, int CB>
struct MmaForwardShared {
  static constexpr int ldz = CB + 8;
  int ldx, ldw, ldp, col_tiles;
  S* x;        // [kMmaTile + k - 1, ldx] the tile's X with halo rows
  S* w;        // [w_chunk, ldw] weights of one tap and one chunk of channels
  float* z;    // [kMmaTile, ldz] the conv tile, then exp(z - max)
  S* p[2];     // [kMmaTile, ldp] P as MMA operand (hi, lo)
  float* run_max;  // [CB]
  float* run_sum;  // [CB]
  float* rescale;  // [CB]
  float* stage;    // [kMmaWarps, 256] per-warp staging of one fragment
  float* dot;      // [CB, 2d / 16] per column tile: G . F        (kStats)
  float* dot_alpha;  // [CB, 2d / 16] per column tile: G . (F - x_pick)  (kStats)
  __host__ __device__ static MmaForwardShared carve(SharedCarver& c, int channels, int kernel, int w_chunk,
                                                    int p_parts, bool stats) {
    MmaForwardShared s;
    s.ldx = skewed<S>(channels);
    s.ldw = skewed<S>(CB);
    s.ldp = skewed<S>(CB);
    s.col_tiles = channels / 16;
    s.x = c.take<S>(static_cast<size_t>(kMmaTile + kernel - 1) * s.ldx);
    s.w = c.take<S>(static_cast<size_t>(w_chunk) * s.ldw);
    s.z = c.take<float>(static_cast<size_t>(kMmaTile) * ldz);
    s.p[0] = c.take<S>(static_cast<size_t>(kMmaTile) * s.ldp);
    s.p[1] = p_parts > 1 ? c.take<S>(static_cast<size_t>(kMmaTile) * s.ldp) : s.p[0];
    s.run_max = c.take<float>(CB);
    s.run_sum = c.take<float>(CB);
    s.rescale = c.take<float>(CB);
    s.stage = c.take<float>(static_cast<size_t>(kMmaWarps) * 256);
    s.dot = stats ? c.take<float>(static_cast<size_t>(CB) * s.col_tiles) : nullptr;
    s.dot_alpha = stats ? c.take<float>(static_cast<size_t>(CB) * s.col_tiles) : nullptr;
    return s;
  }
};

template <typename T, int CB, bool kStats>
__global__ void __launch_bounds__(kMmaThreads, 1) mma_fuse_kernel(FuseArgs<T> a, MmaWeights<T> mw) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using Ops = MmaOps<T>;
  using S = typename Ops::Stored;
  using FragC = typename Ops::FragC;
  constexpr int kK = Ops::kK;
  constexpr int kZPerWarp = ((kMmaTile / 16) * (CB / 16) + kMmaWarps - 1) / kMmaWarps;
  constexpr int kThreadsPerSlot = kMmaThreads / CB;
  static_assert(kMmaThreads % CB == 0 && kThreadsPerSlot <= kWarpSize, "slot groups must fit in a warp");

  SharedCarver carver{dynamic_shared_memory()};
  const Problem& pb = a.pb;
  const int ch2 = pb.channels(), k = pb.kernel, pad = pb.pad(), C = pb.num_fused, H = pb.num_heavy, d = pb.d;
  const auto sh = MmaForwardShared<S, CB>::carve(carver, ch2, k, mw.w_chunk, Ops::kPParts, kStats);
  const int slot_blocks = mw.c_pad / CB, splits = kStats ? 1 : a.splits;
  const int row = blockIdx.x / (slot_blocks * splits), rem = blockIdx.x - row * slot_blocks * splits;
  const int c0 = (rem / splits) * CB, split = rem - (rem / splits) * splits;
  const auto [n, rest, keys, values] = a.row_rest(row);
  if (n + H < pb.slots()) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* stage = sh.stage + warp * 256;

  FragC row_of;
  accumulator_rows(row_of, stage);
  const int o_row_tiles = CB / 16, o_frags = o_row_tiles * sh.col_tiles;
  FragC o[kMmaMaxOFrags];
#pragma unroll
  for (int q = 0; q < kMmaMaxOFrags; ++q) wmma::fill_fragment(o[q], 0.0f);
  for (int c = threadIdx.x; c < CB; c += blockDim.x) {
    sh.run_max[c] = neg_inf<float>();
    sh.run_sum[c] = 0.0f;
  }

  // This block's positions: whole tiles, split `splits` ways (the split ends are tile ends).
  const int tiles_per_split = ceil_div(ceil_div(n, kMmaTile), splits);
  const int begin = split * tiles_per_split * kMmaTile, end = min(n, begin + tiles_per_split * kMmaTile);
  for (int base = begin; base < end; base += kMmaTile) {
    gather_x(sh.x, sh.ldx, kMmaTile + k - 1, base - pad, a, keys, values, rest, n);
    FragC z[kZPerWarp];
#pragma unroll
    for (int q = 0; q < kZPerWarp; ++q) wmma::fill_fragment(z[q], 0.0f);
    conv_tile<T, CB>(z, sh.x, sh.ldx, sh.w, sh.ldw, mw, c0, ch2, k);
    const int z_row = (warp % 4) * 16;
#pragma unroll
    for (int q = 0; q < kZPerWarp; ++q) {
      const int f = warp + kMmaWarps * q;
      if (f < (kMmaTile / 16) * (CB / 16)) {
        wmma::store_matrix_sync(sh.z + z_row * sh.ldz + (f / 4) * 16, z[q], sh.ldz, wmma::mem_row_major);
      }
    }
    __syncthreads();

    // Bias, ReLU, online softmax per slot: kThreadsPerSlot adjacent lanes share a slot.
    {
      const int col = threadIdx.x / kThreadsPerSlot, part = threadIdx.x % kThreadsPerSlot;
      const int c = c0 + col;
      const float bias = a.bias && c < C ? to_acc(a.bias[c]) : 0.0f;
      const float old_max = sh.run_max[col];
      float tile_max = neg_inf<float>();
      for (int r = part; r < kMmaTile; r += kThreadsPerSlot) {
        const float zr = base + r < n ? relu_keep_nan(sh.z[r * sh.ldz + col] + bias) : neg_inf<float>();
        sh.z[r * sh.ldz + col] = zr;
        tile_max = fmaxf(tile_max, zr);
      }
#pragma unroll
      for (int s = kThreadsPerSlot / 2; s > 0; s /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, s));
      const float new_max = fmaxf(old_max, tile_max);
      float sum = 0.0f;
      for (int r = part; r < kMmaTile; r += kThreadsPerSlot) {
        const float p = expf(sh.z[r * sh.ldz + col] - new_max);
        Ops::store_p(p, sh.p[0] + r * sh.ldp + col, sh.p[1] + r * sh.ldp + col);
        sum += p;
      }
#pragma unroll
      for (int s = kThreadsPerSlot / 2; s > 0; s /= 2) sum += __shfl_xor_sync(kFullMask, sum, s);
      __syncwarp();
      if (part == 0) {
        const float scale = expf(old_max - new_max);
        sh.run_max[col] = new_max;
        sh.run_sum[col] = sh.run_sum[col] * scale + sum;
        sh.rescale[col] = scale;
      }
    }
    __syncthreads();

    // O = O * rescale + P^T X over this tile.
#pragma unroll
    for (int q = 0; q < kMmaMaxOFrags; ++q) {
      const int f = warp + kMmaWarps * q;
      if (f < o_frags) {
        const int cr = f % o_row_tiles, cc = f / o_row_tiles;
#pragma unroll
        for (int e = 0; e < o[q].num_elements; ++e) o[q].x[e] *= sh.rescale[cr * 16 + static_cast<int>(row_of.x[e])];
        for (int kk = 0; kk < kMmaTile; kk += kK) {
          Ops::mix_step(o[q], sh.p[0] + kk * sh.ldp + cr * 16, sh.p[1] + kk * sh.ldp + cr * 16, sh.ldp,
                        sh.x + (pad + kk) * sh.ldx + cc * 16, sh.ldx);
        }
      }
    }
    __syncthreads();  // X, P and the statistics are rewritten by the next tile
  }

  const float alpha = to_acc(*a.alpha);
  const int M = pb.slots();
  const int32_t* picks = a.sel.picks + static_cast<int64_t>(row) * C;
#pragma unroll
  for (int q = 0; q < kMmaMaxOFrags; ++q) {
    const int f = warp + kMmaWarps * q;
    if (f < o_frags) {
      const int cr = f % o_row_tiles, cc = f / o_row_tiles;
      wmma::store_matrix_sync(stage, o[q], 16, wmma::mem_row_major);
      __syncwarp();
      // Lanes 0-15 hold row 2j of the tile in step j, lanes 16-31 row 2j + 1, one column each.
      for (int e = lane; e < 256; e += kWarpSize) {
        const int r = e / 16, c = c0 + cr * 16 + r, ch = cc * 16 + e % 16;
        if (!kStats && splits > 1) {  // this block's share, unnormalised; mma_combine_kernel mixes
          if (c < C) a.partial[((static_cast<int64_t>(row) * C + c) * splits + split) * (kPartialO + ch2) +
                               kPartialO + ch] = stage[e];
          continue;
        }
        const float f_val = stage[e] / sh.run_sum[cr * 16 + r];
        const float x = c < C ? a.x_at(keys, values, rest[picks[c]], ch) : 0.0f;
        const int64_t slot = (static_cast<int64_t>(row) * M + H + c) * d;
        if constexpr (kStats) {
          float g = 0.0f;
          if (c < C) g = to_acc(ch < d ? a.grad_k[slot + ch] : a.grad_v[slot + ch - d]);
          float dot = g * f_val, dot_alpha = g * (f_val - x);
#pragma unroll
          for (int s = 8; s > 0; s /= 2) {
            dot += __shfl_xor_sync(kFullMask, dot, s);
            dot_alpha += __shfl_xor_sync(kFullMask, dot_alpha, s);
          }
          if (e % 16 == 0) {
            sh.dot[(cr * 16 + r) * sh.col_tiles + cc] = dot;
            sh.dot_alpha[(cr * 16 + r) * sh.col_tiles + cc] = dot_alpha;
          }
        } else if (c < C) {
          const T out = from_acc<T>(alpha * f_val + (1.0f - alpha) * x);
          if (ch < d) {
            a.out_k[slot + ch] = out;
          } else {
            a.out_v[slot + ch - d] = out;
          }
        }
      }
      __syncwarp();  // the stage is rewritten by the next fragment
    }
  }
  if (!kStats && splits > 1) {
    for (int col = threadIdx.x; col < CB && c0 + col < C; col += blockDim.x) {
      float* part = a.partial + ((static_cast<int64_t>(row) * C + c0 + col) * splits + split) * (kPartialO + ch2);
      part[kPartialMax] = sh.run_max[col];
      part[kPartialSum] = sh.run_sum[col];
    }
  }
  if constexpr (kStats) {
    __syncthreads();
    for (int col = threadIdx.x; col < CB && c0 + col < C; col += blockDim.x) {
      float dot = 0.0f, dot_alpha = 0.0f;
      for (int cc = 0; cc < sh.col_tiles; ++cc) {
        dot += sh.dot[col * sh.col_tiles + cc];
        dot_alpha += sh.dot_alpha[col * sh.col_tiles + cc];
      }
      float* st = a.stats + (static_cast<int64_t>(row) * C + c0 + col) * kStatCount;
      st[kStatMax] = sh.run_max[col];
      st[kStatSum] = sh.run_sum[col];
      st[kStatDot] = dot;
      st[kStatAlpha] = dot_alpha;
    }
  }
#endif
}

constexpr int kCombineThreads = 128;

// The second step of a forward split over the positions (as in flash-decoding): one block per
// (row, fused slot c) merges the shares of the `splits` blocks, each rescaled by exp(its max
// - the overall max), and writes the slot as the unsplit epilogue does.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) mma_combine_kernel(FuseArgs<T> a) {
  const Problem& pb = a.pb;
  const int C = pb.num_fused, ch2 = pb.channels(), d = pb.d, splits = a.splits, width = kPartialO + ch2;
  const int row = blockIdx.x / C, c = blockIdx.x - row * C;
  const auto [n, rest, keys, values] = a.row_rest(row);
  if (n + pb.num_heavy < pb.slots()) return;
  const float* part = a.partial + (static_cast<int64_t>(row) * C + c) * splits * width;
  float top = neg_inf<float>();
  for (int s = 0; s < splits; ++s) top = fmaxf(top, part[s * width + kPartialMax]);
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) sum += expf(part[s * width + kPartialMax] - top) * part[s * width + kPartialSum];
  const float alpha = to_acc(*a.alpha);
  const int pick = rest[a.sel.picks[static_cast<int64_t>(row) * C + c]];
  const int64_t slot = (static_cast<int64_t>(row) * pb.slots() + pb.num_heavy + c) * d;
  for (int ch = threadIdx.x; ch < ch2; ch += blockDim.x) {
    float mix = 0.0f;
    for (int s = 0; s < splits; ++s) mix += expf(part[s * width + kPartialMax] - top) * part[s * width + kPartialO + ch];
    const T out = from_acc<T>(alpha * (mix / sum) + (1.0f - alpha) * a.x_at(keys, values, pick, ch));
    if (ch < d) {
      a.out_k[slot + ch] = out;
    } else {
      a.out_v[slot + ch - d] = out;
    }
  }
}

}  // namespace lococo::cuda
