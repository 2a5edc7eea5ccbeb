// C³A on CPU: the block-circulant product through ATen's real FFTs, with the frequency-domain
// block contraction (Σ over blocks, one complex multiply-accumulate per frequency) in plain
// loops, all run per cache-sized tile of tokens, tiles spread over the threads. Everything spectral runs in the accumulation precision
// (float64 for float64 inputs, float32 otherwise). See include/lrkernels/c3a_params.h for
// the notation; the dense ΔW is never built here (that is the oracle's job).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/complex.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "c3a/c3a_checks.h"
#include "c3a/c3a_cpu_vec.h"

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

// The complex multiply-accumulates over frequencies (cmac, cmac_conj) are the vectorised
// kernels of c3a_cpu_vec.cpp, run for the instruction set in force.

// The kernel spectrum as planar rows (F re values, then F im values per row), in the order
// and with the sign the inner loops want.
template <typename acc_t>
struct PlanarKernel {
  std::vector<acc_t> re, im;
};

// Forward: rows (o, i) hold conj(K̂[o, i]).
template <typename acc_t>
PlanarKernel<acc_t> planar_conj_kernel(const acc_t* K, int64_t n_o, int64_t n_i, int64_t F) {
  PlanarKernel<acc_t> k{std::vector<acc_t>(n_o * n_i * F), std::vector<acc_t>(n_o * n_i * F)};
  for (int64_t row = 0; row < n_o * n_i; ++row) {
    deinterleave(K + row * F * 2, k.re.data() + row * F, k.im.data() + row * F, F);
    for (int64_t f = 0; f < F; ++f) k.im[row * F + f] = -k.im[row * F + f];
  }
  return k;
}

// Input gradient: rows (q, p) hold K̂[p, q] (the sum runs over p for each q).
template <typename acc_t>
PlanarKernel<acc_t> planar_transposed_kernel(const acc_t* K, int64_t n_out, int64_t n_in, int64_t F) {
  PlanarKernel<acc_t> k{std::vector<acc_t>(n_out * n_in * F), std::vector<acc_t>(n_out * n_in * F)};
  for (int64_t q = 0; q < n_in; ++q)
    for (int64_t p = 0; p < n_out; ++p)
      deinterleave(K + (p * n_in + q) * F * 2, k.re.data() + (q * n_out + p) * F, k.im.data() + (q * n_out + p) * F, F);
  return k;
}

// Y[t, o, f] = s · Σ_i X[t, i, f] · conj(K̂[o, i, f]) (+ bias_spec[o, f]) for `rows` tokens:
// the forward, where y = x ΔWᵀ is a cross-correlation per block pair. X (rows, n_i, F),
// Y (rows, n_o, F), bias_spec (n_o, F), complex interleaved. Serial (runs inside a tile).
template <typename acc_t>
void contract_rows(const acc_t* X, const PlanarKernel<acc_t>& k, const acc_t* bias_spec, acc_t* Y, int64_t rows,
                   int64_t n_i, int64_t n_o, int64_t F, acc_t s) {
  std::vector<acc_t> xre(n_i * F), xim(n_i * F), ar(F), ai(F);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t i = 0; i < n_i; ++i) deinterleave(X + (t * n_i + i) * F * 2, xre.data() + i * F, xim.data() + i * F, F);
    for (int64_t o = 0; o < n_o; ++o) {
      std::fill(ar.begin(), ar.end(), acc_t(0));
      std::fill(ai.begin(), ai.end(), acc_t(0));
      for (int64_t i = 0; i < n_i; ++i) {
        const int64_t row = o * n_i + i;
        cmac(ar.data(), ai.data(), xre.data() + i * F, xim.data() + i * F, k.re.data() + row * F,
             k.im.data() + row * F, F);
      }
      acc_t* __restrict__ yr = Y + (t * n_o + o) * F * 2;
      const acc_t* br = bias_spec ? bias_spec + o * F * 2 : nullptr;
      for (int64_t f = 0; f < F; ++f) {
        yr[2 * f] = s * ar[f] + (br ? br[2 * f] : acc_t(0));
        yr[2 * f + 1] = s * ai[f] + (br ? br[2 * f + 1] : acc_t(0));
      }
    }
  }
}

