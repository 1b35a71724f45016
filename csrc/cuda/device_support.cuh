// Device-side building blocks of the fuse_kv kernels: element conversions, the score ordering
// key, and warp and block reductions and scans.
//
// Every kernel takes all of its shared memory from one dynamic buffer (dynamic_shared_memory()),
// carved with SharedCarver; no kernel declares static __shared__ arrays. That keeps the sizes
// explicit on the host side (each layout is computed by the same code on host and device), and
// it is the one seam through which tools/emulator runs these kernels on the CPU: it defines the
// buffer and the CUDA built-ins, and includes this header unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace lococo::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: float for fp32/fp16/bf16, double for fp64 (docs/design.md#dtypes-and-accumulation).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__host__ __device__ __forceinline__ float to_acc(float x) { return x; }
__host__ __device__ __forceinline__ double to_acc(double x) { return x; }
__host__ __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest conversion from the accumulation type to the element type.
template <typename T>
__host__ __device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
template <typename Acc>
__device__ __forceinline__ Acc neg_inf() {
  return -std::numeric_limits<Acc>::infinity();
}

// ReLU that lets NaN through, as torch.relu does.
template <typename Acc>
__device__ __forceinline__ Acc relu_keep_nan(Acc x) {
  return x > Acc(0) || x != x ? x : Acc(0);
}

// Monotone key of a score: larger score, larger key; NaN lowest; -0 equals +0. Equal keys are
// ranked by position (lower first) by the selection code. float64 scores get 64-bit keys;
// float32, float16 and bfloat16 scores (exact in float) get 32-bit keys.
template <typename Bits, typename F>
__device__ __forceinline__ Bits ordered_bits(F s) {
  constexpr Bits kSign = Bits{1} << (8 * sizeof(Bits) - 1);
  if (s != s) return 0;
  if (s == F(0)) s = F(0);
  Bits bits;
  memcpy(&bits, &s, sizeof bits);
  return (bits & kSign) ? ~bits : (bits | kSign);
}
__device__ __forceinline__ uint64_t score_key(double s) { return ordered_bits<uint64_t>(s); }
__device__ __forceinline__ uint32_t score_key(float s) { return ordered_bits<uint32_t>(s); }
__device__ __forceinline__ uint32_t score_key(__half s) { return score_key(__half2float(s)); }
__device__ __forceinline__ uint32_t score_key(__nv_bfloat16 s) { return score_key(__bfloat162float(s)); }

// The block's dynamic shared memory (the size is given at launch).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(128) unsigned char lococo_dynamic_shared[];
  return lococo_dynamic_shared;
}

// Hands out aligned pieces of one shared-memory buffer. Host code uses the same type with a
// null base to compute the total size, so layouts are written once.
struct SharedCarver {
  unsigned char* base;
  size_t offset = 0;
  template <typename U>
  __host__ __device__ U* take(size_t count, size_t align = 128) {
    offset = (offset + align - 1) / align * align;
    U* p = reinterpret_cast<U*>(base + offset);
    offset += count * sizeof(U);
    return p;
  }
  __host__ __device__ size_t size() const { return offset; }
};

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename V>
__device__ __forceinline__ V warp_max(V v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = max_acc(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Shared scratch that the block reductions and scans need: one slot per warp plus a result.
template <typename V>
__host__ __device__ constexpr size_t block_scratch_count(int threads) {
  return static_cast<size_t>(threads / kWarpSize + 1);
}

// Reduces one value per thread over the block in a fixed order (warps, then warp totals), the
// same on every run, with `combine` and its warp version `warp_combine`. The result is returned
// to every thread. Every thread of the block must call it.
template <typename V, typename Combine, typename WarpCombine>
__device__ V block_reduce(V v, V* scratch, Combine combine, WarpCombine warp_combine) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_combine(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    V total = scratch[0];
    for (int w = 1; w < warps; ++w) total = combine(total, scratch[w]);
    scratch[warps] = total;
  }
  __syncthreads();
  const V total = scratch[warps];
  __syncthreads();  // the scratch is free again once every thread has read the total
  return total;
}

template <typename V>
__device__ V block_sum(V v, V* scratch) {
  return block_reduce(v, scratch, [](V x, V y) { return x + y; }, [](V x) { return warp_sum(x); });
}

// Maximum over the block (NaN is ignored, as by fmax).
template <typename V>
__device__ V block_max(V v, V* scratch) {
  return block_reduce(v, scratch, [](V x, V y) { return max_acc(x, y); }, [](V x) { return warp_max(x); });
}

// Exclusive prefix sum of one int per thread in thread order; *total gets the block's sum.
__device__ inline int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  int inclusive = v;
#pragma unroll
  for (int o = 1; o < kWarpSize; o *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int w = 0; w < warps; ++w) {
      const int t = scratch[w];
      scratch[w] = running;
      running += t;
    }
    scratch[warps] = running;
  }
  __syncthreads();
  const int result = scratch[warp] + inclusive - v;
  *total = scratch[warps];
  __syncthreads();
  return result;
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace lococo::cuda
