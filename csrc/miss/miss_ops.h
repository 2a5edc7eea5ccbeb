// The Bone / MiSS ops as compositions of GEMMs (ATen: BLAS on CPU, cuBLAS on CUDA) and a few
// backend kernels, shared by miss_cpu.cpp and miss_cuda.cu so both compute the same thing the
// same way. A backend B provides (all in the accumulation dtype unless said otherwise):
//   B::kChunkBytes                         bytes of one W' chunk buffer
//   B::chunked_balance(sh)                 whether balance/mini (without dropout) take the chunked W' path
//   B::chunk_sum(x2, r, d)                 S (T, r) = Σ_chunks drop(x)
//   B::tiled_input_grad(g, in, d, dt)      (T, in) in dt: drop'[t, c] · g[t, c mod r]
//   B::balance_table(macc)                 M as build_balance reads it
//   B::build_balance(w, table, r, cols_m, o0, rows, c0, n, buf)   W'[o0:+rows, c0:+n] into buf
//   B::build_bat(w, macc, r, o0, rows, q0, nq, buf)               W'[o0:+rows, q0·r:+nq·r]
//   B::check_input(op, x)                  backend-specific dtype rules (after the shared checks)
//   B::prepare_weight(w)                   W as the backend's builders read it
// The op entry points (*_op below) validate the same way on every backend and run the
// compositions; a backend's kernel is one call to them (inside its device guard).
// W' = W + ΔW is never built whole: the forward GEMM and the input-gradient GEMM run over
// chunks of it (a few output rows, or for dx in a narrow dtype a few input columns) built just
// before the GEMM reads them; bat's weight gradient G = dyᵀx is formed one chunk of input
// blocks at a time and contracted into dM there (never held whole unless W's own gradient is
// asked for).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "common/dropout.h"
#include "miss/miss_checks.h"

