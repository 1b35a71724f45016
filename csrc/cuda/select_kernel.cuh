// Steps 1-3 of the algorithm for every row: heavy hitters, the rest R, and the residual picks.
//
// One block per row. Each "best K of a set" is an exact radix select on the score keys
// (score_key: 32 bits for float, half and bfloat16 scores, 64 for double; 8 bits per pass, a
// 256-bin histogram in shared memory, the bin found by one warp's scan) followed by one pass in
// position order that keeps every entry above the threshold and the first entries equal to
// it. The passes stop as soon as the threshold's bin holds exactly the entries still to take.
// That is the order of the reference (larger score first, NaN last, ties to the lower
// position) for any L, with O(L) work per pass and no sort. Scores are read in their own dtype.
#pragma once

#include "fuse_kv_args.cuh"

namespace lococo::cuda {

constexpr int kSelectThreads = 256;
constexpr int kRadixBins = 256;

template <typename S>
struct SelectArgs {
  Problem pb;
  Selection sel;
  const S* scores;           // [rows, L] contiguous
  const int64_t* valid_len;  // [batch] or nullptr
};

struct SelectShared {
  int* histogram;          // [256]
  int* scan;               // block scan scratch
  unsigned long long* cut; // [3] threshold prefix, entries equal to it still to take, settled
  __host__ __device__ static SelectShared carve(SharedCarver& c, int threads) {
    SelectShared s;
    s.histogram = c.take<int>(kRadixBins);
    s.scan = c.take<int>(block_scratch_count<int>(threads));
    s.cut = c.take<unsigned long long>(3);
    return s;
  }
};

// Entries whose key, under `mask`, is above `key`, then the first `take_equal` entries whose
// masked key equals it.
template <typename Key>
struct Threshold {
  Key key, mask;
  int take_equal;
};

// Warp 0 finds the bin of the need-th largest key, bins scanned from the top: lane l sums bins
// 255 - 8l down to 248 - 8l, a scan over lanes finds the lane where the count reaches `need`,
// and that lane walks its 8 bins. Writes the bin, the entries of it still to take, and whether
// the bin holds exactly those (then the selection is settled) to cut[].
__device__ inline void find_bin(const SelectShared& sh, int need) {
  constexpr int kPerLane = kRadixBins / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int top = kRadixBins - 1 - kPerLane * lane;
  int mine = 0;
  for (int b = 0; b < kPerLane; ++b) mine += sh.histogram[top - b];
  int inclusive = mine;
#pragma unroll
  for (int o = 1; o < kWarpSize; o *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  int first = inclusive >= need ? lane : kWarpSize;
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) first = min(first, __shfl_xor_sync(kFullMask, first, o));
  if (lane == first) {
    int remaining = need - (inclusive - mine), bin = top;
    while (bin > top - kPerLane + 1 && sh.histogram[bin] < remaining) remaining -= sh.histogram[bin--];
    sh.cut[0] = static_cast<unsigned long long>(bin);
    sh.cut[1] = static_cast<unsigned long long>(remaining);
    sh.cut[2] = sh.histogram[bin] == remaining;
  }
}

// The threshold of the best `need` of `count` keys key_of(0..count-1).
template <typename Key, typename KeyOf>
__device__ Threshold<Key> radix_threshold(KeyOf key_of, int count, int need, const SelectShared& sh) {
  if (need <= 0) return {~Key{0}, ~Key{0}, 0};  // no key equals ~0: NaN maps to 0, +inf below it
  if (need >= count) return {Key{0}, Key{0}, count};  // every key, in position order
  Key prefix = 0, mask = 0;
  int remaining = need;
  for (int shift = 8 * static_cast<int>(sizeof(Key)) - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) sh.histogram[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const Key key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&sh.histogram[(key >> shift) & (kRadixBins - 1)], 1);
    }
    __syncthreads();
    if (threadIdx.x < kWarpSize) find_bin(sh, remaining);
    __syncthreads();
    prefix |= static_cast<Key>(sh.cut[0]) << shift;
    remaining = static_cast<int>(sh.cut[1]);
    mask |= static_cast<Key>(kRadixBins - 1) << shift;
    // No barrier needed before the next pass rewrites cut[]: two barriers come first.
    if (sh.cut[2] != 0) break;
  }
  return {prefix, mask, remaining};
}

// Walks 0..count-1 in order and calls emit(i, chosen, number of chosen entries before i).
template <typename Key, typename KeyOf, typename Emit>
__device__ void emit_chosen(KeyOf key_of, int count, Threshold<Key> th, const SelectShared& sh, Emit emit) {
  int equal_before = 0, chosen_before = 0;
  for (int base = 0; base < count; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool inside = i < count;
    const Key key = inside ? static_cast<Key>(key_of(i) & th.mask) : Key{0};
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

template <typename S>
__global__ void __launch_bounds__(kSelectThreads) select_kernel(SelectArgs<S> a) {
  using Key = decltype(score_key(S{}));
  SharedCarver carver{dynamic_shared_memory()};
  const SelectShared sh = SelectShared::carve(carver, blockDim.x);
  const Problem& pb = a.pb;
  const int row = blockIdx.x, L = pb.length, H = pb.num_heavy, l = pb.num_local;
  const int C = pb.num_fused, stride = pb.rest_stride();
  int n_valid = L;
  if (a.valid_len) {  // clamped: the launcher does not read the lengths on the host
    const int64_t v = a.valid_len[row / pb.heads];
    n_valid = v < 0 ? 0 : (v > L ? L : static_cast<int>(v));
  }
  if (threadIdx.x == 0) a.sel.valid[row] = n_valid;
  if (n_valid < pb.slots()) return;  // kept whole; the whole block leaves together

  const int start = L - n_valid;
  const S* scores = a.scores + static_cast<int64_t>(row) * L;
  int32_t* heavy = a.sel.heavy + static_cast<int64_t>(row) * H;
  int32_t* rest = a.sel.rest + static_cast<int64_t>(row) * stride;

  // 1-2. The best H - l valid entries before the l local ones; the others form R.
  const int candidates = n_valid - l;
  auto candidate_key = [&](int i) { return score_key(scores[start + i]); };
  const Threshold<Key> heavy_cut = radix_threshold<Key>(candidate_key, candidates, H - l, sh);
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
  const Threshold<Key> pick_cut = radix_threshold<Key>(rest_key, n_rest, C, sh);
  emit_chosen(rest_key, n_rest, pick_cut, sh, [&](int i, bool chosen, int rank) {
    if (chosen) picks[rank] = i;
    pick_slot[i] = chosen ? rank : -1;
  });
}

}  // namespace lococo::cuda
