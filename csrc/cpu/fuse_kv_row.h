// The LoCoCo compressor for one (batch row, KV head), forward and backward, on the CPU.
//
// Free of torch types: element types come in as template parameters and matrix products go
// through a caller-supplied `Gemm` (row-major C = op(A) @ op(B) + beta * C), so this file
// reads as the algorithm of docs/design.md#the-compressor and nothing else. Accumulation type
// `Acc` is float for fp32/fp16/bf16 inputs and double for fp64.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace lococo::cpu {

// One strided [len, d] segment of a cache row.
template <typename T>
struct Segment {
  T* ptr;
  int64_t len, seq_stride, dim_stride;
};

// The logical row [mem ; new] without materialising the concat.
template <typename T>
struct RowCache {
  Segment<T> mem, fresh;
  int64_t length() const { return mem.len + fresh.len; }
  T& at(int64_t j, int64_t c) const {
    return j < mem.len ? mem.ptr[j * mem.seq_stride + c * mem.dim_stride]
                       : fresh.ptr[(j - mem.len) * fresh.seq_stride + c * fresh.dim_stride];
  }
};

// Ranking of docs/design.md#ranking: non-NaN before NaN, larger score first, lower index on ties.
inline bool ranks_before(double sa, int64_t a, double sb, int64_t b) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

// Keeps the best `count` of `items` (scored by score_of(item)), sorted by item ascending.
template <typename ScoreOf>
inline void keep_best(std::vector<int64_t>& items, int64_t count, ScoreOf score_of) {
  auto better = [&](int64_t a, int64_t b) { return ranks_before(score_of(a), a, score_of(b), b); };
  if (count < static_cast<int64_t>(items.size())) {
    std::nth_element(items.begin(), items.begin() + count, items.end(), better);
    items.resize(count);
  }
  std::sort(items.begin(), items.end());
}

// Which entries of a row go where. Positions are cache positions; picks index into `rest`.
struct Selection {
  std::vector<int64_t> heavy, rest, picks;
};

// Steps 1-3 of docs/design.md#the-compressor for a row whose valid entries are [start, L).
inline void select_entries(const double* scores, int64_t L, int64_t start, int64_t num_heavy,
                           int64_t num_local, int64_t num_fused, Selection& sel) {
  sel.heavy.clear();
  for (int64_t j = start; j < L - num_local; ++j) sel.heavy.push_back(j);
  keep_best(sel.heavy, num_heavy - num_local, [&](int64_t j) { return scores[j]; });
  for (int64_t j = L - num_local; j < L; ++j) sel.heavy.push_back(j);

  sel.rest.clear();
  auto next_heavy = sel.heavy.begin();
  for (int64_t j = start; j < L; ++j) {
    if (next_heavy != sel.heavy.end() && *next_heavy == j) {
      ++next_heavy;
    } else {
      sel.rest.push_back(j);
    }
  }
  sel.picks.resize(sel.rest.size());
  for (size_t i = 0; i < sel.rest.size(); ++i) sel.picks[i] = static_cast<int64_t>(i);
  keep_best(sel.picks, num_fused, [&](int64_t i) { return scores[sel.rest[i]]; });
}

// Sizes shared by every row of one call.
struct Dims {
  int64_t d, num_heavy, num_local, num_fused, kernel;
  int64_t slots() const { return num_heavy + num_fused; }
  int64_t channels() const { return 2 * d; }
  int64_t pad() const { return (kernel - 1) / 2; }
};

// Per-row scratch, reused across the rows a thread handles.
template <typename Acc>
struct Workspace {
  Selection sel;
  std::vector<Acc> x;       // [N, 2d]      the rest's [K ; V]
  std::vector<Acc> probs;   // [N, C]       P transposed
  std::vector<char> active; // [N, C]       pre-ReLU score > 0
  std::vector<Acc> fused;   // [C, 2d]
  std::vector<Acc> grad;    // [C, 2d] / [N, C] / [N, k * 2d] scratch of the backward
};

