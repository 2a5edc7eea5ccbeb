// CPU kernels of the sparse-plus-low-rank linear layer (SLTrain, arXiv 2406.02214; LOST,
// "Low-rank and Sparse Pre-training for LLMs"): y = x Wᵀ + b with W = s·B A + S, never building W in backward.
//
// Low-rank part: BLAS GEMMs through the factors; hidden = s·x Aᵀ is not saved but recomputed in
// backward by chunks of tokens (saving it would cost more memory than the factored weight's
// gradient saves over a dense layer's: T·r against in·out − r·(in + out) − nnz). Sparse
// part: columns support (LOST) = a gather-GEMM on the n selected input channels; random support
// (SLTrain) = the SpMM / SDDMM loops of sparse_lowrank_cpu_vec.cpp over compressed rows (CSR)
// and columns (CSC), on tiles of tokens held feature-major, tiles spread over the threads with
// at::parallel_for. The parallel regions run no ATen ops (raw loops over buffers owned by the
// caller), so they need no thread-local-state guard. Forward may instead build W transiently
// and run one dense GEMM when that costs fewer operations (many tokens, rank near the width).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "sparse_lowrank/sparse_lowrank_checks.h"
#include "sparse_lowrank/sparse_lowrank_cpu_vec.h"

namespace lrkernels {
namespace {

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Flat row-major indices -> the packed CSR + CSC support (layout in sparse_lowrank_checks.h),
// by two stable counting sorts: O(nnz + out + in), no comparison sort.
at::Tensor compress_support_cpu(const char* op, const char* name, const at::Tensor& indices, int64_t out,
                                int64_t in) {
  TORCH_CHECK_VALUE(indices.device().is_cpu(), "lrkernels.", op, ": ", name, " must be on the CPU here, got ",
                    indices.device());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "lrkernels.", op,
                   ": ", name, " must be int64 flat row-major indices into (out_features, in_features), got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "lrkernels.", op, ": ", name, " must be 1-D (nnz,), got shape ",
                    shape_str(indices.sizes()));
  TORCH_CHECK_VALUE(out >= 0 && in >= 0 && out < INT32_MAX && in < INT32_MAX, "lrkernels.", op,
                    ": out_features and in_features must be in [0, 2^31 - 1), got ", out, " and ", in);
  const int64_t nnz = indices.numel();
  TORCH_CHECK_VALUE(nnz <= INT32_MAX, "lrkernels.", op, ": at most 2^31 - 1 support entries, got ", nnz);
  const at::Tensor idx = indices.contiguous();
  const int64_t* f = idx.data_ptr<int64_t>();
  const int64_t numel = out * in;
  for (int64_t k = 0; k < nnz; ++k)
    TORCH_CHECK_INDEX(f[k] >= 0 && f[k] < numel, "lrkernels.", op, ": ", name, "[", k, "] = ", f[k],
                      " is out of range for a (", out, ", ", in, ") weight (flat indices must be in [0, ", numel,
                      "))");
  at::Tensor packed = at::empty({compressed_support_len(out, in, nnz)}, indices.options().dtype(at::kInt));
  int32_t* base = packed.data_ptr<int32_t>();
  int32_t* row_ptr = base;
  int32_t* csr_col = row_ptr + out + 1;
  int32_t* csr_perm = csr_col + nnz;
  int32_t* col_ptr = csr_perm + nnz;
  int32_t* csc_row = col_ptr + in + 1;
  int32_t* csc_perm = csc_row + nnz;
  // entries ordered by column (stable in k)
  std::fill(col_ptr, col_ptr + in + 1, 0);
  std::fill(row_ptr, row_ptr + out + 1, 0);
  for (int64_t k = 0; k < nnz; ++k) {
    ++col_ptr[f[k] % in + 1];
    ++row_ptr[f[k] / in + 1];
  }
  for (int64_t c = 0; c < in; ++c) col_ptr[c + 1] += col_ptr[c];
  for (int64_t r = 0; r < out; ++r) row_ptr[r + 1] += row_ptr[r];
  std::vector<int32_t> by_col(static_cast<size_t>(nnz)), next(col_ptr, col_ptr + in);
  for (int64_t k = 0; k < nnz; ++k) by_col[next[f[k] % in]++] = static_cast<int32_t>(k);
  // then by row, stably: CSR sorted by (row, column)
  next.assign(row_ptr, row_ptr + out);
  for (int64_t q = 0; q < nnz; ++q) {
    const int32_t k = by_col[q];
    const int32_t pos = next[f[k] / in]++;
    csr_perm[pos] = k;
    csr_col[pos] = static_cast<int32_t>(f[k] % in);
  }
  for (int64_t r = 0; r < out; ++r)
    for (int64_t p = row_ptr[r] + 1; p < row_ptr[r + 1]; ++p)
      TORCH_CHECK_VALUE(csr_col[p] != csr_col[p - 1], "lrkernels.", op, ": ", name, " has a duplicate entry: ", name, "[",
                        csr_perm[p - 1], "] = ", name, "[", csr_perm[p], "] = ", f[csr_perm[p]],
                        " (each position of S may appear once)");
  // CSC: CSR order placed by column, stably: rows ascending within each column
  next.assign(col_ptr, col_ptr + in);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t p = row_ptr[r]; p < row_ptr[r + 1]; ++p) {
      const int32_t pos = next[csr_col[p]]++;
      csc_row[pos] = static_cast<int32_t>(r);
      csc_perm[pos] = csr_perm[p];
    }
  return packed;
}

