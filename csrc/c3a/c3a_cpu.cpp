// C³A on CPU: the block-circulant product through ATen's real FFTs, with the frequency-domain
// block contraction (Σ over blocks, one complex multiply-accumulate per frequency) in plain
// loops parallelised over tokens. Everything spectral runs in the accumulation precision
// (float64 for float64 inputs, float32 otherwise). See include/lrkernels/c3a_params.h for
// the notation; the dense ΔW is never built here (that is the oracle's job).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "c3a/c3a_checks.h"

namespace lrkernels {
namespace {

// Spectra arrive interleaved (re, im) from ATen's FFT. The inner loops below work on planar
// copies (separate re and im rows, made per token in a small cache-resident buffer) so that
// the complex multiply-accumulate over frequencies is a plain vectorisable loop.
template <typename acc_t>
inline void deinterleave(const acc_t* __restrict__ src, acc_t* __restrict__ re, acc_t* __restrict__ im, int64_t n) {
  for (int64_t f = 0; f < n; ++f) {
    re[f] = src[2 * f];
    im[f] = src[2 * f + 1];
  }
}

// a += x · k over n frequencies, all planar.
template <typename acc_t>
inline void cmac(acc_t* __restrict__ ar, acc_t* __restrict__ ai, const acc_t* __restrict__ xr,
                 const acc_t* __restrict__ xi, const acc_t* __restrict__ kr, const acc_t* __restrict__ ki, int64_t n) {
  for (int64_t f = 0; f < n; ++f) {
    ar[f] += xr[f] * kr[f] - xi[f] * ki[f];
    ai[f] += xr[f] * ki[f] + xi[f] * kr[f];
  }
}

// Y[t, o, f] = s · Σ_i X[t, i, f] · conj(K[o, i, f]) (+ bias_spec[o, f]): the forward, where
// y = x ΔWᵀ is a cross-correlation per block pair. X (T, n_i, F), K (n_o, n_i, F),
// Y (T, n_o, F); complex interleaved.
template <typename acc_t>
void contract_blocks(const acc_t* X, const acc_t* K, const acc_t* bias_spec, acc_t* Y, int64_t T, int64_t n_i,
                     int64_t n_o, int64_t F, acc_t s) {
  // conj(K) as planar rows, in (o, i) order.
  std::vector<acc_t> kre(n_o * n_i * F), kim(n_o * n_i * F);
  for (int64_t row = 0; row < n_o * n_i; ++row) {
    deinterleave(K + row * F * 2, kre.data() + row * F, kim.data() + row * F, F);
    for (int64_t f = 0; f < F; ++f) kim[row * F + f] = -kim[row * F + f];
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n_i * n_o * F / 16));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> xre(n_i * F), xim(n_i * F), ar(F), ai(F);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < n_i; ++i)
        deinterleave(X + (t * n_i + i) * F * 2, xre.data() + i * F, xim.data() + i * F, F);
      for (int64_t o = 0; o < n_o; ++o) {
        std::fill(ar.begin(), ar.end(), acc_t(0));
        std::fill(ai.begin(), ai.end(), acc_t(0));
        for (int64_t i = 0; i < n_i; ++i) {
          const int64_t row = o * n_i + i;
          cmac(ar.data(), ai.data(), xre.data() + i * F, xim.data() + i * F, kre.data() + row * F,
               kim.data() + row * F, F);
        }
        acc_t* __restrict__ yr = Y + (t * n_o + o) * F * 2;
        if (bias_spec != nullptr) {
          const acc_t* br = bias_spec + o * F * 2;
          for (int64_t f = 0; f < F; ++f) {
            yr[2 * f] = s * ar[f] + br[2 * f];
            yr[2 * f + 1] = s * ai[f] + br[2 * f + 1];
          }
        } else {
          for (int64_t f = 0; f < F; ++f) {
            yr[2 * f] = s * ar[f];
            yr[2 * f + 1] = s * ai[f];
          }
        }
      }
    }
  });
}

