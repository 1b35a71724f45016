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
#include <cstdint>
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

// xs[r]: x of row r, [n[r], ch] row-major; w_taps: [k, C * ch] (tap-major weight);
// zs[r]: output Z^T of row r, [n[r], C]. Gemm: row-major C = op(A) op(B) + beta C.
// ParallelFor: (begin, end, fn(b, e)) over independent index ranges.
template <typename Acc, typename Gemm, typename ParallelFor>
void conv_dft(const DftPlan& p, const std::vector<const Acc*>& xs, const std::vector<int64_t>& n,
              const Acc* w_taps, int64_t C, int64_t ch, const std::vector<Acc*>& zs,
              Gemm& gemm, ParallelFor parallel_for) {
  const int64_t R = static_cast<int64_t>(xs.size()), F = p.length, B = p.bins, N = p.n_max;
  // Transform matrices: forward [2B, N] (cos; -sin), weight [2B, k] (cos; sin of the centred
  // tap offset), inverse [N, 2B] (Hermitian weights 1 or 2, and 1 / F).
  std::vector<Acc> fwd(2 * B * N), wtf(2 * B * p.taps), inv(N * 2 * B);
  for (int64_t f = 0; f < B; ++f) {
    const double herm = (f == 0 || 2 * f == F) ? 1.0 : 2.0;
    for (int64_t j = 0; j < N; ++j) {
      const double a = twiddle(f, j, F);
      fwd[f * N + j] = static_cast<Acc>(std::cos(a));
      fwd[(B + f) * N + j] = static_cast<Acc>(-std::sin(a));
      inv[j * 2 * B + f] = static_cast<Acc>(herm * std::cos(a) / F);
      inv[j * 2 * B + B + f] = static_cast<Acc>(-herm * std::sin(a) / F);
    }
    for (int64_t t = 0; t < p.taps; ++t) {
      const double a = twiddle(f, t - p.pad, F);
      wtf[f * p.taps + t] = static_cast<Acc>(std::cos(a));
      wtf[(B + f) * p.taps + t] = static_cast<Acc>(std::sin(a));
    }
  }
  // Weight spectrum [2B, C * ch]: rows f (real part) and B + f (imaginary part) are [C, ch].
  std::vector<Acc> w_hat(2 * B * C * ch);
  gemm(false, false, 2 * B, C * ch, p.taps, wtf.data(), p.taps, w_taps, C * ch, Acc(0),
       w_hat.data(), C * ch);

  // Row spectra, laid out per frequency for the products: re_im[f] = [xr | xi], im_re[f] = [-xi | xr],
  // each [ch, 2R] with row r in columns r and R + r.
  std::vector<Acc> re_im(B * ch * 2 * R), im_re(B * ch * 2 * R);
  parallel_for(0, R, [&](int64_t begin, int64_t end) {
    std::vector<Acc> x_hat(2 * B * ch);
    for (int64_t r = begin; r < end; ++r) {
      gemm(false, false, 2 * B, ch, n[r], fwd.data(), N, xs[r], ch, Acc(0), x_hat.data(), ch);
      for (int64_t f = 0; f < B; ++f) {
        for (int64_t c = 0; c < ch; ++c) {
          const Acc xr = x_hat[f * ch + c], xi = x_hat[(B + f) * ch + c];
          const int64_t at = (f * ch + c) * 2 * R;
          re_im[at + r] = xr;
          re_im[at + R + r] = xi;
          im_re[at + r] = -xi;
          im_re[at + R + r] = xr;
        }
      }
    }
  });

  // Per frequency: [zr | zi] = Wr @ [xr | xi] + Wi @ [-xi | xr], [C, 2R].
  std::vector<Acc> z_hat(B * C * 2 * R);
  parallel_for(0, B, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      Acc* out = &z_hat[f * C * 2 * R];
      gemm(false, false, C, 2 * R, ch, &w_hat[f * C * ch], ch, &re_im[f * ch * 2 * R], 2 * R,
           Acc(0), out, 2 * R);
      gemm(false, false, C, 2 * R, ch, &w_hat[(B + f) * C * ch], ch, &im_re[f * ch * 2 * R], 2 * R,
           Acc(1), out, 2 * R);
    }
  });

  // Inverse per row: Z^T [n, C] = inv[:n] @ [zr ; zi] where [zr ; zi] is [2B, C].
  parallel_for(0, R, [&](int64_t begin, int64_t end) {
    std::vector<Acc> spectrum(2 * B * C);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t f = 0; f < B; ++f) {
        const Acc* zf = &z_hat[f * C * 2 * R];
        for (int64_t c = 0; c < C; ++c) {
          spectrum[f * C + c] = zf[c * 2 * R + r];
          spectrum[(B + f) * C + c] = zf[c * 2 * R + R + r];
        }
      }
      gemm(false, false, n[r], C, 2 * B, inv.data(), 2 * B, spectrum.data(), C, Acc(0), zs[r], C);
    }
  });
}

}  // namespace lococo::cpu