// Copies a row with fewer than H + C valid entries: right-aligned, zeros in front.
template <typename T>
void keep_all(const RowCache<T>& keys, const RowCache<T>& values, int64_t start, const Dims& dm,
              T* out_k, T* out_v) {
  const int64_t L = keys.length(), M = dm.slots(), first = M - (L - start);
  for (int64_t s = 0; s < M; ++s) {
    for (int64_t c = 0; c < dm.d; ++c) {
      const bool ok = s >= first;
      out_k[s * dm.d + c] = ok ? keys.at(L - M + s, c) : T(0);
      out_v[s * dm.d + c] = ok ? values.at(L - M + s, c) : T(0);
    }
  }
}

// Step 4: x = [K_R ; V_R] of the rest, [N, 2d], in the accumulation type.
template <typename T, typename Acc>
void gather_rest(const RowCache<T>& keys, const RowCache<T>& values, const Dims& dm,
                 Workspace<Acc>& ws) {
  const int64_t N = static_cast<int64_t>(ws.sel.rest.size()), ch = dm.channels(), d = dm.d;
  ws.x.resize(N * ch);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t j = ws.sel.rest[i];
    for (int64_t c = 0; c < d; ++c) {
      ws.x[i * ch + c] = static_cast<Acc>(keys.at(j, c));
      ws.x[i * ch + d + c] = static_cast<Acc>(values.at(j, c));
    }
  }
}

// im2col of x with "same" zero padding: cols [N, k * 2d], row i = x[i - pad .. i + pad].
template <typename Acc>
void im2col(const Workspace<Acc>& ws, const Dims& dm, Acc* cols) {
  const int64_t N = static_cast<int64_t>(ws.sel.rest.size());
  const int64_t ch = dm.channels(), taps = dm.kernel, pad = dm.pad();
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t src = i + t - pad;
      Acc* to = &cols[(i * taps + t) * ch];
      if (src >= 0 && src < N) {
        std::memcpy(to, &ws.x[src * ch], ch * sizeof(Acc));
      } else {
        std::memset(to, 0, ch * sizeof(Acc));
      }
    }
  }
}

// Step 5a, direct, one row: Z^T [N, C] = im2col(x) [N, k * 2d] @ wt [k * 2d, C], into ws.probs.
template <typename Acc, typename Gemm>
void conv_direct(const Acc* wt, const Dims& dm, Workspace<Acc>& ws, Gemm& gemm) {
  const int64_t N = static_cast<int64_t>(ws.sel.rest.size()), C = dm.num_fused;
  const int64_t width = dm.kernel * dm.channels();
  std::vector<Acc> cols(N * width);  // transient: k times the size of x
  im2col(ws, dm, cols.data());
  ws.probs.resize(N * C);
  gemm(false, false, N, C, width, cols.data(), width, wt, C, Acc(0), ws.probs.data(), C);
}

