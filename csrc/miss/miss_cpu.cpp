// Bone / MiSS on CPU. The adapted weight W' = W + ΔW is never built whole: the forward GEMM and
// the input-gradient GEMM run over chunks of W' (a few output rows, or a few input columns, at
// a time) that are built in one cache-sized buffer just before the GEMM consumes them, and the
// bat weight gradient G = dyᵀx is likewise formed one output chunk at a time and contracted
// into dM there. The builders and the balance chunk sum are the vectorised loops of
// miss_cpu_vec.cpp; the GEMMs are ATen's (multi-threaded BLAS). With dropout, balance takes the
// composition y = x Wᵀ + b + S M (S the chunk sum of drop(x)), since the base GEMM must see x
// undropped; the mask is drawn per row from the seed and regenerated in backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dropout.h"
#include "common/dropout_cpu.h"
#include "miss/miss_checks.h"
#include "miss/miss_cpu_vec.h"

namespace lrkernels {
namespace {

// Bytes of one W' chunk: big enough that each chunk GEMM runs at full speed, small enough to
// stay in the last-level cache between being built and being read by the GEMM.
constexpr int64_t kChunkBytes = int64_t{2} << 20;

// Rows (of `width` elements of `elem` bytes) per chunk: a multiple of `unit`, at least one unit.
int64_t chunk_rows(int64_t width, int64_t unit, int64_t elem, int64_t total) {
  const int64_t rows = kChunkBytes / std::max<int64_t>(width * elem, 1);
  const int64_t units = std::max<int64_t>(rows / unit, 1);
  return std::min(units * unit, std::max<int64_t>(total, unit));
}

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A row of x's dtype as the accumulation dtype: the row itself, or its conversion in buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)n;
    (void)buf;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// The inverted-dropout mask of one row: keep_scale where kept, 0 where dropped.
template <typename acc_t>
inline void mask_row(const uint32_t* bits, int64_t n, acc_t keep, acc_t* m) {
  for (int64_t c = 0; c < n; ++c) m[c] = ((bits[c >> 3] >> (c & 7)) & 1u) ? keep : acc_t(0);
}

// Calls f(row, mask) for rows [0, rows) split over threads; mask is the row's dropout mask
// (nullptr without dropout). Raw loops only inside (no ATen calls on the worker threads).
template <typename acc_t, typename F>
void for_each_row(int64_t rows, int64_t cols, const DropoutParams& d, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  const int64_t groups = (cols + 7) / 8;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> bits(d.threshold ? static_cast<size_t>(groups) : 0);
    std::vector<acc_t> mask(d.threshold ? static_cast<size_t>(cols) : 0);
    const acc_t keep = static_cast<acc_t>(d.keep_scale);
    for (int64_t t = r0; t < r1; ++t) {
      if (d.threshold) {
        dropout_row_keep_bits(static_cast<uint64_t>(*d.seed), t, groups, d.threshold, bits.data());
        mask_row(bits.data(), cols, keep, mask.data());
      }
      f(t, d.threshold ? mask.data() : nullptr);
    }
  });
}

// S[t, k] = Σ_{c ≡ k mod r} drop(x)[t, c]: the balance/mini adapter's input (the chunks of r,
// the last one zero-padded, summed), in the accumulation dtype.
at::Tensor chunk_sum(const at::Tensor& x2, int64_t r, const DropoutParams& d) {
  const int64_t rows = x2.size(0), in = x2.size(1);
  at::Tensor s = at::zeros({rows, r}, x2.options().dtype(miss_acc_dtype(x2)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x2.scalar_type(), "miss_chunk_sum_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    acc_t* sp = s.mutable_data_ptr<acc_t>();
    for_each_row<acc_t>(rows, in, d, [&](int64_t t, const acc_t* mask) {
      thread_local std::vector<acc_t> buf;
      if (!std::is_same_v<scalar_t, acc_t>) buf.resize(static_cast<size_t>(in));
      miss_chunk_sum(as_acc(xp + t * in, in, buf.data()), mask, in, r, sp + t * r);
    });
  });
  return s;
}

// One row of the adapter's input gradient: out[c] = drop'[c] · g[c mod r] in x's dtype.
template <typename scalar_t, typename acc_t>
inline void tile_row(const acc_t* g, const acc_t* mask, int64_t in, int64_t r, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    miss_tile(g, mask, in, r, out);
  } else {
    thread_local std::vector<acc_t> buf;
    buf.resize(static_cast<size_t>(in));
    miss_tile(g, mask, in, r, buf.data());
    for (int64_t c = 0; c < in; ++c) out[c] = static_cast<scalar_t>(buf[c]);
  }
}