// Both backward spectra for `rows` tokens, each dŷ row de-interleaved once. Serial.
//   DX[t, q, f]  = s · Σ_p DY[t, p, f] · K̂[p, q, f]          (when DX is given)
//   DKp[p, q, f] +=     Σ_t conj(DY[t, p, f]) · X[t, q, f]    (when DKp is given; X then too)
// DKp is a private planar accumulator (row (p, q): F re then F im), scaled by s at the end.
template <typename acc_t>
void backward_rows(const acc_t* DY, const PlanarKernel<acc_t>& kt, const acc_t* X, acc_t* DX, acc_t* DKp,
                   int64_t rows, int64_t n_out, int64_t n_in, int64_t F, acc_t s) {
  std::vector<acc_t> gre(n_out * F), gim(n_out * F), ar(F), ai(F);
  std::vector<acc_t> xre(DKp ? n_in * F : 0), xim(DKp ? n_in * F : 0);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t p = 0; p < n_out; ++p)
      deinterleave(DY + (t * n_out + p) * F * 2, gre.data() + p * F, gim.data() + p * F, F);
    if (DX) {
      for (int64_t q = 0; q < n_in; ++q) {
        std::fill(ar.begin(), ar.end(), acc_t(0));
        std::fill(ai.begin(), ai.end(), acc_t(0));
        for (int64_t p = 0; p < n_out; ++p)
          cmac(ar.data(), ai.data(), gre.data() + p * F, gim.data() + p * F, kt.re.data() + (q * n_out + p) * F,
               kt.im.data() + (q * n_out + p) * F, F);
        acc_t* __restrict__ dx = DX + (t * n_in + q) * F * 2;
        for (int64_t f = 0; f < F; ++f) {
          dx[2 * f] = s * ar[f];
          dx[2 * f + 1] = s * ai[f];
        }
      }
    }
    if (DKp) {
      for (int64_t q = 0; q < n_in; ++q)
        deinterleave(X + (t * n_in + q) * F * 2, xre.data() + q * F, xim.data() + q * F, F);
      for (int64_t p = 0; p < n_out; ++p)
        for (int64_t q = 0; q < n_in; ++q) {
          acc_t* a = DKp + (p * n_in + q) * F * 2;
          cmac_conj(a, a + F, gre.data() + p * F, gim.data() + p * F, xre.data() + q * F, xim.data() + q * F, F);
        }
    }
  }
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

// The token dimension is processed in tiles small enough that a tile's input, spectra and
// output stay in cache: forward transform, contraction and inverse transform then run back
// to back on cache-resident data instead of as separate passes over memory, and the tiles
// are spread over the threads (ATen ops inside a parallel region run single-threaded).
int64_t tile_rows(const C3AShapes& sh) {
  const int64_t width = std::max<int64_t>({sh.in_features, sh.out_features, 1});
  return std::clamp<int64_t>((int64_t{1} << 17) / width, 8, 4096);
}

// The tiles run ATen ops (FFTs, copies) on worker threads, which start with default
// thread-local state: each gets the caller's (below autograd, inference mode, ...), so an op
// called under torch.inference_mode() writes its inference-tensor outputs in inference mode too.
template <typename Fn>
void for_each_tile(const C3AShapes& sh, Fn&& fn) {
  const int64_t rows = tile_rows(sh);
  const int64_t tiles = (sh.tokens + rows - 1) / rows;
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t b) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t i = a; i < b; ++i) {
      const int64_t r0 = i * rows;
      fn(r0, std::min(rows, sh.tokens - r0));
    }
  });
}

