// Sparse-part kernels of the sparse-plus-low-rank layer (SLTrain's random support; see
// sparse_lowrank_params.h): the SpMM over the compressed rows (forward, y += x Sᵀ) or columns
// (backward, dx += dy S), fused with the add of the low-rank part and the cast to the output
// dtype, and the SDDMM dS = dyᵀx sampled on the support. The low-rank GEMMs and the columns
// support (LOST: index_select + GEMM, index_add_) run in cuBLAS / ATen in the binding.
//
// Written simple first: one thread per output element (SpMM, o fastest so a warp writes a
// contiguous piece of a token's row and gathers from one row of x) or per support entry
// (SDDMM, CSR order so a warp shares dy[t, o] and gathers close columns of x[t]), 64-bit
// index arithmetic, grid-stride loops, float32 accumulation. The SDDMM splits the tokens into
// `chunks` (grid.y) when nnz alone gives too few threads; each chunk writes its own partial
// sums and a second kernel adds them in chunk order, so the result is deterministic (no
// atomics). Indices and pointers of the support are range-checked where they are read: a
// corrupted support yields NaN there (the binding cannot raise without a host sync).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "lrkernels/common/cuda_check.cuh"
#include "lrkernels/common/math.cuh"
#include "lrkernels/sparse_lowrank_params.h"

namespace lrkernels {
namespace sparse_lowrank {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid-stride beyond this
constexpr int64_t kMaxChunks = 65535;      // grid.y limit
// The SDDMM aims at this many threads (a few waves on a large GPU) before it splits tokens,
// and gives each chunk at least kMinChunkTokens tokens.
constexpr int64_t kSddmmThreads = int64_t{1} << 18;
constexpr int64_t kMinChunkTokens = 128;

inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

// Sets p.chunks and p.chunk_tokens (no chunk is empty); the caller then provides p.partial
// (chunks · nnz floats) when p.chunks > 1.
template <typename scalar_t>
inline void plan_sddmm(SparseSddmmParams<scalar_t>& p) {
  const int64_t nnz = p.nnz < 1 ? 1 : p.nnz;
  int64_t chunks = (kSddmmThreads + nnz - 1) / nnz;
  const int64_t by_tokens = (p.tokens + kMinChunkTokens - 1) / kMinChunkTokens;
  if (chunks > by_tokens) chunks = by_tokens;
  if (chunks > kMaxChunks) chunks = kMaxChunks;
  if (chunks < 1) chunks = 1;
  p.chunk_tokens = (p.tokens + chunks - 1) / chunks;
  p.chunks = p.chunk_tokens > 0 ? (p.tokens + p.chunk_tokens - 1) / p.chunk_tokens : 1;
}

// out[t, o] = base[t, o] + Σ_{q in [ptr[o], ptr[o+1])} vals[perm[q]] · x[t, idx[q]]
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) spmm_kernel(SparseSpmmParams<scalar_t> p) {
  const int64_t n = p.tokens * p.rows;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = e / p.rows, o = e - t * p.rows;
    const int64_t beg = p.ptr[o], end = p.ptr[o + 1];
    float acc = p.base != nullptr ? p.base[e] : 0.0f;
    if (beg < 0 || end < beg || end > p.nnz) {
      acc = NAN;
    } else {
      const scalar_t* xr = p.x + t * p.cols;
      for (int64_t q = beg; q < end; ++q) {
        const int64_t c = p.idx[q], k = p.perm[q];
        if (c < 0 || c >= p.cols || k < 0 || k >= p.nnz) {
          acc = NAN;
          break;
        }
        acc += p.vals[k] * to_float(xr[c]);
      }
    }
    p.out[e] = from_float<scalar_t>(acc);
  }
}

// Entry q (CSR order) summed over the tokens of chunk blockIdx.y: into dv[perm[q]] directly
// (one chunk) or into partial[chunk, q].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sddmm_kernel(SparseSddmmParams<scalar_t> p) {
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * p.chunk_tokens;
  const int64_t t1 = t0 + p.chunk_tokens < p.tokens ? t0 + p.chunk_tokens : p.tokens;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < p.nnz;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    // the row holding q: the last o in [0, out] with row_ptr[o] <= q
    int64_t lo = 0, hi = p.out;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (p.row_ptr[mid] <= q) lo = mid;
      else hi = mid - 1;
    }
    const int64_t c = p.csr_col[q];
    float acc = 0.0f;
    if (lo >= p.out || p.row_ptr[lo] > q || p.row_ptr[lo + 1] <= q || c < 0 || c >= p.in) {
      acc = NAN;
    } else {
      const scalar_t* dyc = p.dy + lo;
      const scalar_t* xc = p.x + c;
      for (int64_t t = t0; t < t1; ++t) acc += to_float(dyc[t * p.out]) * to_float(xc[t * p.in]);
    }
    if (p.chunks > 1) {
      p.partial[static_cast<int64_t>(blockIdx.y) * p.nnz + q] = acc;
    } else {
      const int64_t k = p.csr_perm[q];
      if (k >= 0 && k < p.nnz) p.dv[k] = acc;  // a bad perm leaves dv's NaN fill
    }
  }
}

// dv[perm[q]] = Σ_c partial[c, q], chunks in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sddmm_reduce_kernel(SparseSddmmParams<scalar_t> p) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < p.nnz;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.0f;
    for (int64_t c = 0; c < p.chunks; ++c) s += p.partial[c * p.nnz + q];
    const int64_t k = p.csr_perm[q];
    if (k >= 0 && k < p.nnz) p.dv[k] = s;
  }
}

template <typename scalar_t>
inline cudaError_t launch_spmm(const SparseSpmmParams<scalar_t>& p, cudaStream_t stream) {
  if (p.tokens * p.rows == 0) return cudaSuccess;
  spmm_kernel<scalar_t><<<blocks_for(p.tokens * p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// p planned by plan_sddmm; with 0 tokens every dv entry becomes 0.
template <typename scalar_t>
inline cudaError_t launch_sddmm(const SparseSddmmParams<scalar_t>& p, cudaStream_t stream) {
  if (p.nnz == 0) return cudaSuccess;
  if (p.chunks < 1 || p.chunks > kMaxChunks || (p.chunks > 1 && p.partial == nullptr)) return cudaErrorInvalidValue;
  const dim3 grid(blocks_for(p.nnz), static_cast<unsigned>(p.chunks));
  sddmm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
  LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (p.chunks > 1) {
    sddmm_reduce_kernel<scalar_t><<<blocks_for(p.nnz), kThreads, 0, stream>>>(p);
    LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace sparse_lowrank
}  // namespace lrkernels