// a += conj(g) · x over n frequencies, all planar.
template <typename acc_t>
inline void cmac_conj(acc_t* __restrict__ ar, acc_t* __restrict__ ai, const acc_t* __restrict__ gr,
                      const acc_t* __restrict__ gi, const acc_t* __restrict__ xr, const acc_t* __restrict__ xi,
                      int64_t n) {
  for (int64_t f = 0; f < n; ++f) {
    ar[f] += gr[f] * xr[f] + gi[f] * xi[f];
    ai[f] += gr[f] * xi[f] - gi[f] * xr[f];
  }
}

// Both backward spectra in one pass over the tokens, each dŷ row de-interleaved once:
//   DX[t, q, f] = s · Σ_p DY[t, p, f] · K[p, q, f]          (when DX is given)
//   DK[p, q, f] = s · Σ_t conj(DY[t, p, f]) · X[t, q, f]    (when DK is given; X then too)
// The tokens are split into one static range per thread; each thread sums its DK part in a
// private planar buffer, added at the end (deterministic for a fixed thread count).
template <typename acc_t>
void backward_blocks(const acc_t* DY, const acc_t* K, const acc_t* X, acc_t* DX, acc_t* DK, int64_t T, int64_t n_out,
                     int64_t n_in, int64_t F, acc_t s) {
  // K as planar rows in (q, p) order: the input gradient sums over p for each q.
  std::vector<acc_t> kre, kim;
  if (DX) {
    kre.resize(n_in * n_out * F);
    kim.resize(n_in * n_out * F);
    for (int64_t q = 0; q < n_in; ++q)
      for (int64_t p = 0; p < n_out; ++p)
        deinterleave(K + (p * n_in + q) * F * 2, kre.data() + (q * n_out + p) * F, kim.data() + (q * n_out + p) * F, F);
  }
  const int64_t per = DK ? n_out * n_in * F * 2 : 0;  // planar: row (p, q) holds F re then F im
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), T));
  std::vector<acc_t> partial(static_cast<size_t>(nthreads * per), acc_t(0));
  const int64_t chunk = (T + nthreads - 1) / nthreads;
  at::parallel_for(0, nthreads, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> gre(n_out * F), gim(n_out * F), ar(F), ai(F);
    std::vector<acc_t> xre(DK ? n_in * F : 0), xim(DK ? n_in * F : 0);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* part = partial.data() + c * per;
      const int64_t t_end = std::min(T, (c + 1) * chunk);
      for (int64_t t = c * chunk; t < t_end; ++t) {
        for (int64_t p = 0; p < n_out; ++p)
          deinterleave(DY + (t * n_out + p) * F * 2, gre.data() + p * F, gim.data() + p * F, F);
        if (DX) {
          for (int64_t q = 0; q < n_in; ++q) {
            std::fill(ar.begin(), ar.end(), acc_t(0));
            std::fill(ai.begin(), ai.end(), acc_t(0));
            for (int64_t p = 0; p < n_out; ++p)
              cmac(ar.data(), ai.data(), gre.data() + p * F, gim.data() + p * F, kre.data() + (q * n_out + p) * F,
                   kim.data() + (q * n_out + p) * F, F);
            acc_t* __restrict__ dx = DX + (t * n_in + q) * F * 2;
            for (int64_t f = 0; f < F; ++f) {
              dx[2 * f] = s * ar[f];
              dx[2 * f + 1] = s * ai[f];
            }
          }
        }
        if (DK) {
          for (int64_t q = 0; q < n_in; ++q)
            deinterleave(X + (t * n_in + q) * F * 2, xre.data() + q * F, xim.data() + q * F, F);
          for (int64_t p = 0; p < n_out; ++p)
            for (int64_t q = 0; q < n_in; ++q) {
              acc_t* a = part + (p * n_in + q) * F * 2;
              cmac_conj(a, a + F, gre.data() + p * F, gim.data() + p * F, xre.data() + q * F, xim.data() + q * F, F);
            }
        }
      }
    }
  });
  if (!DK) return;
  at::parallel_for(0, n_out * n_in, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t f = 0; f < F; ++f) {
        acc_t vr = 0, vi = 0;
        for (int64_t c = 0; c < nthreads; ++c) {
          vr += partial[c * per + r * F * 2 + f];
          vi += partial[c * per + r * F * 2 + F + f];
        }
        DK[r * F * 2 + 2 * f] = s * vr;
        DK[r * F * 2 + 2 * f + 1] = s * vi;
      }
  });
}