// out[t, c] = drop'[t, c] · g[t, c mod r] in x's dtype: the adapter's input gradient (the chunk
// sum's transpose), written before the base GEMM accumulates onto it.
at::Tensor tiled_input_grad(const at::Tensor& g, int64_t in, const DropoutParams& d, at::ScalarType dt) {
  const int64_t rows = g.size(0), r = g.size(1);
  at::Tensor out = at::empty({rows, in}, g.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "miss_tiled_input_grad_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_row<acc_t>(rows, in, d, [&](int64_t t, const acc_t* mask) {
      tile_row<scalar_t, acc_t>(gp + t * r, mask, in, r, op + t * in);
    });
  });
  return out;
}

// Rows [o0, o0 + rows) × columns [c0, c0 + n) of W' into buf (rows × n, x's dtype). `row(o, w,
// out)` computes one row in the accumulation dtype from w = W[o, c0 : c0 + n] (converted).
template <typename scalar_t, typename RowFn>
void build_chunk(const at::Tensor& weight, int64_t o0, int64_t rows, int64_t c0, int64_t n, scalar_t* buf,
                 RowFn&& row) {
  using acc_t = acc_of<scalar_t>;
  const int64_t in = weight.size(1);
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t a, int64_t b) {
    std::vector<acc_t> wrow, orow;
    const bool convert = !std::is_same_v<scalar_t, acc_t> || ws1 != 1;
    if (convert) wrow.resize(static_cast<size_t>(n));
    if (!std::is_same_v<scalar_t, acc_t>) orow.resize(static_cast<size_t>(n));
    for (int64_t i = a; i < b; ++i) {
      const int64_t o = o0 + i;
      const scalar_t* src = wp + o * ws0 + c0 * ws1;
      const acc_t* w;
      if (convert) {
        for (int64_t c = 0; c < n; ++c) wrow[c] = static_cast<acc_t>(src[c * ws1]);
        w = wrow.data();
      } else {
        w = reinterpret_cast<const acc_t*>(src);
      }
      scalar_t* dst = buf + i * n;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        row(o, w, dst);
      } else {
        row(o, w, orow.data());
        for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<scalar_t>(orow[c]);
      }
    }
  });
  (void)in;
}

// y = x W'ᵀ + b over chunks of output rows (a multiple of `unit`); build(o0, rows, buf) writes
// W'[o0 : o0 + rows, :] into buf (rows × in, x's dtype).
template <typename Build>
at::Tensor chunked_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor* bias, int64_t unit,
                           Build&& build) {
  const int64_t tokens = x2.size(0), in = x2.size(1), out = weight.size(0);
  at::Tensor y = at::empty({tokens, out}, x2.options());
  if (out == 0) return y;
  if (tokens == 0 || in == 0) {
    return bias ? y.copy_(bias->unsqueeze(0).expand({tokens, out})) : y.zero_();
  }
  const int64_t rows = chunk_rows(in, unit, x2.element_size(), out);
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

// dx = dy W' over chunks of input columns (a multiple of `unit`); build(c0, cols, buf) writes
// W'[:, c0 : c0 + cols] into buf (out × cols, x's dtype).
template <typename Build>
at::Tensor chunked_input_grad(const at::Tensor& dy2, int64_t in, int64_t unit, Build&& build) {
  const int64_t tokens = dy2.size(0), out = dy2.size(1);
  at::Tensor dx = at::empty({tokens, in}, dy2.options());
  if (in == 0) return dx;
  if (tokens == 0 || out == 0) return dx.zero_();
  const int64_t cols = chunk_rows(out, unit, dy2.element_size(), in);
  at::Tensor buf = at::empty({out * cols}, dy2.options());
  for (int64_t c0 = 0; c0 < in; c0 += cols) {
    const int64_t n = std::min(cols, in - c0);
    at::Tensor chunk = buf.narrow(0, 0, out * n).view({out, n});
    build(c0, n, chunk);
    at::Tensor dxv = dx.narrow(1, c0, n);
    at::mm_out(dxv, dy2, chunk);
  }
  return dx;
}

// The balance/mini W' chunk: W'[o, c] = W[o, c] + M[c mod r, o mod cols]; mt = Mᵀ (cols, r) in
// the accumulation dtype, so each row's column of M is contiguous.
void build_balance(const at::Tensor& weight, const at::Tensor& mt, int64_t r, int64_t o0, int64_t rows, int64_t c0,
                   int64_t n, at::Tensor& buf) {
  const int64_t cols = mt.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "miss_build_balance_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* m = mt.const_data_ptr<acc_t>();
    build_chunk<scalar_t>(weight, o0, rows, c0, n, buf.mutable_data_ptr<scalar_t>(),
                          [&](int64_t o, const acc_t* w, acc_t* out) {
                            miss_row_plus_tile(w, m + (o % cols) * r, c0, n, r, out);
                          });
  });
}

