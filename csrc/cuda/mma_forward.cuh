// The tensor-core forward (fp16, bf16, and fp32 through 3xTF32), flash-attention shaped.
//
// One block of 8 warps per (row, block of CB fused slots). It walks R in tiles of kTile
// positions; per tile it
//   1. gathers X = [K_R ; V_R] of the tile plus the k - 1 halo rows into shared memory,
//   2. computes Z[tile, CB] = conv(X) as an implicit GEMM over (tap, channel) on tensor cores
//      (the A operand of tap t is X shifted by t rows: a pointer offset, no im2col),
//   3. applies bias and ReLU and updates an online softmax per slot (running max and sum),
//   4. accumulates O[CB, 2d] = O * rescale + P^T X on tensor cores, O in registers.
// The epilogue writes alpha * O / sum + (1 - alpha) * X[pick] for each slot. Nothing larger
// than a tile ever leaves the chip.
//
// Precision: products of fp16/bf16 inputs are exact with fp32 accumulation. P is split into
// a high and a low part in the input type (two MMAs), so it keeps ~16 bits. fp32 inputs use
// the 3xTF32 split (a_hi b_hi + a_hi b_lo + a_lo b_hi), close to fp32 FMA accuracy.
//
// WMMA leaves the register layout of an accumulator fragment unspecified; the per-slot
// rescale of O needs the row of each element, so each warp reads it off once by loading a
// matrix whose entries are their own row index ("probe").
#pragma once

#include "fuse_kv_args.cuh"

namespace lococo::cuda {

constexpr int kMmaThreads = 256;
constexpr int kMmaWarps = kMmaThreads / kWarpSize;
constexpr int kMmaTile = 64;          // positions per tile
constexpr int kMmaMaxOFrags = 8;      // O fragments per warp: CB * 2d <= 8 * 8 * 256
constexpr int kMmaMaxSlotChannels = kMmaWarps * kMmaMaxOFrags * 256;

// Fragment types and the multiply-accumulate of one K step, per stored element type S.
template <typename S>
struct MmaOps;

template <typename E>
struct MmaOps16 {
  static constexpr int kK = 16;
  static constexpr int kPParts = 2;  // P stored as hi + lo in E
  using Stored = E;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, E, nvcuda::wmma::row_major>;
  using FragAT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, E, nvcuda::wmma::col_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, E, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  // acc += A (row-major at a) @ B (row-major at b); both exact in E.
  __device__ static void conv_step(FragC& acc, const E* a, int lda, const E* b, int ldb) {
    FragA fa;
    FragB fb;
    nvcuda::wmma::load_matrix_sync(fa, a, lda);
    nvcuda::wmma::load_matrix_sync(fb, b, ldb);
    nvcuda::wmma::mma_sync(acc, fa, fb, acc);
  }
  // acc += P^T (column-major at p[0], p[1]: hi and lo parts) @ X (row-major at x).
  __device__ static void mix_step(FragC& acc, const E* p_hi, const E* p_lo, int ldp, const E* x, int ldx) {
    FragAT hi, lo;
    FragB fx;
    nvcuda::wmma::load_matrix_sync(lo, p_lo, ldp);
    nvcuda::wmma::load_matrix_sync(hi, p_hi, ldp);
    nvcuda::wmma::load_matrix_sync(fx, x, ldx);
    nvcuda::wmma::mma_sync(acc, lo, fx, acc);
    nvcuda::wmma::mma_sync(acc, hi, fx, acc);
  }
  __device__ static void store_p(float p, E* hi, E* lo) {
    const E h = from_acc<E>(p);
    *hi = h;
    *lo = from_acc<E>(p - to_acc(h));
  }
};

template <>
struct MmaOps<__half> : MmaOps16<__half> {};
template <>
struct MmaOps<__nv_bfloat16> : MmaOps16<__nv_bfloat16> {};

template <>
struct MmaOps<float> {
  static constexpr int kK = 8;
  static constexpr int kPParts = 1;
  using Stored = float;
  using Tf32 = nvcuda::wmma::precision::tf32;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, Tf32, nvcuda::wmma::row_major>;
  using FragAT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, Tf32, nvcuda::wmma::col_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, Tf32, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;