// One-sided spectra along the last dim, contiguous. ATen's MKL FFT rejects empty batches:
// those get an empty spectrum directly.
at::Tensor rfft_last(const at::Tensor& t, at::ScalarType acc) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = shape.back() / 2 + 1;
  if (t.numel() == 0) return at::empty(shape, t.options().dtype(c10::toComplexType(acc)));
  return at::fft_rfft(t.to(acc), std::nullopt, -1, std::nullopt).contiguous();
}

at::Tensor block_rfft(const at::Tensor& m2, int64_t n, int64_t b, at::ScalarType acc) {
  return rfft_last(m2.reshape({m2.size(0), n, b}), acc);
}

template <typename F>
void dispatch_acc(at::ScalarType acc, F&& fn) {
  if (acc == at::kDouble) fn(double{});
  else fn(float{});
}

// irfft of (T, n, F) spectra as a (T, n · b) real matrix in the accumulation dtype.
at::Tensor blocks_irfft(const at::Tensor& Y, int64_t T, int64_t n, int64_t b, at::ScalarType acc) {
  if (Y.numel() == 0) return at::zeros({T, n * b}, Y.options().dtype(acc));
  // (fft_irfft, not fft_irfft_out: the out= variant transforms into a temporary and copies.)
  return at::fft_irfft(Y, b, -1, std::nullopt).view({T, n * b});
}

// Shared forward of c3a (weight undefined) and c3a_linear.
std::tuple<at::Tensor, at::Tensor> c3a_forward_cpu(const char* op, const at::Tensor& x, const at::Tensor* weight,
                                                   const at::Tensor* bias, const at::Tensor& kernel, double scale,
                                                   const C3AShapes& sh) {
  const auto acc = c3a_real_acc_dtype(x);
  const auto dt = x.scalar_type();
  const at::Tensor KF = rfft_last(kernel, acc);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor X = block_rfft(x2, sh.n_in, sh.block, acc);
  // The bias joins the adapter in the frequency domain (the FFT is linear), so the inverse
  // transform writes adapter + bias and the base GEMM accumulates onto it in place.
  at::Tensor bias_spec;
  if (bias) bias_spec = rfft_last(bias->reshape({sh.n_out, sh.block}), acc);
  at::Tensor Y = at::empty({sh.tokens, sh.n_out, sh.freqs}, X.options());
  dispatch_acc(acc, [&](auto zero) {
    using acc_t = decltype(zero);
    contract_blocks<acc_t>(reinterpret_cast<const acc_t*>(X.data_ptr()), reinterpret_cast<const acc_t*>(KF.data_ptr()),
                           bias ? reinterpret_cast<const acc_t*>(bias_spec.data_ptr()) : nullptr,
                           reinterpret_cast<acc_t*>(Y.data_ptr()), sh.tokens, sh.n_in, sh.n_out, sh.freqs,
                           static_cast<acc_t>(scale));
  });
  at::Tensor z = blocks_irfft(Y, sh.tokens, sh.n_out, sh.block, acc);
  at::Tensor y;
  if (weight == nullptr) {
    y = z.to(dt);
  } else if (dt == acc) {
    y = z.addmm_(x2, weight->t());
  } else {
    y = at::mm(x2, weight->t()).to(acc).add_(z).to(dt);
  }
  (void)op;
  return {y.view(c3a_out_shape(x, sh.out_features)), KF};
}

