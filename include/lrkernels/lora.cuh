// LoRA low-rank path kernels: the shrink (with dropout fused), the expand (accumulated into
// the base output in place) and the two fused backward passes. See lora_params.h for the
// notation. The base GEMMs (x Wᵀ, dy W, dyᵀ x) run in cuBLAS; these kernels handle the
// rank-r products, which are memory-bound: each reads its big operand (x or dy) once.
//
// Element types: T is x's (and y's, dy's, dx's) storage type, AT the adapter tensors' (A, B,
// rank_scale, out_scale): T, or float for fp32 adapters on an fp16/bf16 x (PEFT's default,
// check_adapter_param's rule), read through to_float like everything else.
//
// All kernels use 256 threads and fp32 accumulation. The rank is processed in chunks of RC
// (8, 16, 32 or 64 lanes, a template constant picked from r), so any rank works and small
// ranks do not pay for wide chunks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lrkernels/common/cuda_check.cuh"
#include "lrkernels/common/dropout.cuh"
#include "lrkernels/common/macros.h"
#include "lrkernels/common/math.cuh"
#include "lrkernels/common/philox.h"
#include "lrkernels/lora_params.h"

namespace lrkernels {
namespace lora {

constexpr int kThreads = 256;

// Loads the 8 elements [col0, col0 + 8) of row `row` of x (in fp32, zeros past the end),
// applies dropout, and returns the keep bits (all ones without dropout).
template <typename T>
__device__ __forceinline__ uint32_t load_row_group_dropped(const T* __restrict__ x, int64_t tokens,
                                                           int64_t in_features, int64_t row,
                                                           int64_t col0, const DropoutParams& d,
                                                           uint64_t seed, float v[8]) {
  uint32_t keep = 0xFFu;
  if (d.threshold != 0 && row < tokens) keep = dropout_keep_bits(seed, row, col0 >> 3, d.threshold);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int64_t col = col0 + e;
    float val = 0.f;
    if (row < tokens && col < in_features) val = to_float(x[row * in_features + col]);
    if (d.threshold != 0) val = ((keep >> e) & 1u) ? val * d.keep_scale : 0.f;
    v[e] = val;
  }
  return keep;
}

// ---------------------------------------------------------------------------------------
// Shrink: hidden[t, j] = Σ_k drop(x)[t, k] A[j, k].
// Block: 32 tokens; K in chunks of 64. x is read once per rank chunk (once for r <= 64).
template <typename T, typename AT, int RC>
__global__ void __launch_bounds__(kThreads) shrink_kernel(LoraShrinkParams p) {
  constexpr int TM = 32, KC = 64;
  constexpr int NPT = TM * RC / kThreads;
  static_assert(TM * KC / 8 == kThreads, "one 8-column group of x per thread");
  __shared__ float xs[TM][KC + 1];
  __shared__ float as[RC][KC + 1];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const AT* __restrict__ a = static_cast<const AT*>(p.a);
  const int tid = threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  const uint64_t seed = load_dropout_seed(p.dropout);
  for (int64_t r0 = 0; r0 < p.rank; r0 += RC) {
    float acc[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) acc[i] = 0.f;
    for (int64_t k0 = 0; k0 < p.in_features; k0 += KC) {
      {
        const int row = tid >> 3, grp = tid & 7;
        float v[8];
        load_row_group_dropped(x, p.tokens, p.in_features, t0 + row, k0 + grp * 8, p.dropout, seed, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) xs[row][grp * 8 + e] = v[e];
      }
#pragma unroll
      for (int i = 0; i < RC * KC / kThreads; ++i) {
        const int idx = tid + i * kThreads;
        const int jj = idx / KC, kk = idx % KC;
        const int64_t j = r0 + jj, k = k0 + kk;
        as[jj][kk] = (j < p.rank && k < p.in_features) ? to_float(a[j * p.in_features + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < NPT; ++i) {
        const int idx = tid + i * kThreads;
        const int tt = idx / RC, jj = idx % RC;
        float s = acc[i];
#pragma unroll 16
        for (int kk = 0; kk < KC; ++kk) s += xs[tt][kk] * as[jj][kk];
        acc[i] = s;
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int idx = tid + i * kThreads;
      const int64_t t = t0 + idx / RC, j = r0 + idx % RC;
      if (t < p.tokens && j < p.rank) p.hidden[t * p.rank + j] = acc[i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Expand: y[t, n] += o[n] · Σ_j s·g[j]·hidden[t, j] · B[n, j]   (in place on y).
// Block: 16 tokens × 128 outputs; a thread owns one column and 8 rows, so the write-back of
// y is coalesced and y is read and written exactly once.
template <typename T, typename AT, int RC>
__global__ void __launch_bounds__(kThreads) expand_kernel(LoraExpandParams p) {
  constexpr int TN = 128, TM = 16, RPT = TM / (kThreads / TN);
  __shared__ float hs[TM][RC + 1];
  __shared__ float bs[TN][RC + 1];
  const AT* __restrict__ b = static_cast<const AT*>(p.b);
  const AT* __restrict__ g = static_cast<const AT*>(p.rank_scale);
  const AT* __restrict__ o = static_cast<const AT*>(p.out_scale);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x;
  const int col = tid % TN, rgrp = tid / TN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  float acc[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) acc[i] = 0.f;
  for (int64_t r0 = 0; r0 < p.rank; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kThreads) {
      const int tt = idx / RC, jj = idx % RC;
      const int64_t t = t0 + tt, j = r0 + jj;
      float v = 0.f;
      if (t < p.tokens && j < p.rank) {
        v = p.hidden[t * p.rank + j] * p.scale;
        if (g != nullptr) v *= to_float(g[j]);
      }
      hs[tt][jj] = v;
    }
    for (int idx = tid; idx < TN * RC; idx += kThreads) {
      const int nn = idx / RC, jj = idx % RC;
      const int64_t n = n0 + nn, j = r0 + jj;
      bs[nn][jj] = (n < p.out_features && j < p.rank) ? to_float(b[n * p.rank + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < RC; ++jj) {
      const float bv = bs[col][jj];
#pragma unroll
      for (int i = 0; i < RPT; ++i) acc[i] += hs[rgrp + i * (kThreads / TN)][jj] * bv;
    }
    __syncthreads();
  }
  const int64_t n = n0 + col;
  if (n >= p.out_features) return;
  const float on = (o != nullptr) ? to_float(o[n]) : 1.f;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int64_t t = t0 + rgrp + i * (kThreads / TN);
    if (t < p.tokens) {
      T* dst = y + t * p.out_features + n;
      *dst = from_float<T>(to_float(*dst) + on * acc[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass over dy. Block: 64 tokens × 64 outputs of dy, staged once in shared
// memory and used for both products; partial sums go to global fp32 buffers by atomicAdd.
template <typename T, typename AT, int RC>
__global__ void __launch_bounds__(kThreads) grad_out_kernel(LoraGradOutParams p) {
  constexpr int TM = 64, TN = 64;
  constexpr int NPT_H = TM * RC / kThreads, NPT_B = TN * RC / kThreads;
  __shared__ float dys[TM][TN + 1];
  __shared__ float hs[TM][RC + 1];
  __shared__ float bs[TN][RC + 1];
  const T* __restrict__ dy = static_cast<const T*>(p.grad_out);
  const AT* __restrict__ b = static_cast<const AT*>(p.b);
  const AT* __restrict__ g = static_cast<const AT*>(p.rank_scale);
  const AT* __restrict__ o = static_cast<const AT*>(p.out_scale);
  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
#pragma unroll
  for (int i = 0; i < TM * TN / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int tt = idx / TN, nn = idx % TN;
    const int64_t t = t0 + tt, n = n0 + nn;
    dys[tt][nn] = (t < p.tokens && n < p.out_features) ? to_float(dy[t * p.out_features + n]) : 0.f;
  }
  for (int64_t r0 = 0; r0 < p.rank; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kThreads) {
      const int tt = idx / RC, jj = idx % RC;
      const int64_t t = t0 + tt, j = r0 + jj;
      float v = 0.f;
      if (t < p.tokens && j < p.rank) {
        v = p.hidden[t * p.rank + j] * p.scale;
        if (g != nullptr) v *= to_float(g[j]);
      }
      hs[tt][jj] = v;
    }
    for (int idx = tid; idx < TN * RC; idx += kThreads) {
      const int nn = idx / RC, jj = idx % RC;
      const int64_t n = n0 + nn, j = r0 + jj;
      float v = 0.f;
      if (n < p.out_features && j < p.rank) {
        v = to_float(b[n * p.rank + j]);
        if (o != nullptr) v *= to_float(o[n]);
      }
      bs[nn][jj] = v;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < NPT_H; ++i) {
      const int idx = tid + i * kThreads;
      const int tt = idx / RC, jj = idx % RC;
      float s = 0.f;
#pragma unroll 16
      for (int nn = 0; nn < TN; ++nn) s += dys[tt][nn] * bs[nn][jj];
      const int64_t t = t0 + tt, j = r0 + jj;
      if (t < p.tokens && j < p.rank) atomicAdd(p.grad_hidden + t * p.rank + j, s);
    }
#pragma unroll
    for (int i = 0; i < NPT_B; ++i) {
      const int idx = tid + i * kThreads;
      const int nn = idx / RC, jj = idx % RC;
      float s = 0.f;
#pragma unroll 16
      for (int tt = 0; tt < TM; ++tt) s += dys[tt][nn] * hs[tt][jj];
      const int64_t n = n0 + nn, j = r0 + jj;
      if (n < p.out_features && j < p.rank) atomicAdd(p.grad_b_raw + n * p.rank + j, s);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass over x. Block: 64 tokens × 64 input features. Each thread owns two
// 8-column groups of the tile: it regenerates their dropout bits once, stages drop(x) in
// shared memory for grad_a, and keeps the bits in a register to mask its own grad_x.
template <typename T, typename AT, int RC>
__global__ void __launch_bounds__(kThreads) grad_in_kernel(LoraGradInParams p) {
  constexpr int TM = 64, TK = 64;
  constexpr int GROUPS = TM * TK / 8 / kThreads;  // 2
  constexpr int NPT_A = RC * TK / kThreads;
  __shared__ float xs[TM][TK + 1];
  __shared__ float us[TM][RC + 1];
  __shared__ float as[RC][TK + 1];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const AT* __restrict__ a = static_cast<const AT*>(p.a);
  T* __restrict__ dx = static_cast<T*>(p.grad_x);
  const int tid = threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * TK;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  const uint64_t seed = load_dropout_seed(p.dropout);
  uint32_t keep[GROUPS];
  float dacc[GROUPS][8];
#pragma unroll
  for (int gi = 0; gi < GROUPS; ++gi) {
    const int gidx = tid + gi * kThreads;
    const int row = gidx >> 3, grp = gidx & 7;
    float v[8];
    keep[gi] = load_row_group_dropped(x, p.tokens, p.in_features, t0 + row, k0 + grp * 8, p.dropout, seed, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      xs[row][grp * 8 + e] = v[e];
      dacc[gi][e] = 0.f;
    }
  }
  for (int64_t r0 = 0; r0 < p.rank; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kThreads) {
      const int tt = idx / RC, jj = idx % RC;
      const int64_t t = t0 + tt, j = r0 + jj;
      us[tt][jj] = (t < p.tokens && j < p.rank) ? p.grad_u[t * p.rank + j] : 0.f;
    }
    for (int idx = tid; idx < RC * TK; idx += kThreads) {
      const int jj = idx / TK, kk = idx % TK;
      const int64_t j = r0 + jj, k = k0 + kk;
      as[jj][kk] = (j < p.rank && k < p.in_features) ? to_float(a[j * p.in_features + k]) : 0.f;
    }
    __syncthreads();
    if (dx != nullptr) {
#pragma unroll
      for (int gi = 0; gi < GROUPS; ++gi) {
        const int gidx = tid + gi * kThreads;
        const int row = gidx >> 3, grp = gidx & 7;
        for (int jj = 0; jj < RC; ++jj) {
          const float u = us[row][jj];
#pragma unroll
          for (int e = 0; e < 8; ++e) dacc[gi][e] += u * as[jj][grp * 8 + e];
        }
      }
    }
    if (p.grad_a != nullptr) {
#pragma unroll
      for (int i = 0; i < NPT_A; ++i) {
        const int idx = tid + i * kThreads;
        const int jj = idx / TK, kk = idx % TK;
        float s = 0.f;
#pragma unroll 16
        for (int tt = 0; tt < TM; ++tt) s += us[tt][jj] * xs[tt][kk];
        const int64_t j = r0 + jj, k = k0 + kk;
        if (j < p.rank && k < p.in_features) atomicAdd(p.grad_a + j * p.in_features + k, s);
      }
    }
    __syncthreads();
  }
  if (dx == nullptr) return;
#pragma unroll
  for (int gi = 0; gi < GROUPS; ++gi) {
    const int gidx = tid + gi * kThreads;
    const int64_t t = t0 + (gidx >> 3);
    if (t >= p.tokens) continue;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t k = k0 + (gidx & 7) * 8 + e;
      if (k >= p.in_features) continue;
      float d = dacc[gi][e];
      if (p.dropout.threshold != 0) d = ((keep[gi] >> e) & 1u) ? d * p.dropout.keep_scale : 0.f;
      T* dst = dx + t * p.in_features + k;
      *dst = from_float<T>(to_float(*dst) + d);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launchers: grids are sized from the problem, every launch is checked. Tokens go on
// grid.x (up to 2^31 - 1 blocks), features on grid.y (up to 65535 blocks).

inline unsigned ceil_div_u(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

template <typename T, typename AT = T>
cudaError_t launch_shrink(const LoraShrinkParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.rank == 0) return cudaSuccess;
  return LRK_RANK_CHUNK_SWITCH(p.rank, 64, RC, [&] {
    shrink_kernel<T, AT, RC><<<ceil_div_u(p.tokens, 32), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T, typename AT = T>
cudaError_t launch_expand(const LoraExpandParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.out_features == 0 || p.rank == 0) return cudaSuccess;
  const dim3 grid(ceil_div_u(p.tokens, 16), ceil_div_u(p.out_features, 128));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  return LRK_RANK_CHUNK_SWITCH(p.rank, 32, RC, [&] {
    expand_kernel<T, AT, RC><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T, typename AT = T>
cudaError_t launch_grad_out(const LoraGradOutParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.out_features == 0 || p.rank == 0) return cudaSuccess;
  const dim3 grid(ceil_div_u(p.tokens, 64), ceil_div_u(p.out_features, 64));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  return LRK_RANK_CHUNK_SWITCH(p.rank, 32, RC, [&] {
    grad_out_kernel<T, AT, RC><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

template <typename T, typename AT = T>
cudaError_t launch_grad_in(const LoraGradInParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.in_features == 0 || p.rank == 0) return cudaSuccess;
  const dim3 grid(ceil_div_u(p.tokens, 64), ceil_div_u(p.in_features, 64));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  return LRK_RANK_CHUNK_SWITCH(p.rank, 32, RC, [&] {
    grad_in_kernel<T, AT, RC><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace lora
}  // namespace lrkernels
