// Plain parameter structs between the torch binding (csrc/sparse_lowrank/sparse_lowrank_cuda.cu)
// and the sparse-part kernels of the sparse-plus-low-rank layer (sparse_lowrank.cuh). No torch
// types: pointers, sizes and scalars only; every dense matrix is row-major, token-major.
//
// The sparse part S (out, in) on a random support comes as the packed compressed support of
// csrc/sparse_lowrank/sparse_lowrank_checks.h: CSR (row_ptr, csr_col, csr_perm) and CSC
// (col_ptr, csc_row, csc_perm), perm[p] the position in sparse_values of the p-th entry.
//   SpMM   out[t, o] = base[t, o] + Σ_{p in row o} vals[perm[p]] · x[t, idx[p]]
//          forward: rows = out over the CSR, x = x (T, in);
//          backward: rows = in over the CSC, x = dy (T, out)  (dx = dy S).
//   SDDMM  dv[perm[p]] = Σ_t dy[t, o(p)] · x[t, csr_col[p]]  for every entry p (CSR order),
//          o(p) the row holding p.
// Accumulation in float32; a corrupted support (an index or pointer out of range) gives NaN
// where it is read, never an out-of-bounds access.
#pragma once

#include <cstdint>

namespace lrkernels {

template <typename scalar_t>
struct SparseSpmmParams {
  const scalar_t* x = nullptr;     // (T, cols), leading dimension cols
  const int32_t* ptr = nullptr;    // (rows + 1,)
  const int32_t* idx = nullptr;    // (nnz,): the column of x each entry reads
  const int32_t* perm = nullptr;   // (nnz,): the entry's position in vals
  const float* vals = nullptr;     // (nnz,): sparse_values in their own order, float32
  const float* base = nullptr;     // (T, rows) added to the product, or null; may alias out when scalar_t is float
  scalar_t* out = nullptr;         // (T, rows)
  int64_t tokens = 0, rows = 0, cols = 0, nnz = 0;
};

template <typename scalar_t>
struct SparseSddmmParams {
  const scalar_t* dy = nullptr;      // (T, out)
  const scalar_t* x = nullptr;       // (T, in)
  const int32_t* row_ptr = nullptr;  // (out + 1,)
  const int32_t* csr_col = nullptr;  // (nnz,)
  const int32_t* csr_perm = nullptr; // (nnz,)
  float* partial = nullptr;          // (chunks, nnz) in CSR order when chunks > 1, else unused
  float* dv = nullptr;               // (nnz,) in sparse_values' order
  int64_t tokens = 0, out = 0, in = 0, nnz = 0;
  int64_t chunks = 1;                // token chunks (grid.y); chunk c covers [c·chunk_tokens, ...)
  int64_t chunk_tokens = 0;
};

}  // namespace lrkernels