// The bat W' chunk: rows [o0, o0 + rows) × input blocks [q0, q0 + nq) of W'_pq = W_pq + W_pq M_p
// + M_p; m = M (n_out, r, r) in the accumulation dtype.
void build_bat(const at::Tensor& weight, const at::Tensor& m, int64_t r, int64_t o0, int64_t rows, int64_t q0,
               int64_t nq, at::Tensor& buf) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "miss_build_bat_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* mp = m.const_data_ptr<acc_t>();
    build_chunk<scalar_t>(weight, o0, rows, q0 * r, nq * r, buf.mutable_data_ptr<scalar_t>(),
                          [&](int64_t o, const acc_t* w, acc_t* out) {
                            const acc_t* block = mp + (o / r) * r * r;
                            miss_bat_row(w, block, block + (o % r) * r, nq, r, out);
                          });
  });
}

const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

// The chunked (W'-building) paths run unless the ATen composition is forced.
bool use_chunked() { return cpu_kernels() != CpuKernels::kAten; }

// M as the full (r, out) block of the balance form (mini's M repeated along the output).
at::Tensor full_block(const at::Tensor& macc, int64_t out) {
  const int64_t cols = macc.size(1);
  return cols == out ? macc : macc.repeat({1, out / cols});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> miss_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& miss_block, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  const char* op = "miss_linear";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_miss_base(op, x, weight, bias);
  const MissShapes sh = check_miss_args(op, x, weight, miss_block);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const auto acc = miss_acc_dtype(x);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor s = chunk_sum(x2, sh.r, d);
  const at::Tensor macc = miss_block.to(acc).contiguous();
  const at::Tensor* b = opt_ptr(bias);
  at::Tensor y;
  if (d.threshold == 0 && use_chunked()) {
    const at::Tensor mt = macc.t().contiguous();
    y = chunked_forward(x2, weight, b, 8, [&](int64_t o0, int64_t rows, at::Tensor& buf) {
      build_balance(weight, mt, sh.r, o0, rows, 0, sh.in_features, buf);
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

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
miss_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& miss_block, const at::Tensor& chunk_sum_, double dropout_p,
                         const std::optional<at::Tensor>& seed, std::array<bool, 4> mask) {
  const char* op = "miss_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_miss_base(op, x, weight, std::nullopt);
  const MissShapes sh = check_miss_args(op, x, weight, miss_block);
  check_miss_grad_out(op, grad_out, x, sh);
  check_miss_chunk_sum(op, chunk_sum_, x, sh);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const auto acc = miss_acc_dtype(x);
  const auto [want_x, want_w, want_bias, want_m] = mask;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  std::optional<at::Tensor> gx, gw, gbias, gm;
  if (want_w) gw = at::mm(dy2.t(), x.reshape({sh.tokens, sh.in_features}));
  if (want_bias) gbias = dy2.sum(0);
  if (!(want_x || want_m)) return {gx, gw, gbias, gm};
  const at::Tensor macc = miss_block.to(acc).contiguous();
  const at::Tensor dya = want_m || !(d.threshold == 0 && use_chunked()) ? dy2.to(acc) : at::Tensor();
  if (want_m) {
    // dM[k, o] = Σ_t S[t, k] dy[t, o]; mini sums the output columns that share a column of M.
    at::Tensor g = at::mm(chunk_sum_.reshape({sh.tokens, sh.r}).t(), dya);
    if (sh.cols != sh.out_features) g = g.view({sh.r, sh.out_features / sh.cols, sh.cols}).sum(1);
    gm = g.to(miss_block.scalar_type());
  }
  if (want_x) {
    at::Tensor dx;
    if (d.threshold == 0 && use_chunked()) {
      const at::Tensor mt = macc.t().contiguous();
      dx = chunked_input_grad(dy2, sh.in_features, 8, [&](int64_t c0, int64_t n, at::Tensor& buf) {
        build_balance(weight, mt, sh.r, 0, sh.out_features, c0, n, buf);
      });
    } else {
      // dx = drop'(tile(dy Mᵀ)) + dy W: the adapter part first, the base GEMM onto it.
      const at::Tensor g = at::mm(dya, full_block(macc, sh.out_features).t()).contiguous();
      dx = tiled_input_grad(g, sh.in_features, d, x.scalar_type());
      dx.addmm_(dy2, weight);
    }
    gx = dx.view(x.sizes());
  }
  return {gx, gw, gbias, gm};
}

at::Tensor miss_bat_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& miss_block) {
  const char* op = "miss_bat_linear";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_miss_base(op, x, weight, bias);
  const MissShapes sh = check_miss_bat_args(op, x, weight, miss_block);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor macc = miss_block.to(miss_acc_dtype(x)).contiguous();
  at::Tensor y = chunked_forward(x2, weight, opt_ptr(bias), sh.r, [&](int64_t o0, int64_t rows, at::Tensor& buf) {
    build_bat(weight, macc, sh.r, o0, rows, 0, sh.n_in, buf);
  });
  return y.view(with_last_dim(x, sh.out_features));
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
miss_bat_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& miss_block, std::array<bool, 4> mask) {
  const char* op = "miss_bat_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_miss_base(op, x, weight, std::nullopt);
  const MissShapes sh = check_miss_bat_args(op, x, weight, miss_block);
  check_miss_grad_out(op, grad_out, x, sh);
  const auto acc = miss_acc_dtype(x);
  const auto [want_x, want_w, want_bias, want_m] = mask;
  const int64_t r = sh.r, n_in = sh.n_in;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor macc = miss_block.to(acc).contiguous();
  std::optional<at::Tensor> gx, gw, gbias, gm;
  if (want_bias) gbias = dy2.sum(0);
  if (want_x) {
    gx = chunked_input_grad(dy2, sh.in_features, r, [&](int64_t c0, int64_t n, at::Tensor& buf) {
           build_bat(weight, macc, r, 0, sh.out_features, c0 / r, n / r, buf);
         }).view(x.sizes());
  }
  if (want_w || want_m) {
    // G = dyᵀx one chunk of output blocks at a time (never the whole (out, in) G unless it is
    // the weight gradient asked for): dM_p = Σ_q (W_pq + I)ᵀ G_pq, dW_pq = G_pq (I + M_p)ᵀ.
    // Viewing a chunk's rows as (r · n_in, r) — row (i, q), column j — both are one batched
    // product per output block: dM_p = W_pᵀ G_p + Σ_q G_pq, dW_p = G_p + G_p M_pᵀ.
    const at::Tensor xa = x.reshape({sh.tokens, sh.in_features}).to(acc).contiguous();
    const at::Tensor dya = dy2.to(acc);
    if (want_m) gm = at::empty({sh.n_out, r, r}, x.options().dtype(acc));
    if (want_w) gw = at::empty({sh.out_features, sh.in_features}, x.options());
    const int64_t rows = chunk_rows(sh.in_features, r, at::elementSize(acc), sh.out_features);
    at::Tensor gbuf = at::empty({rows, sh.in_features}, x.options().dtype(acc));
    for (int64_t o0 = 0; o0 < sh.out_features; o0 += rows) {
      const int64_t n = std::min(rows, sh.out_features - o0), p0 = o0 / r, np = n / r;
      at::Tensor g = gbuf.narrow(0, 0, n);
      at::mm_out(g, dya.narrow(1, o0, n).t(), xa);
      const at::Tensor gv = g.view({np, r * n_in, r});
      if (want_m) {
        const at::Tensor wv = weight.narrow(0, o0, n).to(acc).reshape({np, r * n_in, r});
        at::Tensor dm = gm->narrow(0, p0, np);
        at::bmm_out(dm, wv.transpose(1, 2), gv);
        dm.add_(g.view({np, r, n_in, r}).sum(2));
      }
      if (want_w) {
        const at::Tensor dw = at::baddbmm(gv, gv, macc.narrow(0, p0, np).transpose(1, 2));
        gw->narrow(0, o0, n).copy_(dw.view({n, sh.in_features}));
      }
    }
    if (want_m && gm->scalar_type() != miss_block.scalar_type()) gm = gm->to(miss_block.scalar_type());
  }
  return {gx, gw, gbias, gm};
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("miss_linear", &miss_linear_cpu);
  m.impl("miss_linear_backward", &miss_linear_backward_cpu);
  m.impl("miss_bat_linear", &miss_bat_linear_cpu);
  m.impl("miss_bat_linear_backward", &miss_bat_linear_backward_cpu);
}

}  // namespace lrkernels