namespace lrkernels {
namespace miss_ops {

using Grads4 = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>>;

// Rows (of `width` elements of `elem` bytes) per chunk of `budget` bytes: a multiple of `unit`,
// at least one unit, at most what covers `total` rows.
inline int64_t chunk_rows(int64_t budget, int64_t width, int64_t unit, int64_t elem, int64_t total) {
  const int64_t rows = budget / std::max<int64_t>(width * elem, 1);
  const int64_t units = std::max<int64_t>(rows / unit, 1);
  return std::min(units * unit, std::max<int64_t>((total + unit - 1) / unit * unit, unit));
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// M as the full (r, out) block of the balance form (mini's M repeated along the output).
inline at::Tensor full_block(const at::Tensor& macc, int64_t out) {
  const int64_t cols = macc.size(1);
  return cols == out ? macc : macc.repeat({1, out / cols});
}

// y = x W'ᵀ + b over chunks of output rows (a multiple of `unit`); build(o0, rows, buf) writes
// W'[o0 : o0 + rows, :] into buf (rows × in, x's dtype).
template <typename Build>
at::Tensor chunked_forward(int64_t budget, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor* bias,
                           int64_t unit, Build&& build) {
  const int64_t tokens = x2.size(0), in = x2.size(1), out = weight.size(0);
  at::Tensor y = at::empty({tokens, out}, x2.options());
  if (out == 0) return y;
  if (tokens == 0 || in == 0) return bias ? y.copy_(bias->unsqueeze(0).expand({tokens, out})) : y.zero_();
  const int64_t rows = chunk_rows(budget, in, unit, x2.element_size(), out);
  at::Tensor buf = at::empty({rows, in}, x2.options());
  for (int64_t o0 = 0; o0 < out; o0 += rows) {
    const int64_t n = std::min(rows, out - o0);
    at::Tensor chunk = buf.narrow(0, 0, n);
    build(o0, n, chunk);
    at::Tensor yv = y.narrow(1, o0, n);
    if (bias) at::addmm_out(yv, bias->narrow(0, o0, n), x2, chunk.t());
    else at::mm_out(yv, x2, chunk.t());
  }
  return y;
}

// dx = dy W' over chunks of W'; build(o0, rows, c0, cols, buf) writes W'[o0 : o0 + rows,
// c0 : c0 + cols] into buf (rows × cols, dy's dtype), both ranges multiples of `unit`. In the
// accumulation dtype (float32 / float64) the chunks are whole rows of W': the reduction over the
// output features is split and each chunk's GEMM adds onto dx, so every GEMM has dx's full width
// (measured 2–3 % faster than column chunks on 4096 × 1024 → 1024, as fast as one GEMM over
// the whole of W'). In a narrower dtype dx would be rounded between chunks, so there the chunks
// are columns of W' and each column of dx is written once.
template <typename Build>
at::Tensor chunked_input_grad(int64_t budget, const at::Tensor& dy2, int64_t in, int64_t unit, Build&& build) {
  const int64_t tokens = dy2.size(0), out = dy2.size(1);
  at::Tensor dx = at::empty({tokens, in}, dy2.options());
  if (in == 0) return dx;
  if (tokens == 0 || out == 0) return dx.zero_();
  const auto dt = dy2.scalar_type();
  if (dt == at::kFloat || dt == at::kDouble) {
    const int64_t rows = chunk_rows(budget, in, unit, dy2.element_size(), out);
    at::Tensor buf = at::empty({rows, in}, dy2.options());
    for (int64_t o0 = 0; o0 < out; o0 += rows) {
      const int64_t n = std::min(rows, out - o0);
      at::Tensor chunk = buf.narrow(0, 0, n);
      build(o0, n, int64_t{0}, in, chunk);
      if (o0 == 0) at::mm_out(dx, dy2.narrow(1, 0, n), chunk);
      else dx.addmm_(dy2.narrow(1, o0, n), chunk);
    }
    return dx;
  }
  const int64_t cols = chunk_rows(budget, out, unit, dy2.element_size(), in);
  at::Tensor buf = at::empty({out * cols}, dy2.options());
  for (int64_t c0 = 0; c0 < in; c0 += cols) {
    const int64_t n = std::min(cols, in - c0);
    at::Tensor chunk = buf.narrow(0, 0, out * n).view({out, n});
    build(int64_t{0}, out, c0, n, chunk);
    at::Tensor dxv = dx.narrow(1, c0, n);
    at::mm_out(dxv, dy2, chunk);
  }
  return dx;
}

template <class B>
std::tuple<at::Tensor, at::Tensor> linear(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& miss_block,
                                          const DropoutParams& d, const MissShapes& sh) {
  const auto acc = miss_acc_dtype(x);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor s = B::chunk_sum(x2, sh.r, d);
  const at::Tensor macc = miss_block.to(acc).contiguous();
  const at::Tensor* b = opt_ptr(bias);
  at::Tensor y;
  if (d.threshold == 0 && B::chunked_balance(sh)) {
    const at::Tensor table = B::balance_table(macc);
    y = chunked_forward(B::kChunkBytes, x2, weight, b, 8, [&](int64_t o0, int64_t rows, at::Tensor& buf) {
      B::build_balance(weight, table, sh.r, sh.cols, o0, rows, 0, sh.in_features, buf);
    });
  } else {
    // The adapter term (and the bias) first; the base GEMM accumulates onto it (beta = 1).
    const at::Tensor mfull = full_block(macc, sh.out_features);
    y = b ? at::addmm(b->to(acc), s, mfull) : at::mm(s, mfull);
    if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
    y.addmm_(x2, weight.t());
  }
  return {y.view(with_last_dim(x, sh.out_features)), s.view(with_last_dim(x, sh.r))};
}

template <class B>
Grads4 linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& miss_block, const at::Tensor& chunk_sum, const DropoutParams& d,
                       const MissShapes& sh, std::array<bool, 4> mask) {
  const auto acc = miss_acc_dtype(x);
  const auto [want_x, want_w, want_bias, want_m] = mask;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  std::optional<at::Tensor> gx, gw, gbias, gm;
  if (want_w) gw = at::mm(dy2.t(), x.reshape({sh.tokens, sh.in_features}));
  if (want_bias) gbias = dy2.sum(0);
  if (!(want_x || want_m)) return {gx, gw, gbias, gm};
  const bool chunked = d.threshold == 0 && B::chunked_balance(sh);
  const at::Tensor macc = miss_block.to(acc).contiguous();
  const at::Tensor dya = want_m || !chunked ? dy2.to(acc) : at::Tensor();
  if (want_m) {
    // dM[k, o] = Σ_t S[t, k] dy[t, o]; mini sums the output columns that share a column of M.
    at::Tensor g = at::mm(chunk_sum.reshape({sh.tokens, sh.r}).t(), dya);
    if (sh.cols != sh.out_features) g = g.view({sh.r, sh.out_features / sh.cols, sh.cols}).sum(1);
    gm = g.to(miss_block.scalar_type());
  }
  if (want_x) {
    at::Tensor dx;
    if (chunked) {
      const at::Tensor table = B::balance_table(macc);
      dx = chunked_input_grad(B::kChunkBytes, dy2, sh.in_features, 8,
                              [&](int64_t o0, int64_t rows, int64_t c0, int64_t n, at::Tensor& buf) {
                                B::build_balance(weight, table, sh.r, sh.cols, o0, rows, c0, n, buf);
                              });
    } else {
      // dx = drop'(tile(dy Mᵀ)) + dy W: the adapter part first, the base GEMM onto it.
      const at::Tensor g = at::mm(dya, full_block(macc, sh.out_features).t()).contiguous();
      dx = B::tiled_input_grad(g, sh.in_features, d, x.scalar_type());
      dx.addmm_(dy2, weight);
    }
    gx = dx.view(x.sizes());
  }
  return {gx, gw, gbias, gm};
}

template <class B>
at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& miss_block, const MissShapes& sh) {
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor macc = miss_block.to(miss_acc_dtype(x)).contiguous();
  at::Tensor y = chunked_forward(B::kChunkBytes, x2, weight, opt_ptr(bias), sh.r,
                                 [&](int64_t o0, int64_t rows, at::Tensor& buf) {
                                   B::build_bat(weight, macc, sh.r, o0, rows, 0, sh.n_in, buf);
                                 });
  return y.view(with_last_dim(x, sh.out_features));
}

template <class B>
Grads4 bat_linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& miss_block, const MissShapes& sh, std::array<bool, 4> mask) {
  const auto acc = miss_acc_dtype(x);
  const auto [want_x, want_w, want_bias, want_m] = mask;
  const int64_t r = sh.r;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor macc = miss_block.to(acc).contiguous();
  std::optional<at::Tensor> gx, gw, gbias, gm;
  if (want_bias) gbias = dy2.sum(0);
  if (want_x) {
    gx = chunked_input_grad(B::kChunkBytes, dy2, sh.in_features, r,
                            [&](int64_t o0, int64_t rows, int64_t c0, int64_t n, at::Tensor& buf) {
                              B::build_bat(weight, macc, r, o0, rows, c0 / r, n / r, buf);
                            })
             .view(x.sizes());
  }
  if (want_w || want_m) {
    // G = dyᵀx one chunk of input blocks at a time (each chunk's GEMM has G's full height: as
    // fast as one GEMM over the whole of G, where chunks of output rows measured 4–5 % slower
    // on 4096 × 1024 → 1024): dM_p = Σ_q (W_pq + I)ᵀ G_pq, summed over the chunks, and
    // dW_pq = G_pq (I + M_p)ᵀ. Viewing output block p of a chunk as (r · nq, r) — row (i, q),
    // column j — both are one batched product per output block: dM_p += W_pᵀ G_p + Σ_q G_pq and
    // dW_p = G_p + G_p M_pᵀ.
    const at::Tensor xa = x.reshape({sh.tokens, sh.in_features}).to(acc).contiguous();
    const at::Tensor dya = dy2.to(acc);
    const int64_t out = sh.out_features, n_out = sh.n_out;
    if (want_m) gm = at::empty({n_out, r, r}, x.options().dtype(acc));
    if (want_w) gw = at::empty({out, sh.in_features}, x.options());
    const int64_t cols = chunk_rows(B::kChunkBytes, out, r, at::elementSize(acc), sh.in_features);
    at::Tensor gbuf = at::empty({out * cols}, x.options().dtype(acc));
    for (int64_t c0 = 0; c0 < sh.in_features; c0 += cols) {
      const int64_t n = std::min(cols, sh.in_features - c0), nq = n / r;
      at::Tensor g = gbuf.narrow(0, 0, out * n).view({out, n});
      at::mm_out(g, dya.t(), xa.narrow(1, c0, n));
      const at::Tensor gv = g.view({n_out, r * nq, r});
      if (want_m) {
        const at::Tensor wv = weight.narrow(1, c0, n).to(acc).reshape({n_out, r * nq, r});
        if (c0 == 0) at::bmm_out(*gm, wv.transpose(1, 2), gv);
        else gm->baddbmm_(wv.transpose(1, 2), gv);
        gm->add_(g.view({n_out, r, nq, r}).sum(2));
      }
      if (want_w) {
        const at::Tensor dw = at::baddbmm(gv, gv, macc.transpose(1, 2));
        gw->narrow(1, c0, n).copy_(dw.view({out, n}));
      }
    }
    if (want_m && gm->scalar_type() != miss_block.scalar_type()) gm = gm->to(miss_block.scalar_type());
  }
  return {gx, gw, gbias, gm};
}

