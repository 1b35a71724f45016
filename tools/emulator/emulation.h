// Runs the fuse_kv CUDA kernels on the CPU, for checking their logic on machines without a GPU.
//
// Each thread block runs as one fiber (ucontext) per CUDA thread, scheduled cooperatively:
// __syncthreads and the warp collectives are barriers that switch fibers. Shared memory is
// filled with 0xff (NaN / -1) before each block so uninitialised reads show. Threads run in
// index order (or reversed, EMU_REVERSE=1) between barriers, so a missing barrier makes a
// thread read data its neighbour has not written yet. WMMA is emulated with every lane holding
// the whole tile (element e of a fragment is (e / cols, e % cols)); stores are done by the
// last lane only, so a missing __syncwarp after a store shows too. Mistakes that abort: a
// barrier reached by some threads after others exited, a deadlock, a partial warp.
//
// Only what the kernels use is here. Included by emulated_ops.cpp before the production
// headers, which are compiled unchanged by the host compiler: the CUDA headers give the host
// meaning of __device__ and friends, this file the built-ins, the warp collectives, WMMA, and
// the dynamic shared memory that csrc/cuda/device_support.cuh declares.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#define __launch_bounds__(...)

using std::max;
using std::min;

namespace lococo::cuda {
constexpr size_t kEmulatedSharedBytes = 227 * 1024;  // H100 / H200 opt-in limit per block
// The dynamic shared memory of the block that runs (one at a time).
alignas(128) inline unsigned char lococo_dynamic_shared[kEmulatedSharedBytes];
}  // namespace lococo::cuda

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Fiber {
  ucontext_t context;
  dim3 index;
  int linear = 0;
  bool done = false;
};

struct BlockState {
  dim3 grid, block, block_index;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  bool progress = false;
  int exited = 0;
  // Block barrier.
  long block_generation = 0;
  int block_arrived = 0;
  // Warp barriers and the exchange buffers of the shuffles.
  std::vector<long> warp_generation;
  std::vector<int> warp_arrived;
  std::vector<unsigned char> exchange;  // [warps][32][16]
  std::function<void()> body;
};

inline BlockState*& state() {
  static BlockState* s = nullptr;
  return s;
}
inline Fiber& self() { return state()->fibers[state()->current]; }

inline void yield() {
  BlockState& s = *state();
  swapcontext(&s.fibers[s.current].context, &s.scheduler);
}

inline void block_barrier() {
  BlockState& s = *state();
  if (s.exited > 0) fail("__syncthreads reached after some threads of the block exited");
  const long generation = s.block_generation;
  s.progress = true;
  if (++s.block_arrived == static_cast<int>(s.fibers.size())) {
    s.block_arrived = 0;
    ++s.block_generation;
    return;
  }
  while (s.block_generation == generation) yield();
}

inline void warp_barrier() {
  BlockState& s = *state();
  const int warp = self().linear / 32;
  const long generation = s.warp_generation[warp];
  s.progress = true;
  if (++s.warp_arrived[warp] == 32) {
    s.warp_arrived[warp] = 0;
    ++s.warp_generation[warp];
    return;
  }
  while (s.warp_generation[warp] == generation) yield();
}

inline int lane() { return self().linear % 32; }

template <typename V>
V exchange(V v, int source_lane) {
  static_assert(sizeof(V) <= 16, "exchange of a value larger than 16 bytes");
  BlockState& s = *state();
  const int warp = self().linear / 32;
  unsigned char* buf = s.exchange.data() + static_cast<size_t>(warp) * 32 * 16;
  std::memcpy(buf + lane() * 16, &v, sizeof(V));
  warp_barrier();
  V out;
  std::memcpy(&out, buf + source_lane * 16, sizeof(V));
  warp_barrier();
  return out;
}

inline void fiber_entry() {
  BlockState& s = *state();
  s.body();
  s.fibers[s.current].done = true;
  s.progress = true;
  ++s.exited;
  if (s.block_arrived > 0) fail("a thread exited while others wait at __syncthreads");
}

struct Stacks {
  std::vector<std::unique_ptr<char[]>> stacks;
  static constexpr size_t kSize = 256 * 1024;
  char* get(size_t i) {
    while (stacks.size() <= i) stacks.emplace_back(new char[kSize]);
    return stacks[i].get();
  }
};

inline bool reverse_order() {
  static const bool reverse = [] {
    const char* v = std::getenv("EMU_REVERSE");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return reverse;
}

template <typename... Params>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, const Params&... params) {
  static Stacks stacks;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads % 32 != 0) fail("block size is not a whole number of warps");
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockState s;
        s.grid = grid;
        s.block = block;
        s.block_index = dim3(bx, by, bz);
        if (shared_bytes > lococo::cuda::kEmulatedSharedBytes) fail("shared memory over the emulated limit");
        std::memset(lococo::cuda::lococo_dynamic_shared, 0xff, shared_bytes);
        s.fibers.resize(threads);
        s.warp_generation.assign(threads / 32, 0);
        s.warp_arrived.assign(threads / 32, 0);
        s.exchange.assign(static_cast<size_t>(threads / 32) * 32 * 16, 0);
        s.body = [&] { kernel(params...); };
        state() = &s;
        for (int t = 0; t < threads; ++t) {
          Fiber& f = s.fibers[t];
          f.linear = t;
          f.index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = stacks.get(t);
          f.context.uc_stack.ss_size = Stacks::kSize;
          f.context.uc_link = &s.scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        int remaining = threads;
        while (remaining > 0) {
          s.progress = false;
          for (int step = 0; step < threads; ++step) {
            const int t = reverse_order() ? threads - 1 - step : step;
            if (s.fibers[t].done) continue;
            s.current = t;
            swapcontext(&s.scheduler, &s.fibers[t].context);
            if (s.fibers[t].done) --remaining;
          }
          if (!s.progress && remaining > 0) fail("deadlock: threads wait at barriers that never complete");
        }
        state() = nullptr;
      }
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::self().index)
#define blockIdx (::emu::state()->block_index)
#define blockDim (::emu::state()->block)
#define gridDim (::emu::state()->grid)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }

inline void check_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) emu::fail("warp collective with a partial mask");
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  check_full_mask(mask);
  return emu::exchange(v, emu::lane() ^ lane_mask);
}
template <typename V>
V __shfl_up_sync(unsigned mask, V v, unsigned delta) {
  check_full_mask(mask);
  const int l = emu::lane();
  return emu::exchange(v, l >= static_cast<int>(delta) ? l - static_cast<int>(delta) : l);
}
template <typename V>
V __shfl_sync(unsigned mask, V v, int source) {
  check_full_mask(mask);
  return emu::exchange(v, source);
}

inline int atomicAdd(int* p, int v) {  // fibers never run concurrently
  const int old = *p;
  *p = old + v;
  return old;
}

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

inline float emu_float(float x) { return x; }
inline float emu_float(__half x) { return __half2float(x); }
inline float emu_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  element_type x[num_elements];
};

// TF32 keeps 10 mantissa bits; round to nearest, ties away from zero (cvt.rna.tf32.f32).
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("load_matrix_sync: pointer not 32-byte aligned");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[r + c * ldm] : p[r * ldm + c];
    }
  }
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("load_matrix_sync: pointer not 32-byte aligned");
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("store_matrix_sync: pointer not 32-byte aligned");
  if (emu::lane() != 31) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.x[r * N + c];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) acc += emu_float(a.x[m * K + k]) * emu_float(b.x[k * N + n]);
      out[m * N + n] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

}  // namespace nvcuda::wmma
