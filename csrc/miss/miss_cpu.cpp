// Bone / MiSS on CPU: the backend of the compositions in miss_ops.h (GEMMs over chunks of W'
// built where they are consumed; see there). The W' chunk builders and the balance chunk sum
// and its transpose are the vectorised loops of miss_cpu_vec.cpp, run per row over threads; the
// dropout mask is drawn per row from the seed (the same Philox draw as on the GPU) and
// regenerated in backward; the GEMMs are ATen's (multi-threaded BLAS).
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
#include "miss/miss_ops.h"
#include "miss/miss_cpu_vec.h"

namespace lrkernels {
namespace {

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

// The balance/mini W' chunk: W'[o, c] = W[o, c] + M[c mod r, o mod cols]; mt = Mᵀ (cols, r) in
// the accumulation dtype, so each row's column of M is contiguous.
void build_balance(const at::Tensor& weight, const at::Tensor& mt, int64_t r, int64_t o0, int64_t rows, int64_t c0,
                   int64_t n, at::Tensor& buf) {
  const int64_t cols = mt.size(0);  // mini_r (or out_features)
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

// The CPU backend of miss_ops.h.
struct CpuMiss {
  // 2 MiB: W' chunks stay in the last-level cache between their build and the GEMM.
  static constexpr int64_t kChunkBytes = int64_t{2} << 20;
  // balance/mini without dropout run as GEMMs over W' chunks (y = x W'ᵀ + b, dx = dy W'): the
  // chunk builds cost O(out · in) per call, against O(tokens · r · out) for the composition
  // x Wᵀ + b + S M and its two rank-r backward products. Measured side by side (2 cores, Zen 4,
  // 1024 → 1024, r = 64, fwd + bwd): 4096 tokens 1.05× (AVX-512) / 1.10× (AVX2) the base linear
  // chunked against 1.18× / 1.16× composed; the builds stop paying below about 32 · in / r
  // tokens (crossover measured at 512 tokens for r = 64, above 1024 for r = 16). "aten" always
  // composes, "blocked" always chunks (tests keep both paths equal).
  static bool chunked_balance(const MissShapes& sh) {
    switch (cpu_kernels()) {
      case CpuKernels::kAten: return false;
      case CpuKernels::kBlocked: return true;
      default: return sh.tokens * sh.r >= 32 * sh.in_features;
    }
  }
  static at::Tensor chunk_sum(const at::Tensor& x2, int64_t r, const DropoutParams& d) {
    return lrkernels::chunk_sum(x2, r, d);
  }
  static at::Tensor tiled_input_grad(const at::Tensor& g, int64_t in, const DropoutParams& d, at::ScalarType dt) {
    return lrkernels::tiled_input_grad(g, in, d, dt);
  }
  // Mᵀ (cols, r): each output row's column of M contiguous.
  static at::Tensor balance_table(const at::Tensor& macc) { return macc.t().contiguous(); }
  static void build_balance(const at::Tensor& weight, const at::Tensor& mt, int64_t r, int64_t /*cols_m*/, int64_t o0,
                            int64_t rows, int64_t c0, int64_t n, at::Tensor& buf) {
    lrkernels::build_balance(weight, mt, r, o0, rows, c0, n, buf);
  }
  static void build_bat(const at::Tensor& weight, const at::Tensor& m, int64_t r, int64_t o0, int64_t rows, int64_t q0,
                        int64_t nq, at::Tensor& buf) {
    lrkernels::build_bat(weight, m, r, o0, rows, q0, nq, buf);
  }
  // every dtype the shared checks accept; the builders read W through its strides
  static void check_input(const char* /*op*/, const at::Tensor& /*x*/) {}
  static const at::Tensor& prepare_weight(const at::Tensor& weight) { return weight; }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> miss_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& miss_block, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  return miss_ops::linear_op<CpuMiss>(x, weight, bias, miss_block, dropout_p, seed);
}

miss_ops::Grads4 miss_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& miss_block, const at::Tensor& chunk_sum, double dropout_p,
                                          const std::optional<at::Tensor>& seed, std::array<bool, 4> mask) {
  return miss_ops::linear_backward_op<CpuMiss>(grad_out, x, weight, miss_block, chunk_sum, dropout_p, seed, mask);
}

at::Tensor miss_bat_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& miss_block) {
  return miss_ops::bat_linear_op<CpuMiss>(x, weight, bias, miss_block);
}

miss_ops::Grads4 miss_bat_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& weight, const at::Tensor& miss_block,
                                              std::array<bool, 4> mask) {
  return miss_ops::bat_linear_backward_op<CpuMiss>(grad_out, x, weight, miss_block, mask);
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("miss_linear", &miss_linear_cpu);
  m.impl("miss_linear_backward", &miss_linear_backward_cpu);
  m.impl("miss_bat_linear", &miss_bat_linear_cpu);
  m.impl("miss_bat_linear_backward", &miss_bat_linear_backward_cpu);
}

}  // namespace lrkernels
