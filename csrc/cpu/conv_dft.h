// The "same" convolution of LoCoCo through the discrete Fourier transform, as matrix products.
//
// Z[c, p] = sum_ch sum_t W[c, ch, t] x[p + t - pad, ch] costs 2 N C 2d k flops directly. With a
// transform of length F >= N + pad (long enough that no wrap-around reaches an output), it is
// Z = IDFT( sum_ch What[c, ch, f] * Xhat[ch, f] ): the weight's spectrum is shared by every row
// and every frequency is a small complex product [C, 2d] @ [2d, rows]. All transforms are dense
// DFT matrices applied with GEMMs, so the result is exact up to rounding (no FFT butterflies).
// It wins when many rows share the weight and k is large (Llama-sized layers at decode); the
// launcher picks it by estimated flops. Free of torch types, like fuse_kv_row.h.
#pragma once

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace lococo::cpu {

struct DftPlan {
  int64_t n_max, taps, pad, length, bins;  // bins = length / 2 + 1 (real-input spectrum)
};

inline DftPlan plan_dft(int64_t n_max, int64_t taps) {
  const int64_t pad = (taps - 1) / 2, length = n_max + pad;
  return {n_max, taps, pad, length, length / 2 + 1};
}

// Flops of the DFT path for rows of lengths n (the launcher compares with 2 C 2d k sum(n)).
inline double dft_flops(const DftPlan& p, const std::vector<int64_t>& n, int64_t C, int64_t ch) {
  double rows_n = 0;
  for (int64_t v : n) rows_n += static_cast<double>(v);
  const double b2 = 2.0 * p.bins, R = static_cast<double>(n.size());
  return 2 * b2 * p.taps * C * ch            // weight spectrum
         + 2 * b2 * rows_n * ch              // row spectra
         + p.bins * 2.0 * 2 * C * ch * 2 * R // per-frequency complex products
         + 2 * rows_n * b2 * C;              // inverse transforms
}

// 2 pi (a * b mod F) / F, exact in the integer part so that large products keep their accuracy.
inline double twiddle(int64_t a, int64_t b, int64_t F) {
  const int64_t r = ((a * b) % F + F) % F;
  return 2.0 * M_PI * static_cast<double>(r) / static_cast<double>(F);
}

// Uninitialised scratch (std::vector would zero it first, a full extra pass over memory).
template <typename Acc>
using Scratch = std::unique_ptr<Acc[]>;

// xs[r]: x of row r, [n[r], ch] row-major; w_taps: [k, C * ch] (tap-major weight);
// zs[r]: output Z^T of row r, [n[r], C]. Gemm: row-major C = op(A) op(B) + beta C.
// ParallelFor: (begin, end, fn(b, e)) over independent index ranges.
// Spectra interleave real and imaginary parts: row 2f is the real part of bin f, 2f + 1 the
// imaginary part.
template <typename Acc, typename Gemm, typename ParallelFor>
void conv_dft(const DftPlan& p, const std::vector<const Acc*>& xs, const std::vector<int64_t>& n,
              const Acc* w_taps, int64_t C, int64_t ch, const std::vector<Acc*>& zs,
              Gemm& gemm, ParallelFor parallel_for) {
  const int64_t R = static_cast<int64_t>(xs.size()), F = p.length, B = p.bins, N = p.n_max;
  const int64_t K = p.taps;
  // Transform matrices: forward [2B, N] (cos, -sin), weight [2B, k] (cos, sin of the centred
  // tap offset), inverse [N, 2B] (Hermitian weight 1 or 2, times 1 / F).
  Scratch<Acc> fwd(new Acc[2 * B * N]), wtf(new Acc[2 * B * K]), inv(new Acc[N * 2 * B]);
  for (int64_t f = 0; f < B; ++f) {
    const double herm = (f == 0 || 2 * f == F) ? 1.0 : 2.0;
    for (int64_t j = 0; j < N; ++j) {
      const double a = twiddle(f, j, F), c = std::cos(a), s = std::sin(a);
      fwd[2 * f * N + j] = static_cast<Acc>(c);
      fwd[(2 * f + 1) * N + j] = static_cast<Acc>(-s);
      inv[j * 2 * B + 2 * f] = static_cast<Acc>(herm * c / F);
      inv[j * 2 * B + 2 * f + 1] = static_cast<Acc>(-herm * s / F);
    }
    for (int64_t t = 0; t < K; ++t) {
      const double a = twiddle(f, t - p.pad, F);
      wtf[2 * f * K + t] = static_cast<Acc>(std::cos(a));
      wtf[(2 * f + 1) * K + t] = static_cast<Acc>(std::sin(a));
    }
  }

  // Row spectra by frequency: x_all[f] = [xr ; xi] and x_neg[f] = [-xi ; xr], each [2R, ch]
  // (row r of the batch at r, its imaginary or negated part at R + r).
  const int64_t per_bin = 2 * R * ch;
  Scratch<Acc> x_all(new Acc[B * per_bin]), x_neg(new Acc[B * per_bin]);
  parallel_for(0, R, [&](int64_t begin, int64_t end) {
    Scratch<Acc> x_hat(new Acc[2 * B * ch]);
    for (int64_t r = begin; r < end; ++r) {
      gemm(false, false, 2 * B, ch, n[r], fwd.get(), N, xs[r], ch, Acc(0), x_hat.get(), ch);
      for (int64_t f = 0; f < B; ++f) {
        const Acc* re = &x_hat[2 * f * ch];
        const Acc* im = &x_hat[(2 * f + 1) * ch];
        Acc* all = &x_all[f * per_bin];
        Acc* neg = &x_neg[f * per_bin];
        for (int64_t c = 0; c < ch; ++c) {
          all[r * ch + c] = re[c];
          all[(R + r) * ch + c] = im[c];
          neg[r * ch + c] = -im[c];
          neg[(R + r) * ch + c] = re[c];
        }
      }
    }
  });

  // Per block of bins: the weight spectrum of the block ([2 fb, C * ch], row 2f = Wr [C, ch],
  // 2f + 1 = Wi), then per bin Z^T[f] = [zr ; zi] = x_all[f] @ Wr^T + x_neg[f] @ Wi^T, [2R, C].
  constexpr int64_t kBlock = 8;
  Scratch<Acc> z_hat(new Acc[B * 2 * R * C]);
  parallel_for(0, (B + kBlock - 1) / kBlock, [&](int64_t begin, int64_t end) {
    Scratch<Acc> w_hat(new Acc[2 * kBlock * C * ch]);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t f0 = blk * kBlock, f1 = std::min(B, f0 + kBlock);
      gemm(false, false, 2 * (f1 - f0), C * ch, K, &wtf[2 * f0 * K], K, w_taps, C * ch, Acc(0),
           w_hat.get(), C * ch);
      for (int64_t f = f0; f < f1; ++f) {
        const Acc* wr = &w_hat[2 * (f - f0) * C * ch];
        const Acc* wi = wr + C * ch;
        Acc* out = &z_hat[f * 2 * R * C];
        gemm(false, true, 2 * R, C, ch, &x_all[f * per_bin], ch, wr, ch, Acc(0), out, C);
        gemm(false, true, 2 * R, C, ch, &x_neg[f * per_bin], ch, wi, ch, Acc(1), out, C);
      }
    }
  });

  // Inverse per row: Z^T [n, C] = inv[:n] @ spectrum, spectrum [2B, C] gathered from z_hat.
  parallel_for(0, R, [&](int64_t begin, int64_t end) {
    Scratch<Acc> spectrum(new Acc[2 * B * C]);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t f = 0; f < B; ++f) {
        std::memcpy(&spectrum[2 * f * C], &z_hat[(f * 2 * R + r) * C], C * sizeof(Acc));
        std::memcpy(&spectrum[(2 * f + 1) * C], &z_hat[(f * 2 * R + R + r) * C], C * sizeof(Acc));
      }
      gemm(false, false, n[r], C, 2 * B, inv.get(), 2 * B, spectrum.get(), C, Acc(0), zs[r], C);
    }
  });
}

}  // namespace lococo::cpu