  // Splits an fp32 fragment into TF32 high and low parts (element-wise: layout-agnostic).
  template <typename Frag>
  __device__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int e = 0; e < hi.num_elements; ++e) {
      const float v = hi.x[e];
      hi.x[e] = nvcuda::wmma::__float_to_tf32(v);
      lo.x[e] = nvcuda::wmma::__float_to_tf32(v - hi.x[e]);
    }
  }
  template <typename FA>
  __device__ static void mma3(FragC& acc, const float* a, int lda, const float* b, int ldb) {
    FA a_hi, a_lo;
    FragB b_hi, b_lo;
    nvcuda::wmma::load_matrix_sync(a_hi, a, lda);
    nvcuda::wmma::load_matrix_sync(b_hi, b, ldb);
    split(a_hi, a_lo);
    split(b_hi, b_lo);
    nvcuda::wmma::mma_sync(acc, a_lo, b_hi, acc);
    nvcuda::wmma::mma_sync(acc, a_hi, b_lo, acc);
    nvcuda::wmma::mma_sync(acc, a_hi, b_hi, acc);
  }
  __device__ static void conv_step(FragC& acc, const float* a, int lda, const float* b, int ldb) {
    mma3<FragA>(acc, a, lda, b, ldb);
  }
  __device__ static void mix_step(FragC& acc, const float* p, const float*, int ldp, const float* x, int ldx) {
    mma3<FragAT>(acc, p, ldp, x, ldx);
  }
  __device__ static void store_p(float p, float* hi, float*) { *hi = p; }
};

// Shared-memory layout of mma_fuse_kernel; the host computes its size with a null base.
template <typename S, int CB>
struct MmaShared {
  static constexpr int kSkew = 32 / sizeof(S);  // keeps rows 32-byte aligned, shifts banks
  int ldx, ldw, ldp;
  S* x;        // [kMmaTile + k - 1, ldx] the tile's X with halo rows
  S* w;        // [w_chunk, ldw] weights of one tap and one chunk of channels
  float* z;    // [kMmaTile, ldz] the conv tile, then P
  S* p[2];     // [kMmaTile, ldp] P in the MMA operand type (hi, lo)
  float* run_max;  // [CB]
  float* run_sum;  // [CB]
  float* rescale;  // [CB]
  float* stage;    // [kMmaWarps, 256] per-warp staging of one fragment
  static constexpr int ldz = CB + 8;
  __host__ __device__ static MmaShared carve(SharedCarver& c, int channels, int kernel, int w_chunk,
                                             int p_parts) {
    MmaShared s;
    s.ldx = channels + kSkew;
    s.ldw = CB + kSkew;
    s.ldp = CB + kSkew;
    s.x = c.take<S>(static_cast<size_t>(kMmaTile + kernel - 1) * s.ldx);
    s.w = c.take<S>(static_cast<size_t>(w_chunk) * s.ldw);
    s.z = c.take<float>(static_cast<size_t>(kMmaTile) * ldz);
    s.p[0] = c.take<S>(static_cast<size_t>(kMmaTile) * s.ldp);
    s.p[1] = p_parts > 1 ? c.take<S>(static_cast<size_t>(kMmaTile) * s.ldp) : s.p[0];
    s.run_max = c.take<float>(CB);
    s.run_sum = c.take<float>(CB);
    s.rescale = c.take<float>(CB);
    s.stage = c.take<float>(static_cast<size_t>(kMmaWarps) * 256);
    return s;
  }
};

// What the tensor-core kernel reads besides FuseArgs: the weights as [k, 2d, C_pad] in the
// stored type (slots past C are zero), and how many channels of one tap go to shared memory
// at a time (a multiple of 16 that divides into 2d by the host's choice).
template <typename S>
struct MmaWeights {
  const S* w;
  int c_pad, w_chunk;
};