// Shared backward: gradients of x (and of the base layer when weight is given) and kernel.
void c3a_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor* weight,
                      const at::Tensor& kernel_fft, double scale, const C3AShapes& sh, bool want_x, bool want_k,
                      std::optional<at::Tensor>& gx, std::optional<at::Tensor>& gk) {
  const auto acc = c3a_real_acc_dtype(x);
  const auto dt = x.scalar_type();
  if (!(want_x || want_k)) return;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor DY = block_rfft(dy2, sh.n_out, sh.block, acc);
  const at::Tensor KF = kernel_fft.contiguous();
  at::Tensor X, DX, DK;
  if (want_k) {
    X = block_rfft(x.reshape({sh.tokens, sh.in_features}), sh.n_in, sh.block, acc);
    DK = at::empty({sh.n_out, sh.n_in, sh.freqs}, DY.options());
  }
  if (want_x) DX = at::empty({sh.tokens, sh.n_in, sh.freqs}, DY.options());
  dispatch_acc(acc, [&](auto zero) {
    using acc_t = decltype(zero);
    auto ptr = [](const at::Tensor& t) { return t.defined() ? reinterpret_cast<acc_t*>(t.data_ptr()) : nullptr; };
    backward_blocks<acc_t>(ptr(DY), ptr(KF), ptr(X), ptr(DX), ptr(DK), sh.tokens, sh.n_out, sh.n_in, sh.freqs,
                           static_cast<acc_t>(scale));
  });
  if (want_x) {
    at::Tensor dz = blocks_irfft(DX, sh.tokens, sh.n_in, sh.block, acc);
    at::Tensor dx;
    if (weight == nullptr) dx = dz.to(dt);
    else if (dt == acc) dx = dz.addmm_(dy2, *weight);
    else dx = at::mm(dy2, *weight).to(acc).add_(dz).to(dt);
    gx = dx.view(x.sizes());
  }
  if (want_k) {
    gk = DK.numel() == 0 ? at::zeros({sh.n_out, sh.n_in, sh.block}, x.options())
                         : at::fft_irfft(DK, sh.block, -1, std::nullopt).to(dt);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> c3a_cpu(const at::Tensor& x, const at::Tensor& kernel, double scale) {
  const char* op = "c3a";
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale);
  return c3a_forward_cpu(op, x, nullptr, nullptr, kernel, scale, sh);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> c3a_backward_op_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& kernel_fft,
    double scale, std::array<bool, 2> mask) {
  const char* op = "c3a_backward";
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale);
  check_grad_out(op, grad_out, x, sh);
  check_kernel_fft(op, kernel_fft, x, sh);
  std::optional<at::Tensor> gx, gk;
  c3a_backward_cpu(grad_out, x, nullptr, kernel_fft, scale, sh, mask[0], mask[1], gx, gk);
  return {gx, gk};
}

std::tuple<at::Tensor, at::Tensor> c3a_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& kernel,
                                                  double scale) {
  const char* op = "c3a_linear";
  check_c3a_linear_base(op, x, weight, bias);
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale, weight.size(0));
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  return c3a_forward_cpu(op, x, &weight, bp, kernel, scale, sh);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
c3a_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& kernel, const at::Tensor& kernel_fft, double scale, std::array<bool, 4> mask) {
  const char* op = "c3a_linear_backward";
  check_c3a_linear_base(op, x, weight, std::nullopt);
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale, weight.size(0));
  check_grad_out(op, grad_out, x, sh);
  check_kernel_fft(op, kernel_fft, x, sh);
  const auto [want_x, want_w, want_bias, want_k] = mask;
  std::optional<at::Tensor> gx, gw, gbias, gk;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features});
  if (want_w) gw = at::mm(dy2.t(), x.reshape({sh.tokens, sh.in_features}));
  if (want_bias) gbias = dy2.sum(0);
  c3a_backward_cpu(grad_out, x, &weight, kernel_fft, scale, sh, want_x, want_k, gx, gk);
  return {gx, gw, gbias, gk};
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("c3a", &c3a_cpu);
  m.impl("c3a_backward", &c3a_backward_op_cpu);
  m.impl("c3a_linear", &c3a_linear_cpu);
  m.impl("c3a_linear_backward", &c3a_linear_backward_cpu);
}

}  // namespace lrkernels