// Every pointer and index of a packed support in range, so a corrupted support is an error,
// not an out-of-bounds read: O(out + in + nnz), small next to the products.
void validate_compressed_cpu(const char* op, const at::Tensor& packed, int64_t out, int64_t in, int64_t nnz) {
  const SparseSupportView v = support_view(packed, out, in, nnz);
  auto check_ptr = [&](const int32_t* ptr, int64_t n, const char* what) {
    TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[n] == nnz, "lrkernels.", op, ": sparse_support is not a valid compressed ",
                      "support (", what, " does not span [0, nnz)); build it with lrkernels.sparse_support");
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_VALUE(ptr[i] <= ptr[i + 1], "lrkernels.", op, ": sparse_support is not a valid compressed support (",
                        what, " decreases at ", i, "); build it with lrkernels.sparse_support");
  };
  auto check_idx = [&](const int32_t* idx, int64_t bound, const char* what) {
    for (int64_t p = 0; p < nnz; ++p)
      TORCH_CHECK_INDEX(idx[p] >= 0 && idx[p] < bound, "lrkernels.", op, ": sparse_support is not a valid ",
                        "compressed support (", what, "[", p, "] = ", idx[p], " is outside [0, ", bound, "))");
  };
  check_ptr(v.row_ptr, out, "row_ptr");
  check_ptr(v.col_ptr, in, "col_ptr");
  check_idx(v.csr_col, in, "csr_col");
  check_idx(v.csc_row, out, "csc_row");
  check_idx(v.csr_perm, nnz, "csr_perm");
  check_idx(v.csc_perm, nnz, "csc_perm");
}

void validate_columns_cpu(const char* op, const at::Tensor& cols, int64_t in) {
  const at::Tensor c = cols.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(in), false);
  for (int64_t k = 0; k < c.numel(); ++k) {
    TORCH_CHECK_INDEX(p[k] >= 0 && p[k] < in, "lrkernels.", op, ": sparse_support (columns) [", k, "] = ", p[k],
                      " is out of range for in_features = ", in);
    TORCH_CHECK_VALUE(!seen[p[k]], "lrkernels.", op, ": sparse_support (columns) has a duplicate column ", p[k]);
    seen[p[k]] = true;
  }
}

// The compressed random support of a call: built here from flat indices, or checked.
at::Tensor random_support(const char* op, const at::Tensor& support, const SparseLowRankShapes& sh) {
  if (sh.kind == SupportKind::kFlatIndices) return compress_support_cpu(op, "sparse_support", support, sh.out_features, sh.in_features);
  at::Tensor packed = support.contiguous();
  validate_compressed_cpu(op, packed, sh.out_features, sh.in_features, sh.nnz);
  return packed;
}

// Tokens per chunk of the backward's low-rank products: the chunk buffer (tokens × width, the
// rank plus the columns support's channels) stays ~512 KiB, small next to the gradients, and
// each GEMM still has >= 64 tokens.
int64_t lowrank_chunk(int64_t width, int64_t elem) {
  const int64_t want = (512 * 1024) / std::max<int64_t>(1, width * elem);
  return std::max<int64_t>(64, want);
}

