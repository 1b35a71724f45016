// Tensor-core building blocks shared by the forward and backward kernels (WMMA, sm_80+).
//
// Two operand flavours:
//  * MmaOps<T>: operands in the input type. fp16/bf16 tiles are exact, products are exact,
//    accumulation is fp32; P (fp32) is split into a high and a low half in the input type.
//    fp32 inputs go through the 3xTF32 split (a_hi b_hi + a_hi b_lo + a_lo b_hi).
//  * Tf32: float tiles in shared memory, for operands computed in fp32 (P, dL/dZ). A split
//    operand is a_hi + a_lo in TF32 (about 21 bits); fp16 and bf16 values are exact in TF32
//    and need no split.
// Splits keep inf and NaN out of the low-part products, so non-finite inputs give the same
// inf / NaN pattern as the fp32 reference.
// WMMA leaves the register layout of accumulator fragments unspecified; where a kernel needs
// the row of an element it reads it off a fragment loaded from a matrix of row indices.
#pragma once

#include "fuse_kv_args.cuh"

namespace lococo::cuda {

constexpr int kMmaThreads = 256;
constexpr int kMmaWarps = kMmaThreads / kWarpSize;
constexpr int kMmaTile = 64;  // positions per tile

namespace wmma = nvcuda::wmma;

struct Tf32 {
  static constexpr int kK = 8;
  using Precision = wmma::precision::tf32;
  template <typename Layout>
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, Precision, Layout>;
  template <typename Layout>
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, Precision, Layout>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

  __device__ static bool finite(float v) { return fabsf(v) < INFINITY; }  // false for NaN too