template <typename T, int CB>
__global__ void __launch_bounds__(kMmaThreads, 1) mma_fuse_kernel(FuseArgs<T> a, MmaWeights<T> mw) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Ops = MmaOps<T>;
  using S = typename Ops::Stored;
  using FragC = typename Ops::FragC;
  constexpr int kK = Ops::kK;
  constexpr int kZFrags = (kMmaTile / 16) * (CB / 16);
  constexpr int kZPerWarp = (kZFrags + kMmaWarps - 1) / kMmaWarps;
  constexpr int kThreadsPerSlot = kMmaThreads / CB;
  static_assert(kMmaThreads % CB == 0 && kThreadsPerSlot <= kWarpSize, "slot groups must fit in a warp");

  LOCOCO_SHARED_BUFFER(smem);
  SharedCarver carver{smem};
  const Problem& pb = a.pb;
  const int ch2 = pb.channels(), k = pb.kernel, pad = pb.pad(), C = pb.num_fused, H = pb.num_heavy;
  const MmaShared<S, CB> sh = MmaShared<S, CB>::carve(carver, ch2, k, mw.w_chunk, Ops::kPParts);
  const int slot_blocks = mw.c_pad / CB;
  const int row = blockIdx.x / slot_blocks, c0 = (blockIdx.x - row * slot_blocks) * CB;
  const int n_valid = a.sel.valid[row];
  if (n_valid < pb.slots()) return;
  const int n = n_valid - H;
  const auto keys = a.keys.row(row), values = a.values.row(row);
  const int32_t* rest = a.sel.rest + static_cast<int64_t>(row) * pb.rest_stride();
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  float* stage = sh.stage + warp * 256;

  // Row (within its 16 x 16 tile) of each accumulator element this thread holds.
  FragC row_of;
  for (int e = lane; e < 256; e += kWarpSize) stage[e] = static_cast<float>(e / 16);
  __syncwarp();
  wmma::load_matrix_sync(row_of, stage, 16, wmma::mem_row_major);

  const int o_row_frags = CB / 16, o_frags = o_row_frags * (ch2 / 16);
  FragC o[kMmaMaxOFrags];