// m (rows, w) contiguous -> its first k columns as a contiguous (rows, k) tensor on m's own
// storage, rows moved down in place (row i's destination ends before row i+1's source starts),
// so splitting a [dB | dV] accumulator costs no second copy of dB.
at::Tensor leading_columns_in_place(const at::Tensor& m, int64_t k) {
  const int64_t rows = m.size(0), w = m.size(1);
  if (w == k) return m;
  const int64_t esz = static_cast<int64_t>(m.element_size());
  char* p = static_cast<char*>(m.data_ptr());
  for (int64_t i = 1; i < rows; ++i) std::memmove(p + i * k * esz, p + i * w * esz, static_cast<size_t>(k * esz));
  return m.view({-1}).narrow(0, 0, rows * k).view({rows, k});
}

// Tokens per tile, a multiple of 16 (whole vectors on every ISA). Wider tiles amortise what is
// paid per support entry and tile (the index and value loads; for the SDDMM, one horizontal
// sum), narrower ones keep the transposed tiles in cache: `want` tokens, fewer when the
// thread's transposed tiles (`features` rows) would pass ~2 MiB (L2 + its share of L3).
int64_t tile_width(int64_t tokens, int64_t features, int64_t elem, int64_t want) {
  int64_t w = (2 * 1024 * 1024) / std::max<int64_t>(1, features * elem);
  w = std::clamp<int64_t>(std::min(w, want) / 16 * 16, 16, want);
  return std::min(w, std::max<int64_t>(16, (tokens + 15) / 16 * 16));
}

// The columns support's gather and its transpose over `rows` tokens, on raw rows with leading
// dimensions (so they read and write column blocks of the low-rank chunk buffers):
//   gather: dst[t, k] = src[t, cols[k]];   scatter-add: dst[t, cols[k]] += src[t, k].
// (index_select / index_add_ along dim 1 are a gather or scatter per element; these are plain
// loops over the tokens.)
template <typename T>
void gather_columns(const T* src, int64_t ld_src, const int64_t* cols, int64_t n, int64_t rows, T* dst,
                    int64_t ld_dst) {
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t k = 0; k < n; ++k) dst[t * ld_dst + k] = src[t * ld_src + cols[k]];
  });
}

template <typename T>
void scatter_add_columns(const T* src, int64_t ld_src, const int64_t* cols, int64_t n, int64_t rows, T* dst,
                         int64_t ld_dst) {
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t k = 0; k < n; ++k) dst[t * ld_dst + cols[k]] += src[t * ld_src + k];
  });
}

template <typename T>
std::vector<T> permuted(const at::Tensor& values_acc, const int32_t* perm, int64_t nnz) {
  const T* v = values_acc.data_ptr<T>();
  std::vector<T> out(static_cast<size_t>(nnz));
  for (int64_t p = 0; p < nnz; ++p) out[p] = v[perm[p]];
  return out;
}

// y (T, out) = x Sᵀ (+ b when bias is given) for the random support: y's first writer, stored
// (no zero fill, no bias broadcast), so the low-rank GEMM after it accumulates onto y in its
// one pass over it.
template <typename T>
void sparse_forward(const at::Tensor& x2, const SparseSupportView& sv, const at::Tensor& values_acc,
                    const T* bias, const SparseLowRankShapes& sh, at::Tensor& y2) {
  const int64_t T_ = sh.tokens, in = sh.in_features, out = sh.out_features;
  const std::vector<T> vcsr = permuted<T>(values_acc, sv.csr_perm, sh.nnz);
  const int64_t w = tile_width(T_, in + out, sizeof(T), 64);
  const int64_t ntiles = (T_ + w - 1) / w;
  const T* xp = x2.data_ptr<T>();
  T* yp = y2.data_ptr<T>();
  const auto& k = sparse_lowrank_vec_fns<T>();
  at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) {
    std::vector<T> xt(static_cast<size_t>(in * w)), yt(static_cast<size_t>(out * w));
    for (int64_t t = b; t < e; ++t) {
      const int64_t t0 = t * w, rows = std::min(w, T_ - t0);
      k.load_transposed(xp + t0 * in, in, rows, in, xt.data(), w);
      k.spmm_rows(sv.row_ptr, sv.csr_col, vcsr.data(), bias, xt.data(), yt.data(), 0, out, w);
      k.put_transposed(yt.data(), w, rows, out, yp + t0 * out, out);
    }
  });
}