// Step 5b: bias, ReLU and the softmax over positions of each slot (a column of Z^T), in place.
template <typename Acc>
void relu_softmax(const Acc* bias, const Dims& dm, Workspace<Acc>& ws) {
  const int64_t N = static_cast<int64_t>(ws.sel.rest.size()), C = dm.num_fused;
  ws.active.resize(N * C);
  std::vector<Acc> col_max(C, Acc(0)), col_sum(C, Acc(0));  // relu output is >= 0
  for (int64_t i = 0; i < N; ++i) {
    Acc* z = &ws.probs[i * C];
    char* on = &ws.active[i * C];
    for (int64_t c = 0; c < C; ++c) {
      const Acc v = z[c] + (bias ? bias[c] : Acc(0));
      on[c] = v > Acc(0);
      z[c] = on[c] ? v : (std::isnan(v) ? v : Acc(0));  // NaN propagates, as in the reference
      col_max[c] = std::max(col_max[c], z[c]);
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    Acc* z = &ws.probs[i * C];
    for (int64_t c = 0; c < C; ++c) {
      z[c] = std::exp(z[c] - col_max[c]);
      col_sum[c] += z[c];
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    Acc* z = &ws.probs[i * C];
    for (int64_t c = 0; c < C; ++c) z[c] /= col_sum[c];
  }
}

// Steps 4-5 for one row with the direct convolution (the backward's recomputation).
template <typename T, typename Acc, typename Gemm>
void conv_probs(const RowCache<T>& keys, const RowCache<T>& values, const Acc* wt, const Acc* bias,
                const Dims& dm, Workspace<Acc>& ws, Gemm& gemm) {
  gather_rest(keys, values, dm, ws);
  conv_direct(wt, dm, ws, gemm);
  relu_softmax(bias, dm, ws);
}

// Forward, first part: selection, the heavy hitters, and x. Returns false when the row is done
// (fewer than H + C valid entries, or nothing to fuse); otherwise the caller computes Z^T into
// ws.probs (conv_direct or the DFT path) and calls finish_row.
template <typename T, typename Acc>
bool begin_row(const RowCache<T>& keys, const RowCache<T>& values, const double* scores,
               int64_t start, const Dims& dm, T* out_k, T* out_v, Workspace<Acc>& ws) {
  const int64_t L = keys.length(), H = dm.num_heavy, d = dm.d;
  ws.sel.rest.clear();
  if (L - start < dm.slots()) {
    keep_all(keys, values, start, dm, out_k, out_v);
    return false;
  }
  select_entries(scores, L, start, H, dm.num_local, dm.num_fused, ws.sel);
  for (int64_t s = 0; s < H; ++s) {
    for (int64_t c = 0; c < d; ++c) {
      out_k[s * d + c] = keys.at(ws.sel.heavy[s], c);
      out_v[s * d + c] = values.at(ws.sel.heavy[s], c);
    }
  }
  if (dm.num_fused == 0) return false;
  gather_rest(keys, values, dm, ws);
  return true;
}

// Forward, second part: P from Z^T, then the fused slots (steps 6-8).
template <typename T, typename Acc, typename Gemm>
void finish_row(const Acc* bias, Acc alpha, const Dims& dm, T* out_k, T* out_v,
                Workspace<Acc>& ws, Gemm& gemm) {
  const int64_t N = static_cast<int64_t>(ws.sel.rest.size()), C = dm.num_fused;
  const int64_t H = dm.num_heavy, d = dm.d, ch = dm.channels();
  relu_softmax(bias, dm, ws);
  ws.fused.resize(C * ch);
  gemm(true, false, C, ch, N, ws.probs.data(), C, ws.x.data(), ch, Acc(0), ws.fused.data(), ch);
  for (int64_t s = 0; s < C; ++s) {
    const Acc* picked = &ws.x[ws.sel.picks[s] * ch];
    const Acc* mixed = &ws.fused[s * ch];
    for (int64_t c = 0; c < d; ++c) {
      out_k[(H + s) * d + c] = static_cast<T>(alpha * mixed[c] + (Acc(1) - alpha) * picked[c]);
      out_v[(H + s) * d + c] = static_cast<T>(alpha * mixed[d + c] + (Acc(1) - alpha) * picked[d + c]);
    }
  }
}

// What the backward of one row leaves for the cross-row reductions of the launcher.
template <typename Acc>
struct RowGrads {
  std::vector<Acc> x_padded;  // [N + k - 1, 2d] the rest's [K ; V] with zero padding rows
  std::vector<Acc> grad_z;    // [N, C] gradient of the pre-ReLU convolution output
  std::vector<Acc> grad_bias; // [C]
  Acc grad_alpha = Acc(0);
  int64_t n = 0;
};

// The backward of one row. grad_k/grad_v: [H + C, d] (any layout via strides of 1 and d);
// d_keys/d_values: zero-initialised gradient rows of the cache, written at the positions used.
template <typename T, typename Acc, typename G, typename Gemm>
void fuse_row_backward(const RowCache<T>& keys, const RowCache<T>& values, const double* scores,
                       int64_t start, const Acc* wt, const Acc* bias, Acc alpha, const Dims& dm,
                       const G* grad_k, const G* grad_v, const RowCache<T>& d_keys,
                       const RowCache<T>& d_values, RowGrads<Acc>& out, Workspace<Acc>& ws,
                       Gemm& gemm) {
  const int64_t L = keys.length(), H = dm.num_heavy, C = dm.num_fused, d = dm.d, M = dm.slots();
  const int64_t ch = dm.channels(), taps = dm.kernel, pad = dm.pad();
  out.n = 0;
  out.grad_alpha = Acc(0);
  out.grad_bias.assign(C, Acc(0));
  if (L - start < M) {
    for (int64_t s = M - (L - start); s < M; ++s) {
      for (int64_t c = 0; c < d; ++c) {
        d_keys.at(L - M + s, c) = static_cast<T>(static_cast<Acc>(grad_k[s * d + c]));
        d_values.at(L - M + s, c) = static_cast<T>(static_cast<Acc>(grad_v[s * d + c]));
      }
    }
    return;
  }
  select_entries(scores, L, start, H, dm.num_local, C, ws.sel);
  for (int64_t s = 0; s < H; ++s) {
    for (int64_t c = 0; c < d; ++c) {
      d_keys.at(ws.sel.heavy[s], c) = static_cast<T>(static_cast<Acc>(grad_k[s * d + c]));
      d_values.at(ws.sel.heavy[s], c) = static_cast<T>(static_cast<Acc>(grad_v[s * d + c]));
    }
  }
  if (C == 0) return;
  conv_probs(keys, values, wt, bias, dm, ws, gemm);
  const int64_t N = static_cast<int64_t>(ws.sel.rest.size());
  out.n = N;

  // G = d(out)/d(fused) as [C, 2d].
  std::vector<Acc> g(C * ch);
  for (int64_t s = 0; s < C; ++s) {
    for (int64_t c = 0; c < d; ++c) {
      g[s * ch + c] = static_cast<Acc>(grad_k[(H + s) * d + c]);
      g[s * ch + d + c] = static_cast<Acc>(grad_v[(H + s) * d + c]);
    }
  }
  // gMix^T [N, C] = x @ G^T; dalpha = sum gMix * (P - E); dP = alpha * gMix.
  std::vector<Acc>& gz = out.grad_z;
  gz.resize(N * C);
  gemm(false, true, N, C, ch, ws.x.data(), ch, g.data(), ch, Acc(0), gz.data(), C);
  Acc grad_alpha = Acc(0);
  for (int64_t i = 0; i < N * C; ++i) grad_alpha += gz[i] * ws.probs[i];
  for (int64_t s = 0; s < C; ++s) grad_alpha -= gz[ws.sel.picks[s] * C + s];
  out.grad_alpha = grad_alpha;
  // Softmax and ReLU backward, column by column (each column c is one slot's softmax).
  std::vector<Acc> dot(C, Acc(0));
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = 0; c < C; ++c) dot[c] += gz[i * C + c] * ws.probs[i * C + c];
  }
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = i * C + c;
      const Acc dz = ws.active[at] ? alpha * ws.probs[at] * (gz[at] - dot[c]) : Acc(0);
      gz[at] = dz;
      out.grad_bias[c] += dz;
    }
  }
  // dx = Mix^T @ G (alpha * P @ G plus the one-hot part) + the convolution's input gradient.
  std::vector<Acc> dx(N * ch);
  gemm(false, false, N, ch, C, ws.probs.data(), C, g.data(), ch, Acc(0), dx.data(), ch);
  for (int64_t i = 0; i < N * ch; ++i) dx[i] *= alpha;
  for (int64_t s = 0; s < C; ++s) {
    Acc* row = &dx[ws.sel.picks[s] * ch];
    for (int64_t c = 0; c < ch; ++c) row[c] += (Acc(1) - alpha) * g[s * ch + c];
  }
  ws.grad.resize(N * taps * ch);  // d(cols) = dZ @ Wt^T, then col2im
  gemm(false, true, N, taps * ch, C, gz.data(), C, wt, C, Acc(0), ws.grad.data(), taps * ch);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t src = i + t - pad;
      if (src < 0 || src >= N) continue;
      const Acc* from = &ws.grad[(i * taps + t) * ch];
      Acc* to = &dx[src * ch];
      for (int64_t c = 0; c < ch; ++c) to[c] += from[c];
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t j = ws.sel.rest[i];
    for (int64_t c = 0; c < d; ++c) {
      d_keys.at(j, c) = static_cast<T>(dx[i * ch + c]);
      d_values.at(j, c) = static_cast<T>(dx[i * ch + d + c]);
    }
  }
  // Keep x with its padding rows for the weight gradient, a reduction over rows.
  out.x_padded.assign((N + taps - 1) * ch, Acc(0));
  std::memcpy(&out.x_padded[pad * ch], ws.x.data(), N * ch * sizeof(Acc));
}

}  // namespace lococo::cpu