// Shared forward of c3a (weight undefined) and c3a_linear.
std::tuple<at::Tensor, at::Tensor> c3a_forward_cpu(const at::Tensor& x, const at::Tensor* weight,
                                                   const at::Tensor* bias, const at::Tensor& kernel, double scale,
                                                   const C3AShapes& sh) {
  const auto acc = c3a_real_acc_dtype(x);
  const auto dt = x.scalar_type();
  const at::Tensor KF = rfft_last(kernel, acc);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  // The bias joins the adapter in the frequency domain (the FFT is linear), so the inverse
  // transform writes adapter + bias and the base GEMM accumulates onto it in place.
  at::Tensor bias_spec;
  if (bias) bias_spec = rfft_last(bias->reshape({sh.n_out, sh.block}), acc);
  // Every row of z is written by its tile (no zero fill) unless the kernel is empty.
  at::Tensor z = KF.numel() != 0 ? at::empty({sh.tokens, sh.out_features}, x.options().dtype(acc))
                                 : at::zeros({sh.tokens, sh.out_features}, x.options().dtype(acc));
  if (KF.numel() != 0) {
    dispatch_acc(acc, [&](auto zero) {
      using acc_t = decltype(zero);
      const PlanarKernel<acc_t> k = planar_conj_kernel<acc_t>(reinterpret_cast<const acc_t*>(KF.data_ptr()),
                                                              sh.n_out, sh.n_in, sh.freqs);
      const acc_t* bp = bias ? reinterpret_cast<const acc_t*>(bias_spec.data_ptr()) : nullptr;
      for_each_tile(sh, [&](int64_t r0, int64_t rows) {
        const at::Tensor X = block_rfft(x2.narrow(0, r0, rows), sh.n_in, sh.block, acc);
        at::Tensor Y = at::empty({rows, sh.n_out, sh.freqs}, X.options());
        contract_rows<acc_t>(reinterpret_cast<const acc_t*>(X.data_ptr()), k, bp,
                             reinterpret_cast<acc_t*>(Y.data_ptr()), rows, sh.n_in, sh.n_out, sh.freqs,
                             static_cast<acc_t>(scale));
        z.narrow(0, r0, rows).view({rows, sh.n_out, sh.block}).copy_(at::fft_irfft(Y, sh.block, -1, std::nullopt));
      });
    });
  } else if (bias) {
    z.add_(*bias);
  }
  at::Tensor y;
  if (weight == nullptr) {
    y = z.to(dt);
  } else if (dt == acc) {
    y = z.addmm_(x2, weight->t());
  } else {
    y = at::mm(x2, weight->t()).to(acc).add_(z).to(dt);
  }
  return {y.view(c3a_out_shape(x, sh.out_features)), KF};
}