  // Element-wise (independent of the register layout): hi = tf32(v); lo = tf32(v - hi) and
  // fin = hi where v is finite, both 0 where it is not. A low part is only ever multiplied by
  // the other operand's `fin`, so inf and NaN enter through hi * hi alone and the products
  // have IEEE semantics (inf * w = inf, inf * 0 = NaN), as in an fp32 reference.
  template <typename Frag>
  __device__ static void split(Frag& hi, Frag& lo, Frag& fin) {
#pragma unroll
    for (int e = 0; e < hi.num_elements; ++e) {
      const float v = hi.x[e];
      const float h = wmma::__float_to_tf32(v);
      const bool ok = finite(v);
      hi.x[e] = h;
      lo.x[e] = ok ? wmma::__float_to_tf32(v - h) : 0.0f;
      fin.x[e] = ok ? h : 0.0f;
    }
  }
  // For operands exact in TF32 (fp16 and bf16 values): hi = v, fin as above.
  template <typename Frag>
  __device__ static void exact(Frag& hi, Frag& fin) {
#pragma unroll
    for (int e = 0; e < hi.num_elements; ++e) {
      const float v = wmma::__float_to_tf32(hi.x[e]);
      hi.x[e] = v;
      fin.x[e] = finite(v) ? v : 0.0f;
    }
  }
  // acc += A (16 x 8) @ B (8 x 16), both float tiles in memory with the given layouts. A split
  // operand keeps about 21 bits; kSplitA and kSplitB say which ones need it.
  template <bool kSplitA, bool kSplitB, typename LayoutA, typename LayoutB>
  __device__ static void step(FragC& acc, const float* a, int lda, const float* b, int ldb) {
    FragA<LayoutA> a_hi, a_lo, a_fin;
    FragB<LayoutB> b_hi, b_lo, b_fin;
    wmma::load_matrix_sync(a_hi, a, lda);
    wmma::load_matrix_sync(b_hi, b, ldb);
    if constexpr (kSplitA) {
      split(a_hi, a_lo, a_fin);
    } else {
      exact(a_hi, a_fin);
    }
    if constexpr (kSplitB) {
      split(b_hi, b_lo, b_fin);
    } else {
      exact(b_hi, b_fin);
    }
    if constexpr (kSplitA) wmma::mma_sync(acc, a_lo, b_fin, acc);
    if constexpr (kSplitB) wmma::mma_sync(acc, a_fin, b_lo, acc);
    wmma::mma_sync(acc, a_hi, b_hi, acc);
  }
};

// Fragment types and multiply-accumulate steps with operands in the input type.
template <typename T>
struct MmaOps;

template <typename E>
struct MmaOps16 {
  static constexpr int kK = 16;
  static constexpr int kPParts = 2;  // P stored as hi + lo in E
  using Stored = E;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major>;
  using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  // acc += A (row-major at a) @ B (row-major at b); both exact in E.
  __device__ static void step(FragC& acc, const E* a, int lda, const E* b, int ldb) {
    FragA fa;
    FragB fb;
    wmma::load_matrix_sync(fa, a, lda);
    wmma::load_matrix_sync(fb, b, ldb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  // acc += P^T (column-major, hi and lo parts) @ X (row-major at x). The low part meets X with
  // its inf and NaN zeroed, so those enter through hi * X alone, as in an fp32 reference.
  __device__ static void mix_step(FragC& acc, const E* p_hi, const E* p_lo, int ldp, const E* x, int ldx) {
    FragAT hi, lo;
    FragB fx, fx_finite;
    wmma::load_matrix_sync(lo, p_lo, ldp);
    wmma::load_matrix_sync(hi, p_hi, ldp);
    wmma::load_matrix_sync(fx, x, ldx);
#pragma unroll
    for (int e = 0; e < fx.num_elements; ++e) {
      fx_finite.x[e] = fabsf(to_acc(fx.x[e])) < INFINITY ? fx.x[e] : from_acc<E>(0.0f);
    }
    wmma::mma_sync(acc, lo, fx_finite, acc);
    wmma::mma_sync(acc, hi, fx, acc);
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
  static constexpr int kK = Tf32::kK;
  static constexpr int kPParts = 1;
  using Stored = float;
  using FragC = Tf32::FragC;
  __device__ static void step(FragC& acc, const float* a, int lda, const float* b, int ldb) {
    Tf32::step<true, true, wmma::row_major, wmma::row_major>(acc, a, lda, b, ldb);
  }
  __device__ static void mix_step(FragC& acc, const float* p, const float*, int ldp, const float* x, int ldx) {
    Tf32::step<true, true, wmma::col_major, wmma::row_major>(acc, p, ldp, x, ldx);
  }
  __device__ static void store_p(float p, float* hi, float*) { *hi = p; }
};

// Rows of 32-byte-aligned tiles (WMMA pointers must be 256-bit aligned) with a skew of 32
// bytes against shared-memory bank conflicts.
template <typename S>
__host__ __device__ constexpr int skewed(int columns) {
  return columns + static_cast<int>(32 / sizeof(S));
}

// The weights as [k, 2d, C_pad] in the stored type of the input type T (zero past C), and
// how many channels of one tap the conv stages in shared memory at a time (a multiple of 16).
template <typename T>
struct MmaWeights {
  const typename MmaOps<T>::Stored* w;
  int c_pad, w_chunk;
};

// Row (within its 16 x 16 tile) of every accumulator element this thread holds.
template <typename FragC>
__device__ void accumulator_rows(FragC& rows, float* warp_stage) {
  for (int e = threadIdx.x % kWarpSize; e < 256; e += kWarpSize) warp_stage[e] = static_cast<float>(e / 16);
  __syncwarp();
  wmma::load_matrix_sync(rows, warp_stage, 16, wmma::mem_row_major);
  __syncwarp();
}

// Gathers X = [K ; V] of positions first .. first + rows - 1 of R into x (row-major, leading
// dimension ldx, 32-byte aligned rows), zero outside [0, n). Copies 16 bytes at a time where
// the cache is contiguous along d and aligned (d % 8 == 0 keeps every 16 bytes in K or V).
template <typename T>
__device__ void gather_x(T* x, int ldx, int rows, int first, const FuseArgs<T>& a, const RowEntries<const T>& keys,
                         const RowEntries<const T>& values, const int32_t* rest, int n) {
  constexpr int kVec = 16 / sizeof(T);
  const int d = a.pb.d, vectors = a.pb.channels() / kVec;
  for (int e = threadIdx.x; e < rows * vectors; e += blockDim.x) {
    const int r = e / vectors, ch = (e - r * vectors) * kVec, pos = first + r;
    T* to = x + r * ldx + ch;
    if (pos < 0 || pos >= n) {
      *reinterpret_cast<uint4*>(to) = make_uint4(0, 0, 0, 0);
      continue;
    }
    const int j = rest[pos];
    const RowEntries<const T>& src = ch < d ? keys : values;
    const int c = ch < d ? ch : ch - d;
    const T* from = &src.at(j, c);
    if (src.dim_stride(j) == 1 && reinterpret_cast<uintptr_t>(from) % 16 == 0) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    } else {
      for (int i = 0; i < kVec; ++i) to[i] = src.at(j, c + i);
    }
  }
}

// Z[kMmaTile, CB] += conv of the X tile (with halo) for the slots c0 .. c0 + CB - 1: an
// implicit GEMM over (tap, channel). The A operand of tap t is X shifted by t rows. Weights
// go through shared memory w_chunk channels at a time. Warp w owns rows 16 (w % 4) and
// column tiles w / 4 + 2 q. Starts and ends with a barrier-separated use of `w_tile`.
template <typename T, int CB, int kZPerWarp>
__device__ void conv_tile(typename MmaOps<T>::FragC (&z)[kZPerWarp], const typename MmaOps<T>::Stored* x, int ldx,
                          typename MmaOps<T>::Stored* w_tile, int ldw, const MmaWeights<T>& mw, int c0, int ch2,
                          int kernel) {
  using Ops = MmaOps<T>;
  constexpr int kZFrags = (kMmaTile / 16) * (CB / 16);
  const int warp = threadIdx.x / kWarpSize, z_row = (warp % 4) * 16;
  for (int t = 0; t < kernel; ++t) {
    for (int ch0 = 0; ch0 < ch2; ch0 += mw.w_chunk) {
      const int chunk = min(mw.w_chunk, ch2 - ch0);
      __syncthreads();  // the previous chunk is no longer read (and the X tile is written)
      // 16-byte copies: c_pad, c0 and CB are multiples of 16 elements, rows are 32-byte aligned.
      const auto* w_src = mw.w + (static_cast<int64_t>(t) * ch2 + ch0) * mw.c_pad + c0;
      constexpr int kVec = 16 / sizeof(*w_tile), kRowVectors = CB / kVec;
      for (int e = threadIdx.x; e < chunk * kRowVectors; e += blockDim.x) {
        const int kk = e / kRowVectors, cc = (e - kk * kRowVectors) * kVec;
        *reinterpret_cast<uint4*>(w_tile + kk * ldw + cc) =
            *reinterpret_cast<const uint4*>(w_src + static_cast<int64_t>(kk) * mw.c_pad + cc);
      }
      __syncthreads();
      for (int kk = 0; kk < chunk; kk += Ops::kK) {
#pragma unroll
        for (int q = 0; q < kZPerWarp; ++q) {
          const int f = warp + kMmaWarps * q;
          if (f < kZFrags) Ops::step(z[q], x + (z_row + t) * ldx + ch0 + kk, ldx, w_tile + kk * ldw + (f / 4) * 16, ldw);
        }
      }
    }
  }
}

}  // namespace lococo::cuda
