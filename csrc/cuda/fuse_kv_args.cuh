// What the fuse_kv kernels read and write, as plain pointers and sizes (no torch types).
//
// Rows are (batch, KV head) pairs, row = b * heads + h. The logical cache of a row is
// [mem ; new] along the sequence; positions are cache positions in [0, L).
#pragma once

#include <cstdint>

#include "device_support.cuh"

namespace lococo::cuda {

// One [batch, heads, seq, d] tensor with arbitrary strides.
template <typename T>
struct Strided4 {
  T* data;
  int64_t batch_stride, head_stride, seq_stride, dim_stride;
};

// The entries of one row: [mem ; new] without a concat.
template <typename T>
struct RowEntries {
  T* mem;
  T* fresh;
  int64_t mem_seq, mem_dim, new_seq, new_dim;
  int mem_len;
  __device__ __forceinline__ T& at(int j, int c) const {
    return j < mem_len ? mem[j * mem_seq + c * mem_dim] : fresh[(j - mem_len) * new_seq + c * new_dim];
  }
  // The distance between the features of entry j (1 where it is contiguous along d).
  __device__ __forceinline__ int64_t dim_stride(int j) const { return j < mem_len ? mem_dim : new_dim; }
};

// Keys or values (or their gradients) of every row.
template <typename T>
struct CacheEntries {
  Strided4<T> mem, fresh;
  int mem_len, heads;
  __device__ __forceinline__ RowEntries<T> row(int r) const {
    const int b = r / heads, h = r - b * heads;
    T* m = mem.data ? mem.data + b * mem.batch_stride + h * mem.head_stride : nullptr;
    T* f = fresh.data ? fresh.data + b * fresh.batch_stride + h * fresh.head_stride : nullptr;
    return {m, f, mem.seq_stride, mem.dim_stride, fresh.seq_stride, fresh.dim_stride, mem_len};
  }
};

// Sizes shared by every kernel of one call.
struct Problem {
  int rows, heads, length, d, num_heavy, num_local, num_fused, kernel;
  __host__ __device__ int slots() const { return num_heavy + num_fused; }
  __host__ __device__ int channels() const { return 2 * d; }
  __host__ __device__ int pad() const { return (kernel - 1) / 2; }
  // Room per row for the rest R (at most L - H entries).
  __host__ __device__ int rest_stride() const { return length - num_heavy; }
};

// The selection of every row, written by select_kernel (int32 index arrays in global memory).
struct Selection {
  int32_t* valid;      // [rows] valid entries of the row; < H + C means the row is kept whole
  int32_t* heavy;      // [rows, H] heavy-hitter positions, ascending
  int32_t* rest;       // [rows, rest_stride] positions of R, ascending (first valid - H used)
  int32_t* picks;      // [rows, C] residual picks as indices into R, ascending
  int32_t* pick_slot;  // [rows, rest_stride] the slot that picks R[i], or -1
};

// What every kernel over the rest R of one row reads first: n, the count of R's entries (< 0
// or less than C when the row is kept whole and nothing is fused), R's positions and the cache.
template <typename T>
struct RowRest {
  int n;
  const int32_t* rest;  // [n] positions of R, ascending
  RowEntries<const T> keys, values;
};

// Inputs and outputs of the forward, and the extra ones of the backward.
template <typename T>
struct FuseArgs {
  using Acc = acc_t<T>;
  Problem pb;
  Selection sel;
  CacheEntries<const T> keys, values;
  const T* weight;    // [C, 2d, k] contiguous, read by the generic kernels
  const Acc* weight_by_tap;  // [k, C, 2d] the same in Acc, for the tensor-core backward (else nullptr)
  const T* bias;      // [C] or nullptr
  const T* alpha;     // one element
  T* out_k;           // [rows, H + C, d] contiguous
  T* out_v;
  // Forward split over the positions (tensor-core path, small grids): each slot group's
  // positions are shared by `splits` blocks, whose softmax statistics and unnormalised mixes
  // go to `partial`, [rows, C, splits, kPartialO + 2d] floats, for mma_combine_kernel.
  int splits = 1;
  float* partial = nullptr;
  // Backward only.
  const T* grad_k;        // [rows, H + C, d] contiguous
  const T* grad_v;
  CacheEntries<T> d_keys, d_values;  // contiguous, zero-filled before the kernels run
  Acc* stats;             // [rows, C, kStatCount]
  Acc* probs;             // [rows, C, rest_stride]  P
  Acc* grad_z;            // [rows, C, rest_stride]  dL/dZ before the ReLU
  Acc* grad_bias_rows;    // [rows, bias_parts, C] partial sums of the bias gradient
  int bias_parts = 1;     // per row: 1, or the tiles of R in the tensor-core backward
  Acc* grad_weight;       // [k, 2d, C]
  Acc* grad_bias;         // [C]
  Acc* grad_alpha;        // [1]

  __device__ __forceinline__ RowRest<T> row_rest(int row) const {
    return {sel.valid[row] - pb.num_heavy, sel.rest + static_cast<int64_t>(row) * pb.rest_stride(), keys.row(row),
            values.row(row)};
  }

  __device__ __forceinline__ Acc x_at(const RowEntries<const T>& k, const RowEntries<const T>& v, int j,
                                      int ch) const {
    return ch < pb.d ? to_acc(k.at(j, ch)) : to_acc(v.at(j, ch - pb.d));
  }
};

// Layout of one block's share in FuseArgs::partial: running max, running sum, then the mix O.
enum Partial { kPartialMax = 0, kPartialSum = 1, kPartialO = 2 };

// Per (row, fused slot) statistics of the softmax, recomputed by the backward.
enum Stat { kStatMax = 0, kStatSum = 1, kStatDot = 2, kStatAlpha = 3, kStatCount = 4 };

}  // namespace lococo::cuda