#pragma unroll
  for (int q = 0; q < kMmaMaxOFrags; ++q) wmma::fill_fragment(o[q], 0.0f);
  for (int c = threadIdx.x; c < CB; c += blockDim.x) {
    sh.run_max[c] = neg_inf<float>();
    sh.run_sum[c] = 0.0f;
  }

  const int x_rows = kMmaTile + k - 1;
  for (int base = 0; base < n; base += kMmaTile) {
    // 1. X of positions base - pad .. base + kMmaTile + pad - 1 (zero outside R).
    for (int e = threadIdx.x; e < x_rows * ch2; e += blockDim.x) {
      const int r = e / ch2, ch = e - r * ch2, pos = base - pad + r;
      S v = from_acc<S>(0.0f);
      if (pos >= 0 && pos < n) {
        const int j = rest[pos];
        v = ch < pb.d ? keys.at(j, ch) : values.at(j, ch - pb.d);
      }
      sh.x[r * sh.ldx + ch] = v;
    }

    // 2. Z = sum over taps t and channels of X[r + t, ch] W[t, ch, c].
    FragC zf[kZPerWarp];
#pragma unroll
    for (int q = 0; q < kZPerWarp; ++q) wmma::fill_fragment(zf[q], 0.0f);
    const int z_row = (warp % 4) * 16;
    for (int t = 0; t < k; ++t) {
      for (int ch0 = 0; ch0 < ch2; ch0 += mw.w_chunk) {
        const int chunk = min(mw.w_chunk, ch2 - ch0);
        __syncthreads();  // the previous chunk is no longer read (and X is written)
        const S* w_src = mw.w + (static_cast<int64_t>(t) * ch2 + ch0) * mw.c_pad + c0;
        for (int e = threadIdx.x; e < chunk * CB; e += blockDim.x) {
          const int kk = e / CB, cc = e - kk * CB;
          sh.w[kk * sh.ldw + cc] = w_src[static_cast<int64_t>(kk) * mw.c_pad + cc];
        }
        __syncthreads();
        for (int kk = 0; kk < chunk; kk += kK) {
#pragma unroll
          for (int q = 0; q < kZPerWarp; ++q) {
            const int f = warp + kMmaWarps * q;
            if (f < kZFrags) {
              Ops::conv_step(zf[q], sh.x + (z_row + t) * sh.ldx + ch0 + kk, sh.ldx,
                             sh.w + kk * sh.ldw + (f / 4) * 16, sh.ldw);
            }
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kZPerWarp; ++q) {
      const int f = warp + kMmaWarps * q;
      if (f < kZFrags) wmma::store_matrix_sync(sh.z + z_row * sh.ldz + (f / 4) * 16, zf[q], sh.ldz, wmma::mem_row_major);
    }
    __syncthreads();

    // 3. Bias, ReLU, online softmax per slot: kThreadsPerSlot adjacent lanes share a slot.
    {
      const int col = threadIdx.x / kThreadsPerSlot, part = threadIdx.x % kThreadsPerSlot;
      const int c = c0 + col;
      const float bias = a.bias && c < C ? a.bias[c] : 0.0f;
      const float old_max = sh.run_max[col];
      float tile_max = neg_inf<float>();
      for (int r = part; r < kMmaTile; r += kThreadsPerSlot) {
        const float z = base + r < n ? relu_keep_nan(sh.z[r * sh.ldz + col] + bias) : neg_inf<float>();
        sh.z[r * sh.ldz + col] = z;
        tile_max = fmaxf(tile_max, z);
      }
#pragma unroll
      for (int o = kThreadsPerSlot / 2; o > 0; o /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, o));
      const float new_max = fmaxf(old_max, tile_max);
      float sum = 0.0f;
      for (int r = part; r < kMmaTile; r += kThreadsPerSlot) {
        const float p = expf(sh.z[r * sh.ldz + col] - new_max);
        Ops::store_p(p, sh.p[0] + r * sh.ldp + col, sh.p[1] + r * sh.ldp + col);
        sum += p;
      }
#pragma unroll
      for (int o = kThreadsPerSlot / 2; o > 0; o /= 2) sum += __shfl_xor_sync(kFullMask, sum, o);
      __syncwarp();
      if (part == 0) {
        const float scale = expf(old_max - new_max);
        sh.run_max[col] = new_max;
        sh.run_sum[col] = sh.run_sum[col] * scale + sum;
        sh.rescale[col] = scale;
      }
    }
    __syncthreads();

    // 4. O = O * rescale + P^T X over this tile.
#pragma unroll
    for (int q = 0; q < kMmaMaxOFrags; ++q) {
      const int f = warp + kMmaWarps * q;
      if (f < o_frags) {
        const int cr = f % o_row_frags, cc = f / o_row_frags;
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

  // Epilogue: slot c gets alpha * O / sum + (1 - alpha) * X[pick_c].
  const float alpha = *a.alpha;
  const int M = pb.slots(), d = pb.d;
  const int32_t* picks = a.sel.picks + static_cast<int64_t>(row) * C;
#pragma unroll
  for (int q = 0; q < kMmaMaxOFrags; ++q) {
    const int f = warp + kMmaWarps * q;
    if (f < o_frags) {
      const int cr = f % o_row_frags, cc = f / o_row_frags;
      wmma::store_matrix_sync(stage, o[q], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += kWarpSize) {
        const int r = e / 16, c = c0 + cr * 16 + r, ch = cc * 16 + e % 16;
        if (c < C) {
          const int pick = rest[picks[c]];
          const float x = a.x_at(keys, values, pick, ch);
          const T out = from_acc<T>(alpha * (stage[e] / sh.run_sum[cr * 16 + r]) + (1.0f - alpha) * x);
          const int64_t slot = (static_cast<int64_t>(row) * M + H + c) * d;
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
#endif
}

}  // namespace lococo::cuda
