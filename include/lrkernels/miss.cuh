// Bone / MiSS kernels (see miss_params.h): the balance chunk sum and its transpose (the input
// gradient's tiling), both with the fused Philox dropout, and the builders of a chunk of the
// adapted weight W' = W + ΔW that the cuBLAS GEMMs of the binding consume. Simple SIMT kernels,
// one thread per output element, threads along the fastest dimension so a warp's loads of x,
// W and M are coalesced; all arithmetic in float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lrkernels/common/cuda_check.cuh"
#include "lrkernels/common/math.cuh"
#include "lrkernels/common/philox.h"
#include "lrkernels/miss_params.h"

namespace lrkernels {
namespace miss {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid-stride beyond this

__device__ __forceinline__ float keep_factor(const DropoutParams& d, uint64_t seed, int64_t row, int64_t col) {
  if (d.threshold == 0) return 1.0f;
  const uint32_t bits = dropout_keep_bits(seed, row, col >> 3, d.threshold);
  return ((bits >> (col & 7)) & 1u) ? d.keep_scale : 0.0f;
}

inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

// One thread per (t, k), k fastest: a warp reads consecutive x values of one chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) chunk_sum_kernel(MissChunkSumParams<scalar_t> p) {
  const int64_t n = p.tokens * p.r;
  const uint64_t seed = p.dropout.threshold ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / p.r, k = idx - t * p.r;
    const scalar_t* xr = p.x + t * p.in;
    float acc = 0.0f;
    for (int64_t c = k; c < p.in; c += p.r) acc += to_float(xr[c]) * keep_factor(p.dropout, seed, t, c);
    p.s[idx] = acc;
  }
}

// One thread per (t, c), c fastest.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tile_kernel(MissTileParams<scalar_t> p) {
  const int64_t n = p.tokens * p.in;
  const uint64_t seed = p.dropout.threshold ? static_cast<uint64_t>(*p.dropout.seed) : 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / p.in, c = idx - t * p.in;
    p.out[idx] = from_float<scalar_t>(p.g[t * p.r + c % p.r] * keep_factor(p.dropout, seed, t, c));
  }
}

// balance/mini: buf[i, j] = W[o, c] + M[c mod r, o mod cols_m], o = o0 + i, c = c0 + j.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) build_balance_kernel(MissBuildParams<scalar_t> p) {
  const int64_t n = p.rows * p.cols;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / p.cols, j = idx - i * p.cols;
    const int64_t o = p.o0 + i, c = p.c0 + j;
    const float v = to_float(p.w[o * p.ldw + c]) + p.m[(c % p.r) * p.cols_m + o % p.cols_m];
    p.buf[idx] = from_float<scalar_t>(v);
  }
}

// bat: buf[i, j] = W'[o, c] with o = p·r + a, c = q·r + b:
//   W[o, c] + M_p[a, b] + Σ_k W[o, q·r + k] M_p[k, b].
// A warp covers consecutive b of one (o, q): the W values are broadcast, the M_p row coalesced.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) build_bat_kernel(MissBuildParams<scalar_t> p) {
  const int64_t n = p.rows * p.cols, r = p.r;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / p.cols, j = idx - i * p.cols;
    const int64_t o = p.o0 + i, c = p.c0 + j;
    const int64_t blk = o / r, a = o - blk * r, q = c / r, b = c - q * r;
    const float* mp = p.m + blk * r * r;
    const scalar_t* wq = p.w + o * p.ldw + q * r;
    float acc = to_float(wq[b]) + mp[a * r + b];
    for (int64_t k = 0; k < r; ++k) acc += to_float(wq[k]) * mp[k * r + b];
    p.buf[idx] = from_float<scalar_t>(acc);
  }
}

template <typename scalar_t>
inline cudaError_t launch_chunk_sum(const MissChunkSumParams<scalar_t>& p, cudaStream_t stream) {
  if (p.tokens * p.r == 0) return cudaSuccess;
  chunk_sum_kernel<scalar_t><<<blocks_for(p.tokens * p.r), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t>
inline cudaError_t launch_tile(const MissTileParams<scalar_t>& p, cudaStream_t stream) {
  if (p.tokens * p.in == 0) return cudaSuccess;
  tile_kernel<scalar_t><<<blocks_for(p.tokens * p.in), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t>
inline cudaError_t launch_build(const MissBuildParams<scalar_t>& p, bool bat, cudaStream_t stream) {
  if (p.rows * p.cols == 0) return cudaSuccess;
  if (bat) build_bat_kernel<scalar_t><<<blocks_for(p.rows * p.cols), kThreads, 0, stream>>>(p);
  else build_balance_kernel<scalar_t><<<blocks_for(p.rows * p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace miss
}  // namespace lrkernels
