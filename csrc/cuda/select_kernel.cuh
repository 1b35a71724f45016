// Steps 1-3 of SPEC section 2 for every row: heavy hitters, the rest R, and the residual picks.
//
// One block per row. Each "best K of a set" is an exact radix select on 64-bit score keys
// (8 passes of 8 bits, a 256-bin histogram in shared memory) followed by one pass in position
// order that keeps every entry above the threshold key and the first entries equal to it.
// That is the order of SPEC section 2 (larger score first, NaN last, ties to the lower
// position) for any L, with O(L) work per pass and no sort.
#pragma once

#include "fuse_kv_args.cuh"

namespace lococo::cuda {

constexpr int kSelectThreads = 256;

struct SelectArgs {
  Problem pb;
  Selection sel;
  const double* scores;      // [rows, L] contiguous
  const int64_t* valid_len;  // [batch] or nullptr
};

struct SelectShared {
  int* histogram;          // [256]
  int* scan;               // block scan scratch
  unsigned long long* cut; // [2] threshold key, entries equal to it still to take
  __host__ __device__ static SelectShared carve(SharedCarver& c, int threads) {
    SelectShared s;
    s.histogram = c.take<int>(256);
    s.scan = c.take<int>(block_scratch_count<int>(threads));
    s.cut = c.take<unsigned long long>(2);
    return s;
  }
};

// Entries whose key is above `key`, then the first `take_equal` entries whose key equals it.
struct Threshold {
  uint64_t key;
  int take_equal;
};

// The threshold of the best `need` of `count` keys key_of(0..count-1).
template <typename KeyOf>
__device__ Threshold radix_threshold(KeyOf key_of, int count, int need, const SelectShared& sh) {
  if (need <= 0) return {~uint64_t{0}, 0};  // no key equals ~0: NaN maps to 0, +inf below it
  uint64_t prefix = 0, mask = 0;
  int remaining = need;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.histogram[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const uint64_t key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&sh.histogram[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int bin = 255;
      for (; bin > 0 && sh.histogram[bin] < remaining; --bin) remaining -= sh.histogram[bin];
      sh.cut[0] = prefix | (static_cast<uint64_t>(bin) << shift);
      sh.cut[1] = static_cast<unsigned long long>(remaining);
    }
    __syncthreads();
    prefix = sh.cut[0];
    remaining = static_cast<int>(sh.cut[1]);
    mask |= uint64_t{255} << shift;
    // No barrier needed here: thread 0 rewrites cut[] only after two more barriers.
  }
  return {prefix, remaining};
}

// Walks 0..count-1 in order and calls emit(i, chosen, number of chosen entries before i).
template <typename KeyOf, typename Emit>
__device__ void emit_chosen(KeyOf key_of, int count, Threshold th, const SelectShared& sh, Emit emit) {
  int equal_before = 0, chosen_before = 0;
  for (int base = 0; base < count; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool inside = i < count;
    const uint64_t key = inside ? key_of(i) : 0;
    const bool equal = inside && key == th.key;
    int equal_total = 0, chosen_total = 0;
    const int equal_rank = equal_before + block_exclusive_scan(equal, sh.scan, &equal_total);
    const bool chosen = inside && (key > th.key || (equal && equal_rank < th.take_equal));
    const int chosen_rank = chosen_before + block_exclusive_scan(chosen, sh.scan, &chosen_total);
    if (inside) emit(i, chosen, chosen_rank);
    equal_before += equal_total;
    chosen_before += chosen_total;
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectArgs a) {
  SharedCarver carver{dynamic_shared_memory()};
  const SelectShared sh = SelectShared::carve(carver, blockDim.x);
  const Problem& pb = a.pb;
  const int row = blockIdx.x, L = pb.length, H = pb.num_heavy, l = pb.num_local;
  const int C = pb.num_fused, stride = pb.rest_stride();
  int n_valid = L;
  if (a.valid_len) {
    const int64_t v = a.valid_len[row / pb.heads];
    n_valid = v < 0 ? 0 : (v > L ? L : static_cast<int>(v));
  }
  if (threadIdx.x == 0) a.sel.valid[row] = n_valid;
  if (n_valid < pb.slots()) return;  // kept whole; the whole block leaves together

  const int start = L - n_valid;
  const double* scores = a.scores + static_cast<int64_t>(row) * L;
  int32_t* heavy = a.sel.heavy + static_cast<int64_t>(row) * H;
  int32_t* rest = a.sel.rest + static_cast<int64_t>(row) * stride;

  // 1-2. The best H - l valid entries before the l local ones; the others form R.
  const int candidates = n_valid - l;
  auto candidate_key = [&](int i) { return score_key(scores[start + i]); };
  const Threshold heavy_cut = radix_threshold(candidate_key, candidates, H - l, sh);
  emit_chosen(candidate_key, candidates, heavy_cut, sh, [&](int i, bool chosen, int rank) {
    if (chosen) {
      heavy[rank] = start + i;
    } else {
      rest[i - rank] = start + i;
    }
  });
  for (int i = threadIdx.x; i < l; i += blockDim.x) heavy[H - l + i] = L - l + i;
  __syncthreads();  // rest[] is read back by other threads below

  // 3. The best C entries of R, by index into R.
  const int n_rest = n_valid - H;
  int32_t* picks = a.sel.picks + static_cast<int64_t>(row) * C;
  int32_t* pick_slot = a.sel.pick_slot + static_cast<int64_t>(row) * stride;
  auto rest_key = [&](int i) { return score_key(scores[rest[i]]); };
  const Threshold pick_cut = radix_threshold(rest_key, n_rest, C, sh);
  emit_chosen(rest_key, n_rest, pick_cut, sh, [&](int i, bool chosen, int rank) {
    if (chosen) picks[rank] = i;
    pick_slot[i] = chosen ? rank : -1;
  });
}

}  // namespace lococo::cuda