// dx (T, in) = dy S (when gx2 is given: stored, this is dx's first writer, so dx needs no zero
// fill), dv = (dyᵀ x) on the support (when gv is given, in sparse_values' order) and the bias
// gradient Σ_t dy (when gbias is given: from dy's tile, saving a pass over dy), for the random
// support. A thread holds two transposed tiles: dy's, and one (in × w) that serves the SpMM's
// output and then x's tile for the SDDMM. One private dv and bias accumulator per thread (nnz
// and out values), summed in thread order.
template <typename T>
void sparse_backward(const at::Tensor& dy2, const at::Tensor& x2, const SparseSupportView& sv,
                     const at::Tensor& values_acc, const SparseLowRankShapes& sh, T* gx2, T* gv, T* gbias) {
  const int64_t T_ = sh.tokens, in = sh.in_features, out = sh.out_features, nnz = sh.nnz;
  std::vector<T> vcsc;
  if (gx2) vcsc = permuted<T>(values_acc, sv.csc_perm, nnz);
  // wider tiles than the forward's: the SDDMM pays one horizontal sum per entry and tile
  const int64_t w = tile_width(T_, in + out, sizeof(T), 128);
  const int64_t ntiles = (T_ + w - 1) / w;
  const int64_t nthreads = at::get_num_threads();
  std::vector<T> partial(gv ? static_cast<size_t>(nthreads * nnz) : 0, T(0));
  std::vector<T> partial_bias(gbias ? static_cast<size_t>(nthreads * out) : 0, T(0));
  const T* dyp = dy2.data_ptr<T>();
  const T* xp = gv ? x2.data_ptr<T>() : nullptr;
  const auto& k = sparse_lowrank_vec_fns<T>();
  at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) {
    std::vector<T> dyt(static_cast<size_t>(out * w)), it(static_cast<size_t>(in * w));
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
    T* part = gv ? partial.data() + tid * nnz : nullptr;
    T* part_bias = gbias ? partial_bias.data() + tid * out : nullptr;
    for (int64_t t = b; t < e; ++t) {
      const int64_t t0 = t * w, rows = std::min(w, T_ - t0);
      k.load_transposed(dyp + t0 * out, out, rows, out, dyt.data(), w);
      if (gbias) k.row_sums(dyt.data(), out, w, part_bias);  // padding tokens are zero
      if (gx2) {
        k.spmm_rows(sv.col_ptr, sv.csc_row, vcsc.data(), nullptr, dyt.data(), it.data(), 0, in, w);
        k.put_transposed(it.data(), w, rows, in, gx2 + t0 * in, in);
      }
      if (gv) {
        k.load_transposed(xp + t0 * in, in, rows, in, it.data(), w);
        k.sddmm_rows(sv.row_ptr, sv.csr_col, dyt.data(), it.data(), part, 0, out, w);
      }
    }
  });
  if (gv) {
    at::parallel_for(0, nnz, 4096, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        T s = 0;
        for (int64_t c = 0; c < nthreads; ++c) s += partial[c * nnz + p];
        gv[sv.csr_perm[p]] = s;
      }
    });
  }
  if (gbias) {
    for (int64_t o = 0; o < out; ++o) {
      T s = 0;
      for (int64_t c = 0; c < nthreads; ++c) s += partial_bias[c * out + o];
      gbias[o] = s;
    }
  }
}

// W += S (dense, out × in) for the densified forward.
template <typename T>
void scatter_support(const SparseSupportView& sv, const at::Tensor& values_acc, const SparseLowRankShapes& sh,
                     at::Tensor& w) {
  const T* v = values_acc.data_ptr<T>();
  T* wp = w.data_ptr<T>();
  const int64_t in = sh.in_features;
  at::parallel_for(0, sh.out_features, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t p = sv.row_ptr[r]; p < sv.row_ptr[r + 1]; ++p) wp[r * in + sv.csr_col[p]] += v[sv.csr_perm[p]];
  });
}