// ---- the four ops, validated once for every backend --------------------------------------

template <class B>
std::tuple<at::Tensor, at::Tensor> linear_op(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& miss_block,
                                             double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "miss_linear";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_base(op, x, weight, bias);
  const MissShapes sh = check_miss_args(op, x, weight, miss_block);
  B::check_input(op, x);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  return linear<B>(x, B::prepare_weight(weight), bias, miss_block, d, sh);
}

template <class B>
Grads4 linear_backward_op(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& miss_block, const at::Tensor& chunk_sum, double dropout_p,
                          const std::optional<at::Tensor>& seed, std::array<bool, 4> mask) {
  const char* op = "miss_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_base(op, x, weight, std::nullopt);
  const MissShapes sh = check_miss_args(op, x, weight, miss_block);
  check_miss_grad_out(op, grad_out, x, sh);
  check_miss_chunk_sum(op, chunk_sum, x, sh);
  B::check_input(op, x);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  return linear_backward<B>(grad_out, x, B::prepare_weight(weight), miss_block, chunk_sum, d, sh, mask);
}

template <class B>
at::Tensor bat_linear_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& miss_block) {
  const char* op = "miss_bat_linear";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_base(op, x, weight, bias);
  const MissShapes sh = check_miss_bat_args(op, x, weight, miss_block);
  B::check_input(op, x);
  return bat_linear<B>(x, B::prepare_weight(weight), bias, miss_block, sh);
}

template <class B>
Grads4 bat_linear_backward_op(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& miss_block, std::array<bool, 4> mask) {
  const char* op = "miss_bat_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_linear_base(op, x, weight, std::nullopt);
  const MissShapes sh = check_miss_bat_args(op, x, weight, miss_block);
  check_miss_grad_out(op, grad_out, x, sh);
  B::check_input(op, x);
  return bat_linear_backward<B>(grad_out, x, B::prepare_weight(weight), miss_block, sh, mask);
}

}  // namespace miss_ops
}  // namespace lrkernels
