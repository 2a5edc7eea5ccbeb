// Argument validation for the sparse-plus-low-rank ops (sparse_lowrank_linear, its backward,
// sparse_support_compress), shared by the CPU and CUDA kernels so both reject the same inputs
// with the same messages.
//
// The sparse part S (out, in) comes in one of three forms, told apart by sparse_values' rank and
// the support's dtype:
//   random, plain:      values (nnz,), support = int64 (nnz,) unique flat row-major indices
//                       into (out, in), any order (SLTrain's storage); compressed per call.
//   random, compressed: values (nnz,), support = the int32 tensor sparse_support_compress
//                       returns (layout below), built once per layer.
//   columns (LOST):     values (out, n), support = int64 (n,) distinct input channels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "common/checks.h"

namespace lrkernels {

// The compressed random support, one int32 tensor of out + in + 2 + 4·nnz entries:
//   [row_ptr (out+1) | csr_col (nnz) | csr_perm (nnz) | col_ptr (in+1) | csc_row (nnz) | csc_perm (nnz)]
// CSR lists the entries row by row (columns ascending), CSC column by column (rows
// ascending); csr_perm[p] / csc_perm[p] is the position in sparse_values of the p-th entry.
struct SparseSupportView {
  const int32_t *row_ptr, *csr_col, *csr_perm, *col_ptr, *csc_row, *csc_perm;
};

inline int64_t compressed_support_len(int64_t out, int64_t in, int64_t nnz) { return out + in + 2 + 4 * nnz; }

inline SparseSupportView support_view(const at::Tensor& packed, int64_t out, int64_t in, int64_t nnz) {
  const int32_t* p = packed.data_ptr<int32_t>();
  SparseSupportView v;
  v.row_ptr = p;
  v.csr_col = p + out + 1;
  v.csr_perm = v.csr_col + nnz;
  v.col_ptr = v.csr_perm + nnz;
  v.csc_row = v.col_ptr + in + 1;
  v.csc_perm = v.csc_row + nnz;
  return v;
}

enum class SupportKind { kFlatIndices, kCompressed, kColumns };

struct SparseLowRankShapes {
  int64_t tokens, in_features, out_features, rank, nnz;  // nnz: out·n for columns
  SupportKind kind;
};

inline void check_index_tensor(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                               at::ScalarType st, const char* what) {
  TORCH_CHECK_TYPE(t.defined(), "lrkernels.", op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device() == x.device(), "lrkernels.", op, ": ", name, " is on ", t.device(), " but x is on ",
                    x.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == st, "lrkernels.", op, ": ", name, " must be ",
                   st == at::kLong ? "int64" : "int32", " ", what, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "lrkernels.", op, ": ", name, " must be 1-D ", what, ", got shape ",
                    shape_str(t.sizes()));
}

// Shapes and dtypes of every argument (contents of the support are checked by the kernels:
// on CPU per call, see validate_*_cpu).
inline SparseLowRankShapes check_sparse_lowrank_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                                                     const at::Tensor& lora_b, const at::Tensor& values,
                                                     const at::Tensor& support, const std::optional<at::Tensor>& bias,
                                                     double scale) {
  check_x(op, x);
  const int64_t in = x.size(-1);
  check_dim(lora_a, 2, op, "lora_a", "(r, in_features)");
  check_adapter_param(lora_a, x, op, "lora_a");
  const int64_t r = lora_a.size(0);
  check_shape(lora_a, {r, in}, op, "lora_a", "(r, in_features)");
  check_dim(lora_b, 2, op, "lora_b", "(out_features, r)");
  check_adapter_param(lora_b, x, op, "lora_b");
  const int64_t out = lora_b.size(0);
  check_shape(lora_b, {out, r}, op, "lora_b", "(out_features, r)");
  check_adapter_param(values, x, op, "sparse_values");
  if (bias.has_value() && bias->defined()) {
    check_adapter_param(*bias, x, op, "bias");
    check_shape(*bias, {out}, op, "bias", "(out_features,)");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "lrkernels.", op, ": scale must be finite, got ", scale);
  const int64_t tokens = leading_tokens(x);

  SparseLowRankShapes sh{tokens, in, out, r, 0, SupportKind::kFlatIndices};
  TORCH_CHECK_VALUE(values.dim() == 1 || values.dim() == 2, "lrkernels.", op,
                    ": sparse_values must be 1-D (nnz,) for a random support or 2-D (out_features, n) for a "
                    "columns support, got shape ",
                    shape_str(values.sizes()));
  TORCH_CHECK_TYPE(support.defined(), "lrkernels.", op, ": sparse_support is undefined");
  if (values.dim() == 2) {
    check_index_tensor(support, x, op, "sparse_support", at::kLong,
                       "(n,): the input channels of a columns support (values are 2-D)");
    check_shape(values, {out, support.size(0)}, op, "sparse_values", "(out_features, n)");
    sh.kind = SupportKind::kColumns;
    sh.nnz = values.numel();
  } else if (support.scalar_type() == at::kInt) {
    check_index_tensor(support, x, op, "sparse_support", at::kInt, "(a compressed support)");
    const int64_t len = support.size(0), nnz = (len - out - in - 2) / 4;
    TORCH_CHECK_VALUE(len >= out + in + 2 && compressed_support_len(out, in, nnz) == len, "lrkernels.", op,
                      ": sparse_support (int32, compressed) has length ", len,
                      ", which is not out + in + 2 + 4·nnz for out_features = ", out, ", in_features = ", in,
                      "; build it with lrkernels.sparse_support(", out, ", ", in, ", indices=...)");
    check_shape(values, {nnz}, op, "sparse_values", "(nnz,) (nnz from sparse_support)");
    sh.kind = SupportKind::kCompressed;
    sh.nnz = nnz;
  } else {
    check_index_tensor(support, x, op, "sparse_support", at::kLong,
                       "(nnz,): flat row-major indices into (out_features, in_features), or the int32 "
                       "compressed support from lrkernels.sparse_support");
    check_shape(values, {support.size(0)}, op, "sparse_values", "(nnz,) = sparse_support's length");
    sh.kind = SupportKind::kFlatIndices;
    sh.nnz = values.numel();
  }
  return sh;
}

// What the CUDA kernels take beyond the shared checks: float32 / float16 / bfloat16 x (float64
// stays on the CPU kernels) and, for a random support, the compressed support (the plain flat
// indices would have to be sorted and validated per call, and a duplicate or out-of-range
// index could only be reported after a host synchronisation).
inline void check_sparse_lowrank_cuda(const char* op, const at::Tensor& x, const SparseLowRankShapes& sh) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "lrkernels.", op,
                   ": the CUDA kernels take float32, float16 or bfloat16 x, got float64 (run float64 on CPU)");
  TORCH_CHECK_VALUE(sh.kind != SupportKind::kFlatIndices, "lrkernels.", op,
                    ": on CUDA sparse_support must be the compressed support built once with "
                    "lrkernels.sparse_support(out_features, in_features, indices=...), not int64 flat indices "
                    "(validating those per call would synchronise the host)");
}

inline void check_sparse_lowrank_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                      const SparseLowRankShapes& sh) {
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "lrkernels.", op, ": grad_out is on ", grad_out.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "lrkernels.", op, ": grad_out has dtype ",
                   grad_out.scalar_type(), " but x has dtype ", x.scalar_type());
  check_shape(grad_out, with_last_dim(x, sh.out_features), op, "grad_out", "(..., out_features)");
}

}  // namespace lrkernels