// The densified forward (W built once, one GEMM over the tokens) costs out·in·(r + T)
// multiply-adds; the factored one T·r·(in + out) plus the sparse part, whose gather-bound
// multiply-adds (and the tile transposes) are weighted as several GEMM ones.
bool use_dense_forward(const SparseLowRankShapes& sh) {
  const double T_ = static_cast<double>(sh.tokens), in = sh.in_features, out = sh.out_features, r = sh.rank;
  const double sparse = sh.kind == SupportKind::kColumns ? T_ * sh.nnz : 4.0 * T_ * sh.nnz + 2.0 * T_ * (in + out);
  const double factored = T_ * r * (in + out) + sparse;
  const double dense = out * in * (r + T_);
  return sh.tokens > 0 && dense < factored;
}

}  // namespace

at::Tensor sparse_support_compress_cpu(const at::Tensor& indices, int64_t out_features, int64_t in_features) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return compress_support_cpu("sparse_support_compress", "indices", indices, out_features, in_features);
}

at::Tensor sparse_lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& lora_a,
                                                             const at::Tensor& lora_b, const at::Tensor& sparse_values,
                                                             const at::Tensor& sparse_support,
                                                             const std::optional<at::Tensor>& bias, double scale) {
  const char* op = "sparse_lowrank_linear";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const SparseLowRankShapes sh =
      check_sparse_lowrank_args(op, x, lora_a, lora_b, sparse_values, sparse_support, bias, scale);
  const auto acc = acc_dtype(x);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor packed;
  if (sh.kind == SupportKind::kColumns) validate_columns_cpu(op, sparse_support, sh.in_features);
  else packed = random_support(op, sparse_support, sh);

  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).to(acc).contiguous();
  // s·A (r × in, small next to the token-sized products): hidden = s·x Aᵀ carries the scale
  const at::Tensor as = lora_a.to(acc).mul(scale);
  const at::Tensor bc = lora_b.to(acc);
  const at::Tensor vals = sparse_values.to(acc).contiguous();
  // y is allocated in x's leading shape and filled through a 2-D view, so the op returns a
  // tensor of its own, not a view (autograd would copy a view's gradient, and so on)
  const at::Tensor y = at::empty(with_last_dim(x, sh.out_features), x2.options());
  at::Tensor y2 = y.view({sh.tokens, sh.out_features});
  if (use_dense_forward(sh)) {
    at::Tensor w = at::mm(bc, as);  // transient (out, in), never saved
    if (sh.kind == SupportKind::kColumns) {
      w.index_add_(1, sparse_support, vals);
    } else if (sh.nnz > 0) {
      const SparseSupportView sv = support_view(packed, sh.out_features, sh.in_features, sh.nnz);
      if (acc == at::kDouble) scatter_support<double>(sv, vals, sh, w);
      else scatter_support<float>(sv, vals, sh, w);
    }
    if (has_bias) at::addmm_out(y2, bias->to(acc), x2, w.t());
    else at::mm_out(y2, x2, w.t());
  } else if (sh.kind == SupportKind::kColumns && sh.nnz > 0) {
    // One GEMM for both parts: y = [s·x Aᵀ | x[:, cols]] [B | V]ᵀ (K = r + n), the gathered
    // columns written beside the hidden state, instead of a second, n-thin GEMM.
    const int64_t r = sh.rank, n = sparse_support.numel();
    const at::Tensor hc = at::empty({sh.tokens, r + n}, x2.options());  // transient: backward recomputes it
    at::Tensor h = hc.narrow(1, 0, r);
    at::mm_out(h, x2, as.t());
    const at::Tensor cols = sparse_support.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "sparse_lowrank_linear", [&] {
      gather_columns<scalar_t>(x2.data_ptr<scalar_t>(), sh.in_features, cols.data_ptr<int64_t>(), n, sh.tokens,
                               hc.data_ptr<scalar_t>() + r, r + n);
    });
    const at::Tensor bv = at::cat({bc, vals}, 1);  // (out, r + n)
    if (has_bias) at::addmm_out(y2, bias->to(acc), hc, bv.t());
    else at::mm_out(y2, hc, bv.t());
  } else {
    const at::Tensor hidden = at::mm(x2, as.t());  // transient: backward recomputes it
    if (sh.kind != SupportKind::kColumns && sh.nnz > 0 && sh.tokens > 0) {
      // the sparse part (and the bias) first, stored; the GEMM adds onto it
      const SparseSupportView sv = support_view(packed, sh.out_features, sh.in_features, sh.nnz);
      const at::Tensor b_acc = has_bias ? bias->to(acc).contiguous() : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES(acc, "sparse_lowrank_linear", [&] {
        sparse_forward<scalar_t>(x2, sv, vals, has_bias ? b_acc.data_ptr<scalar_t>() : nullptr, sh, y2);
      });
      y2.addmm_(hidden, bc.t());
    } else if (has_bias) {
      at::addmm_out(y2, bias->to(acc), hidden, bc.t());
    } else {
      at::mm_out(y2, hidden, bc.t());
    }
  }
  return y.to(x.scalar_type());
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
sparse_lowrank_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
                                   const at::Tensor& lora_b, const at::Tensor& sparse_values,
                                   const at::Tensor& sparse_support, double scale,
                                   std::array<bool, 5> mask) {
  const char* op = "sparse_lowrank_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const SparseLowRankShapes sh =
      check_sparse_lowrank_args(op, x, lora_a, lora_b, sparse_values, sparse_support, std::nullopt, scale);
  check_sparse_lowrank_grad(op, grad_out, x, sh);
  const auto [want_x, want_a, want_b, want_v, want_bias] = mask;
  const auto acc = acc_dtype(x);
  at::Tensor packed;
  if (want_x || want_v) {
    if (sh.kind == SupportKind::kColumns) validate_columns_cpu(op, sparse_support, sh.in_features);
    else packed = random_support(op, sparse_support, sh);
  }
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).to(acc).contiguous();
  const at::Tensor x2 = (want_a || want_b || want_v)
                            ? x.reshape({sh.tokens, sh.in_features}).to(acc).contiguous()
                            : at::Tensor();
  std::optional<at::Tensor> gx, ga, gb, gv, gbias;
  const bool columns = sh.kind == SupportKind::kColumns;
  const int64_t r = sh.rank, in = sh.in_features, out = sh.out_features;
  const int64_t n = columns ? sparse_support.numel() : 0;  // the columns support's channels
  at::Tensor gx_full, gx2, gv_acc;  // gx2: the (tokens, in) view of gx_full (x's shape, as y in forward)
  if (want_x) {
    gx_full = at::empty(x.sizes(), dy2.options());
    gx2 = gx_full.view({sh.tokens, in});
  }
  const at::Tensor vals = want_x && sh.nnz > 0 ? sparse_values.to(acc).contiguous() : at::Tensor();
  // Random support: the sparse part first, dx's first writer (dx = dy S, stored; the low-rank
  // part adds to it), its scratch (tiles, per-thread dS partials) gone before the low-rank
  // gradients are allocated; dS = dyᵀx on the support.
  bool gx_written = false;
  if (!columns && (want_x || want_v) && sh.nnz > 0 && sh.tokens > 0) {
    if (want_v) gv_acc = at::empty({sh.nnz}, dy2.options());
    if (want_bias) gbias = at::empty({out}, dy2.options());
    const SparseSupportView sv = support_view(packed, out, in, sh.nnz);
    AT_DISPATCH_FLOATING_TYPES(acc, "sparse_lowrank_linear_backward", [&] {
      sparse_backward<scalar_t>(dy2, x2, sv, vals, sh, want_x ? gx2.data_ptr<scalar_t>() : nullptr,
                                want_v ? gv_acc.data_ptr<scalar_t>() : nullptr,
                                want_bias ? gbias->data_ptr<scalar_t>() : nullptr);
    });
    gx_written = want_x;
  }
  // The low-rank gradients by chunks of tokens, so every token-sized intermediate is one chunk
  // of one buffer: h = s·x Aᵀ (recomputed, not saved by the forward: it would outweigh what the
  // factored weight's gradient saves over a dense one), then in the same buffer g = s·dy B
  // (what reaches s·x Aᵀ): dB += dy_cᵀ h_c, dA += g_cᵀ x_c, dx_c (+)= g_c A. The columns support
  // rides in the same GEMMs, n columns beside the rank's: x_c[:, cols] beside h_c gives
  // [dB | dV] = dy_cᵀ [h_c | x_c[:, cols]], and [B | V] beside s·B gives dy_c V, scattered into
  // dx_c's columns.
  const bool cols_h = columns && want_v && n > 0 && sh.tokens > 0;
  const bool cols_g = columns && want_x && n > 0;
  const int64_t h0 = want_b ? 0 : r, h1 = cols_h ? r + n : r;  // the buffer's columns the h phase fills
  const bool g_phase = want_x || want_a;
  const int64_t g1 = cols_g ? r + n : r;
  if (h1 > h0 || g_phase) {
    const at::Tensor a_acc = lora_a.to(acc);
    const at::Tensor cols = columns ? sparse_support.contiguous() : at::Tensor();
    // The scale goes onto the chunks (h_c, g_c), not into scaled copies of A and B: a copy of a
    // factor is as large as its gradient. [s·B | V] for the columns support is one (out, r + n)
    // buffer; the random support uses B itself.
    at::Tensor bv, ga_acc, gbv;
    if (g_phase) {
      if (cols_g) {
        bv = at::empty({out, r + n}, dy2.options());
        at::Tensor bv_b = bv.narrow(1, 0, r), bv_v = bv.narrow(1, r, n);
        at::mul_out(bv_b, lora_b.to(acc), scale);
        bv_v.copy_(vals);
      } else {
        bv = lora_b.to(acc);
      }
    }
    if (want_a) ga_acc = at::zeros({r, in}, dy2.options());
    if (h1 > h0) gbv = at::zeros({out, h1 - h0}, dy2.options());
    const int64_t chunk = lowrank_chunk(r + n, c10::elementSize(acc));
    const at::Tensor buf = at::empty({std::min(chunk, sh.tokens), r + n}, dy2.options());
    for (int64_t t0 = 0; t0 < sh.tokens; t0 += chunk) {
      const int64_t m = std::min(chunk, sh.tokens - t0);
      const at::Tensor dy_c = dy2.narrow(0, t0, m);
      const at::Tensor x_c = x2.defined() ? x2.narrow(0, t0, m) : at::Tensor();
      const at::Tensor b_c = buf.narrow(0, 0, m);
      if (h1 > h0) {
        if (want_b) {
          at::Tensor h_c = b_c.narrow(1, 0, r);
          at::mm_out(h_c, x_c, a_acc.t());
          h_c.mul_(scale);
        }
        if (cols_h)
          AT_DISPATCH_FLOATING_TYPES(acc, "sparse_lowrank_linear_backward", [&] {
            gather_columns<scalar_t>(x_c.data_ptr<scalar_t>(), in, cols.data_ptr<int64_t>(), n, m,
                                     b_c.data_ptr<scalar_t>() + r, r + n);
          });
        gbv.addmm_(dy_c.t(), b_c.narrow(1, h0, h1 - h0));
      }
      if (g_phase) {
        at::Tensor gg_c = b_c.narrow(1, 0, g1);
        at::mm_out(gg_c, dy_c, bv);
        at::Tensor g_c = gg_c.narrow(1, 0, r);
        if (!cols_g) g_c.mul_(scale);
        if (want_a) ga_acc.addmm_(g_c.t(), x_c);
        if (want_x) {
          at::Tensor gx_c = gx2.narrow(0, t0, m);
          if (gx_written) gx_c.addmm_(g_c, a_acc);
          else at::mm_out(gx_c, g_c, a_acc);
          if (cols_g)
            AT_DISPATCH_FLOATING_TYPES(acc, "sparse_lowrank_linear_backward", [&] {
              scatter_add_columns<scalar_t>(b_c.data_ptr<scalar_t>() + r, r + n, cols.data_ptr<int64_t>(), n, m,
                                            gx_c.data_ptr<scalar_t>(), in);
            });
        }
      }
    }
    if (want_a) ga = ga_acc.to(lora_a.scalar_type());
    if (h1 > h0) {
      if (cols_h) gv_acc = gbv.narrow(1, h1 - h0 - n, n).contiguous();
      if (want_b) gb = leading_columns_in_place(gbv, r).to(lora_b.scalar_type());
    }
  }
  if (want_bias && !gbias) gbias = dy2.sum(0);
  if (want_x) gx = gx_full.to(x.scalar_type());
  if (want_v) gv = (gv_acc.defined() ? gv_acc : at::zeros(sparse_values.sizes(), dy2.options()))
                       .to(sparse_values.scalar_type());
  return {gx, ga, gb, gv, gbias};
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("sparse_support_compress", &sparse_support_compress_cpu);
  m.impl("sparse_lowrank_linear", &sparse_lowrank_linear_cpu);
  m.impl("sparse_lowrank_linear_backward", &sparse_lowrank_linear_backward_cpu);
}

}  // namespace lrkernels