// Shared backward: gradients of x (and of the base layer when weight is given) and kernel.
void c3a_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor* weight,
                      const at::Tensor& kernel_fft, at::ScalarType kernel_dtype, double scale, const C3AShapes& sh,
                      bool want_x, bool want_k, std::optional<at::Tensor>& gx, std::optional<at::Tensor>& gk) {
  const auto acc = c3a_real_acc_dtype(x);
  const auto dt = x.scalar_type();
  if (!(want_x || want_k)) return;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor x2 = want_k ? x.reshape({sh.tokens, sh.in_features}).contiguous() : at::Tensor();
  const at::Tensor KF = kernel_fft.contiguous();
  at::Tensor dz;
  if (want_x) {
    dz = KF.numel() != 0 ? at::empty({sh.tokens, sh.in_features}, x.options().dtype(acc))
                         : at::zeros({sh.tokens, sh.in_features}, x.options().dtype(acc));
  }
  at::Tensor DK = at::zeros({sh.n_out, sh.n_in, sh.freqs}, KF.options());
  if (KF.numel() != 0) {
    dispatch_acc(acc, [&](auto zero) {
      using acc_t = decltype(zero);
      PlanarKernel<acc_t> kt;
      if (want_x) kt = planar_transposed_kernel<acc_t>(reinterpret_cast<const acc_t*>(KF.data_ptr()), sh.n_out,
                                                       sh.n_in, sh.freqs);
      // One private kernel-gradient accumulator per thread, added in thread order at the end.
      const int64_t per = want_k ? sh.n_out * sh.n_in * sh.freqs * 2 : 0;
      const int64_t nthreads = at::get_num_threads();
      std::vector<acc_t> partial(static_cast<size_t>(nthreads * per), acc_t(0));
      for_each_tile(sh, [&](int64_t r0, int64_t rows) {
        const at::Tensor DY = block_rfft(dy2.narrow(0, r0, rows), sh.n_out, sh.block, acc);
        at::Tensor X, DX;
        if (want_k) X = block_rfft(x2.narrow(0, r0, rows), sh.n_in, sh.block, acc);
        if (want_x) DX = at::empty({rows, sh.n_in, sh.freqs}, DY.options());
        acc_t* part = want_k ? partial.data() + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * per : nullptr;
        backward_rows<acc_t>(reinterpret_cast<const acc_t*>(DY.data_ptr()), kt,
                             want_k ? reinterpret_cast<const acc_t*>(X.data_ptr()) : nullptr,
                             want_x ? reinterpret_cast<acc_t*>(DX.data_ptr()) : nullptr, part, rows, sh.n_out,
                             sh.n_in, sh.freqs, static_cast<acc_t>(scale));
        if (want_x)
          dz.narrow(0, r0, rows).view({rows, sh.n_in, sh.block}).copy_(at::fft_irfft(DX, sh.block, -1, std::nullopt));
      });
      if (want_k) {
        acc_t* dk = reinterpret_cast<acc_t*>(DK.data_ptr());
        const int64_t F = sh.freqs;
        const acc_t s = static_cast<acc_t>(scale);
        at::parallel_for(0, sh.n_out * sh.n_in, 16, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r)
            for (int64_t f = 0; f < F; ++f) {
              acc_t vr = 0, vi = 0;
              for (int64_t c = 0; c < nthreads; ++c) {
                vr += partial[c * per + r * F * 2 + f];
                vi += partial[c * per + r * F * 2 + F + f];
              }
              dk[r * F * 2 + 2 * f] = s * vr;
              dk[r * F * 2 + 2 * f + 1] = s * vi;
            }
        });
      }
    });
  }
  if (want_x) {
    at::Tensor dx;
    if (weight == nullptr) dx = dz.to(dt);
    else if (dt == acc) dx = dz.addmm_(dy2, *weight);
    else dx = at::mm(dy2, *weight).to(acc).add_(dz).to(dt);
    gx = dx.view(x.sizes());
  }
  if (want_k) {
    gk = DK.numel() == 0 ? at::zeros({sh.n_out, sh.n_in, sh.block}, x.options().dtype(kernel_dtype))
                         : at::fft_irfft(DK, sh.block, -1, std::nullopt).to(kernel_dtype);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> c3a_cpu(const at::Tensor& x, const at::Tensor& kernel, double scale) {
  const char* op = "c3a";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale);
  return c3a_forward_cpu(x, nullptr, nullptr, kernel, scale, sh);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> c3a_backward_op_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& kernel, const at::Tensor& kernel_fft,
    double scale, std::array<bool, 2> mask) {
  const char* op = "c3a_backward";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale);
  check_grad_out(op, grad_out, x, sh);
  check_kernel_fft(op, kernel_fft, x, sh);
  std::optional<at::Tensor> gx, gk;
  c3a_backward_cpu(grad_out, x, nullptr, kernel_fft, kernel.scalar_type(), scale, sh, mask[0], mask[1], gx, gk);
  return {gx, gk};
}

std::tuple<at::Tensor, at::Tensor> c3a_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& kernel,
                                                  double scale) {
  const char* op = "c3a_linear";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_base(op, x, weight, bias);
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale, weight.size(0));
  const at::Tensor* bp = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  return c3a_forward_cpu(x, &weight, bp, kernel, scale, sh);
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
c3a_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& kernel, const at::Tensor& kernel_fft, double scale, std::array<bool, 4> mask) {
  const char* op = "c3a_linear_backward";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_base(op, x, weight, std::nullopt);
  const C3AShapes sh = check_c3a_args(op, x, kernel, scale, weight.size(0));
  check_grad_out(op, grad_out, x, sh);
  check_kernel_fft(op, kernel_fft, x, sh);
  const auto [want_x, want_w, want_bias, want_k] = mask;
  std::optional<at::Tensor> gx, gw, gbias, gk;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features});
  if (want_w) gw = at::mm(dy2.t(), x.reshape({sh.tokens, sh.in_features}));
  if (want_bias) gbias = dy2.sum(0);
  c3a_backward_cpu(grad_out, x, &weight, kernel_fft, kernel.scalar_type(), scale, sh, want_x, want_k, gx, gk);
  return {gx, gw, gbias, gk};
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("c3a", &c3a_cpu);
  m.impl("c3a_backward", &c3a_backward_op_cpu);
  m.impl("c3a_linear", &c3a_linear_cpu);
  m.impl("c3a_linear_backward", &c3a_linear_backward_cpu);
}

}  // namespace lrkernels
