// Multi-LoRA kernels (SGMV-style: segments of tokens that share an adapter). See
// multi_lora_params.h for the notation. The base GEMMs run in cuBLAS; these kernels handle
// the per-adapter low-rank products.
//
// Work decomposition: the grouping lists each adapter's tokens contiguously, and grid.x
// enumerates token tiles *within* segments: adapter l owns ceil(n_l / TM) tiles. The host
// cannot know the n_l without synchronising, so grid.x is sized for the worst case,
// min(T, ceil(T / TM) + min(L, T)) tiles (each non-empty segment adds at most one partial
// tile), and blocks past the real count exit at once. Every block stages its adapter's A or
// B tile once for all its tokens, so many tokens per adapter (prefill) reuse adapter weights
// from shared memory, and one token per adapter (decode) streams them once; the shrink
// splits K over grid.y so the decode case still fills the GPU.
//
// Options, compile-time (template bools, chosen by the launchers): Is_dropout (shrink,
// grad_in: x enters as drop(x), the mask regenerated from the seed, common/dropout.cuh),
// Has_gate and Has_out_scale (expand, grad_out: the per-adapter gains rank_scale (L, r_max)
// and out_scale (L, out)). lora_linear is the one-adapter case of these kernels
// (csrc/lora/lora_cuda.cu): the identity grouping of one_adapter_segments (multi_lora_tiles.h),
// a scalar scale, its rank_scale (r,) and out_scale (out,) as adapter 0's gains.
//
// Element types: T is x's (y's, dy's, dx's), AT the adapter tensors' (A, B, gains): T, or float for
// fp32 adapters on an fp16/bf16 x (check_adapter_param's rule; SIMT kernels only, as the WMMA
// tiles take no fp32 operand).
//
// Rank handling: ranks are processed in chunks of RC lanes (a template constant chosen from
// r_max) and each block loops only up to its own adapter's rank, so a rank-8 adapter in a
// batch padded to r_max = 64 does an eighth of the work. fp32 accumulation throughout. These
// are plain SIMT kernels, written for a first GPU run to be right; the prefill shrink and
// expand of fp16/bf16 can instead run on tensor cores (multi_lora_tc.cuh), when the binding
// asks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lrkernels/common/cuda_check.cuh"
#include "lrkernels/common/dropout.cuh"
#include "lrkernels/common/macros.h"
#include "lrkernels/common/math.cuh"
#include "lrkernels/multi_lora_params.h"
#include "lrkernels/multi_lora_tc.cuh"
#include "lrkernels/multi_lora_tiles.h"

namespace lrkernels {
namespace multi_lora {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------
// Shrink. Block: TM = 32 tokens of one adapter × one slice × one K range (grid.y). K ranges
// start at multiples of 64, so each thread's 8-column group of x is one Philox draw.
template <typename T, typename AT, int RC, bool Is_dropout>
__global__ void __launch_bounds__(kThreads) shrink_kernel(MultiLoraShrinkParams p) {
  constexpr int TM = 32, KC = 64;
  constexpr int NPT = TM * RC / kThreads;
  static_assert(TM * KC / 8 == kThreads, "one 8-column group of x per thread");
  static_assert(NPT >= 1, "rank chunk too small for the block");
  __shared__ float xs[TM][KC + 1];
  __shared__ float as[RC][KC + 1];
  __shared__ int64_t toks[TM];
  int64_t l, pos0;
  int count;
  if (!find_tile<TM>(p.seg, blockIdx.x, l, pos0, count)) return;
  const int64_t r = adapter_rank(p.seg, l);
  if (r == 0) return;
  const int tid = threadIdx.x;
  const int64_t s = blockIdx.z, in = p.in_features, r_max = p.seg.r_max;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * p.k_split;
  const int64_t k_end = (k_begin + p.k_split < in) ? k_begin + p.k_split : in;
  if (tid < TM) toks[tid] = tile_token(p.seg, pos0, tid, count);
  __syncthreads();
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const AT* __restrict__ a = static_cast<const AT*>(p.a) + (s * p.seg.num_adapters + l) * r_max * in;
  float* __restrict__ hidden = p.hidden + s * p.seg.tokens * r_max;
  const uint64_t seed = Is_dropout ? load_dropout_seed(p.dropout) : 0ull;
  for (int64_t r0 = 0; r0 < r; r0 += RC) {
    float acc[NPT];
#pragma unroll
    for (int i = 0; i < NPT; ++i) acc[i] = 0.f;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += KC) {
      {
        const int row = tid >> 3, grp = tid & 7;
        float v[8];
        load_group8_dropped<Is_dropout>(x, in, toks[row], k0 + grp * 8, k_end, p.dropout, seed, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) xs[row][grp * 8 + e] = v[e];
      }
#pragma unroll
      for (int i = 0; i < (RC * KC + kThreads - 1) / kThreads; ++i) {
        const int idx = tid + i * kThreads;
        if (idx < RC * KC) {
          const int jj = idx / KC, kk = idx % KC;
          const int64_t j = r0 + jj, k = k0 + kk;
          as[jj][kk] = (j < r && k < k_end) ? to_float(a[j * in + k]) : 0.f;
        }
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < NPT; ++i) {
        const int idx = tid + i * kThreads;
        const int tt = idx / RC, jj = idx % RC;
        if (r0 + jj >= r) continue;  // lanes past this adapter's rank: no work (warp-uniform for r % 32 == 0)
        float sum = acc[i];
#pragma unroll 16
        for (int kk = 0; kk < KC; ++kk) sum += xs[tt][kk] * as[jj][kk];
        acc[i] = sum;
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < NPT; ++i) {
      const int idx = tid + i * kThreads;
      const int tt = idx / RC;
      const int64_t t = toks[tt], j = r0 + idx % RC;
      if (t >= 0 && j < r) atomicAdd(hidden + t * r_max + j, acc[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Expand. Block: TM = 16 tokens of one adapter × TN = 128 columns of one slice; a thread
// owns one column and 8 tokens, so y is read and written once, coalesced, without atomics
// (each (token, column) belongs to exactly one block).
template <typename T, typename AT, int RC, bool Has_gate, bool Has_out_scale>
__global__ void __launch_bounds__(kThreads) expand_kernel(MultiLoraExpandParams p) {
  constexpr int TN = 128, TM = 16, RPT = TM / (kThreads / TN);
  __shared__ float hs[TM][RC + 1];
  __shared__ float bs[TN][RC + 1];
  __shared__ int64_t toks[TM];
  int64_t l, pos0;
  int count;
  if (!find_tile<TM>(p.seg, blockIdx.x, l, pos0, count)) return;
  const int64_t r = adapter_rank(p.seg, l);
  if (r == 0) return;
  int64_t s, n0, n_end;
  if (!find_column_tile<TN>(p.slice_start, p.slices, blockIdx.y, s, n0, n_end)) return;
  const int tid = threadIdx.x;
  const int col = tid % TN, rgrp = tid / TN;
  const int64_t r_max = p.seg.r_max;
  if (tid < TM) toks[tid] = tile_token(p.seg, pos0, tid, count);
  __syncthreads();
  const AT* __restrict__ b = static_cast<const AT*>(p.b) + l * p.out_total * r_max;
  const AT* __restrict__ g = Has_gate ? static_cast<const AT*>(p.rank_scale) + l * r_max : nullptr;
  const float* __restrict__ hidden = p.hidden + s * p.seg.tokens * r_max;
  const float scale = p.scales != nullptr ? p.scales[l] : p.scale;
  float acc[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) acc[i] = 0.f;
  for (int64_t r0 = 0; r0 < r; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kThreads) {
      const int tt = idx / RC, jj = idx % RC;
      const int64_t t = toks[tt], j = r0 + jj;
      float v = 0.f;
      if (t >= 0 && j < r) {
        v = hidden[t * r_max + j] * scale;
        if constexpr (Has_gate) v *= to_float(g[j]);
      }
      hs[tt][jj] = v;
    }
    for (int idx = tid; idx < TN * RC; idx += kThreads) {
      const int nn = idx / RC, jj = idx % RC;
      const int64_t n = n0 + nn, j = r0 + jj;
      bs[nn][jj] = (n < n_end && j < r) ? to_float(b[n * r_max + j]) : 0.f;
    }
    __syncthreads();
    const int jmax = (r - r0 < RC) ? static_cast<int>(r - r0) : RC;  // this adapter's rank only
#pragma unroll 8
    for (int jj = 0; jj < jmax; ++jj) {
      const float bv = bs[col][jj];
#pragma unroll
      for (int i = 0; i < RPT; ++i) acc[i] += hs[rgrp + i * (kThreads / TN)][jj] * bv;
    }
    __syncthreads();
  }
  const int64_t n = n0 + col;
  if (n >= n_end) return;
  T* __restrict__ y = static_cast<T*>(p.y);
  float on = 1.f;
  if constexpr (Has_out_scale) on = to_float(static_cast<const AT*>(p.out_scale)[l * p.out_total + n]);
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int64_t t = toks[rgrp + i * (kThreads / TN)];
    if (t >= 0) {
      T* dst = y + t * p.ldy + n;
      *dst = from_float<T>(to_float(*dst) + on * acc[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass over dy. Block: 64 tokens of one adapter × 64 outputs, dy staged once in
// shared memory and used for both grad_z and grad_b; partial sums go out by atomicAdd. The
// gains enter the staged operands (s·g ⊙ hidden and o ⊙ B), so both products come out as the
// params header states them and the binding's epilogues finish ∂L/∂B, ∂L/∂o, ∂L/∂g.
template <typename T, typename AT, int RC, bool Has_gate, bool Has_out_scale>
__global__ void __launch_bounds__(kThreads) grad_out_kernel(MultiLoraGradOutParams p) {
  constexpr int TM = 64, TN = 64;
  constexpr int NPT_H = TM * RC / kThreads, NPT_B = TN * RC / kThreads;
  static_assert(NPT_H >= 1 && NPT_B >= 1, "rank chunk too small for the block");
  __shared__ float dys[TM][TN + 1];
  __shared__ float hs[TM][RC + 1];
  __shared__ float bs[TN][RC + 1];
  __shared__ int64_t toks[TM];
  int64_t l, pos0;
  int count;
  if (!find_tile<TM>(p.seg, blockIdx.x, l, pos0, count)) return;
  const int64_t r = adapter_rank(p.seg, l);
  if (r == 0) return;
  const int tid = threadIdx.x;
  const int64_t out = p.out_features, r_max = p.seg.r_max;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;
  if (tid < TM) toks[tid] = tile_token(p.seg, pos0, tid, count);
  __syncthreads();
  const T* __restrict__ dy = static_cast<const T*>(p.grad_out);
  const AT* __restrict__ b = static_cast<const AT*>(p.b) + l * out * r_max;
  const AT* __restrict__ g = Has_gate ? static_cast<const AT*>(p.rank_scale) + l * r_max : nullptr;
  const AT* __restrict__ o = Has_out_scale ? static_cast<const AT*>(p.out_scale) + l * out : nullptr;
  const float scale = p.scales != nullptr ? p.scales[l] : p.scale;
#pragma unroll
  for (int i = 0; i < TM * TN / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int tt = idx / TN, nn = idx % TN;
    const int64_t t = toks[tt], n = n0 + nn;
    dys[tt][nn] = (t >= 0 && n < out) ? to_float(dy[t * out + n]) : 0.f;
  }
  for (int64_t r0 = 0; r0 < r; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kThreads) {
      const int tt = idx / RC, jj = idx % RC;
      const int64_t t = toks[tt], j = r0 + jj;
      float v = 0.f;
      if (t >= 0 && j < r) {
        v = p.hidden[t * r_max + j] * scale;
        if constexpr (Has_gate) v *= to_float(g[j]);
      }
      hs[tt][jj] = v;
    }
    for (int idx = tid; idx < TN * RC; idx += kThreads) {
      const int nn = idx / RC, jj = idx % RC;
      const int64_t n = n0 + nn, j = r0 + jj;
      float v = 0.f;
      if (n < out && j < r) {
        v = to_float(b[n * r_max + j]);
        if constexpr (Has_out_scale) v *= to_float(o[n]);
      }
      bs[nn][jj] = v;
    }
    __syncthreads();
    if (p.grad_z != nullptr) {
#pragma unroll
      for (int i = 0; i < NPT_H; ++i) {
        const int idx = tid + i * kThreads;
        const int tt = idx / RC, jj = idx % RC;
        if (r0 + jj >= r) continue;
        float sum = 0.f;
#pragma unroll 16
        for (int nn = 0; nn < TN; ++nn) sum += dys[tt][nn] * bs[nn][jj];
        const int64_t t = toks[tt], j = r0 + jj;
        if (t >= 0 && j < r) atomicAdd(p.grad_z + t * r_max + j, sum);
      }
    }
    if (p.grad_b != nullptr) {
#pragma unroll
      for (int i = 0; i < NPT_B; ++i) {
        const int idx = tid + i * kThreads;
        const int nn = idx / RC, jj = idx % RC;
        if (r0 + jj >= r) continue;
        float sum = 0.f;
#pragma unroll 16
        for (int tt = 0; tt < TM; ++tt) sum += dys[tt][nn] * hs[tt][jj];
        const int64_t n = n0 + nn, j = r0 + jj;
        if (n < out && j < r) atomicAdd(p.grad_b + (l * out + n) * r_max + j, sum);
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Backward, pass over x. Block: 64 tokens of one adapter × 64 input features; x staged once
// for grad_a, A staged per rank chunk for grad_x. With dropout each thread regenerates the
// bits of its two 8-column groups once, stages drop(x) for grad_a and keeps the bits in a
// register to mask its own grad_x.
template <typename T, typename AT, int RC, bool Is_dropout>
__global__ void __launch_bounds__(kThreads) grad_in_kernel(MultiLoraGradInParams p) {
  constexpr int TM = 64, TK = 64;
  constexpr int GROUPS = TM * TK / 8 / kThreads;  // 2
  constexpr int NPT_A = RC * TK / kThreads;
  static_assert(NPT_A >= 1, "rank chunk too small for the block");
  __shared__ float xs[TM][TK + 1];
  __shared__ float us[TM][RC + 1];
  __shared__ float as[RC][TK + 1];
  __shared__ int64_t toks[TM];
  int64_t l, pos0;
  int count;
  if (!find_tile<TM>(p.seg, blockIdx.x, l, pos0, count)) return;
  const int64_t r = adapter_rank(p.seg, l);
  if (r == 0) return;
  const int tid = threadIdx.x;
  const int64_t in = p.in_features, r_max = p.seg.r_max;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * TK;
  if (tid < TM) toks[tid] = tile_token(p.seg, pos0, tid, count);
  __syncthreads();
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const AT* __restrict__ a = static_cast<const AT*>(p.a) + l * r_max * in;
  T* __restrict__ dx = static_cast<T*>(p.grad_x);
  const uint64_t seed = Is_dropout ? load_dropout_seed(p.dropout) : 0ull;
  uint32_t keep[GROUPS];
  float dacc[GROUPS][8];
#pragma unroll
  for (int gi = 0; gi < GROUPS; ++gi) {
    const int gidx = tid + gi * kThreads;
    const int row = gidx >> 3, grp = gidx & 7;
    float v[8];
    keep[gi] = load_group8_dropped<Is_dropout>(x, in, toks[row], k0 + grp * 8, in, p.dropout, seed, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      xs[row][grp * 8 + e] = v[e];
      dacc[gi][e] = 0.f;
    }
  }
  for (int64_t r0 = 0; r0 < r; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kThreads) {
      const int tt = idx / RC, jj = idx % RC;
      const int64_t t = toks[tt], j = r0 + jj;
      us[tt][jj] = (t >= 0 && j < r) ? p.grad_u[t * r_max + j] : 0.f;
    }
    for (int idx = tid; idx < RC * TK; idx += kThreads) {
      const int jj = idx / TK, kk = idx % TK;
      const int64_t j = r0 + jj, k = k0 + kk;
      as[jj][kk] = (j < r && k < in) ? to_float(a[j * in + k]) : 0.f;
    }
    __syncthreads();
    if (dx != nullptr) {
#pragma unroll
      for (int gi = 0; gi < GROUPS; ++gi) {
        const int gidx = tid + gi * kThreads;
        const int row = gidx >> 3, grp = gidx & 7;
        const int jmax = (r - r0 < RC) ? static_cast<int>(r - r0) : RC;
        for (int jj = 0; jj < jmax; ++jj) {
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
        if (r0 + jj >= r) continue;
        float sum = 0.f;
#pragma unroll 16
        for (int tt = 0; tt < TM; ++tt) sum += us[tt][jj] * xs[tt][kk];
        const int64_t j = r0 + jj, k = k0 + kk;
        if (j < r && k < in) atomicAdd(p.grad_a + (l * r_max + j) * in + k, sum);
      }
    }
    __syncthreads();
  }
  if (dx == nullptr) return;
#pragma unroll
  for (int gi = 0; gi < GROUPS; ++gi) {
    const int gidx = tid + gi * kThreads;
    const int64_t t = toks[gidx >> 3];
    if (t < 0) continue;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t k = k0 + (gidx & 7) * 8 + e;
      if (k >= in) continue;
      float d = dacc[gi][e];
      if constexpr (Is_dropout) d = ((keep[gi] >> e) & 1u) ? d * p.dropout.keep_scale : 0.f;
      T* dst = dx + t * in + k;
      *dst = from_float<T>(to_float(*dst) + d);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launchers. Grids depend on shapes only (worst-case tile counts), never on the ids.

inline unsigned ceil_div_u(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// ran_tensor_cores (optional): whether the tensor-core kernel was the one taken (asked for
// with use_tensor_cores, and the types have it: fp16/bf16 x with adapters of the same type).
template <typename T, typename AT = T>
cudaError_t launch_shrink(MultiLoraShrinkParams p, cudaStream_t stream, bool* ran_tensor_cores = nullptr) {
  if (ran_tensor_cores != nullptr) *ran_tensor_cores = false;
  if constexpr (!std::is_same_v<T, float> && std::is_same_v<T, AT>) {
    if (p.use_tensor_cores) {
      if (ran_tensor_cores != nullptr) *ran_tensor_cores = true;
      return launch_shrink_tc<T>(p, stream);
    }
  }
  const int64_t T_ = p.seg.tokens;
  if (T_ == 0 || p.seg.num_adapters == 0 || p.in_features == 0) return cudaSuccess;
  constexpr int64_t kTM = 32, kKC = 64;
  const int64_t tiles = worst_case_tiles(T_, p.seg.num_adapters, kTM);
  // Split K until the grid has a few waves' worth of blocks (decode: few tiles).
  p.k_split = p.allow_k_split ? shrink_k_split(p.in_features, tiles, p.slices, kKC, 1024)
                              : ((p.in_features + kKC - 1) / kKC) * kKC;
  const int64_t splits = (p.in_features + p.k_split - 1) / p.k_split;
  if (tiles > 0x7fffffffLL || splits > 65535 || p.slices > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits), static_cast<unsigned>(p.slices));
  return LRK_RANK_CHUNK_SWITCH(p.seg.r_max, 64, RC, [&] {
    return LRK_BOOL_SWITCH(p.dropout.threshold != 0, Is_dropout, [&] {
      shrink_kernel<T, AT, RC, Is_dropout><<<grid, kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

template <typename T, typename AT = T>
cudaError_t launch_expand(const MultiLoraExpandParams& p, cudaStream_t stream, bool* ran_tensor_cores = nullptr) {
  if (ran_tensor_cores != nullptr) *ran_tensor_cores = false;
  if constexpr (!std::is_same_v<T, float> && std::is_same_v<T, AT>) {
    if (p.use_tensor_cores) {
      if (ran_tensor_cores != nullptr) *ran_tensor_cores = true;
      return launch_expand_tc<T>(p, stream);
    }
  }
  const int64_t T_ = p.seg.tokens;
  if (T_ == 0 || p.seg.num_adapters == 0 || p.out_total == 0) return cudaSuccess;
  int64_t col_tiles = 0;
  for (int64_t s = 0; s < p.slices; ++s) col_tiles += (p.slice_start[s + 1] - p.slice_start[s] + 127) / 128;
  if (col_tiles == 0) return cudaSuccess;
  const int64_t tiles = worst_case_tiles(T_, p.seg.num_adapters, 16);
  if (tiles > 0x7fffffffLL || col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_tiles));
  return LRK_RANK_CHUNK_SWITCH(p.seg.r_max, 32, RC, [&] {
    return LRK_BOOL_SWITCH(p.rank_scale != nullptr, Has_gate, [&] {
      return LRK_BOOL_SWITCH(p.out_scale != nullptr, Has_out_scale, [&] {
        expand_kernel<T, AT, RC, Has_gate, Has_out_scale><<<grid, kThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
    });
  });
}

template <typename T, typename AT = T>
cudaError_t launch_grad_out(const MultiLoraGradOutParams& p, cudaStream_t stream) {
  const int64_t T_ = p.seg.tokens;
  if (T_ == 0 || p.seg.num_adapters == 0 || p.out_features == 0) return cudaSuccess;
  const int64_t tiles = worst_case_tiles(T_, p.seg.num_adapters, 64);
  const int64_t col_tiles = (p.out_features + 63) / 64;
  if (tiles > 0x7fffffffLL || col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_tiles));
  return LRK_RANK_CHUNK_SWITCH(p.seg.r_max, 32, RC, [&] {
    return LRK_BOOL_SWITCH(p.rank_scale != nullptr, Has_gate, [&] {
      return LRK_BOOL_SWITCH(p.out_scale != nullptr, Has_out_scale, [&] {
        grad_out_kernel<T, AT, RC, Has_gate, Has_out_scale><<<grid, kThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
    });
  });
}

template <typename T, typename AT = T>
cudaError_t launch_grad_in(const MultiLoraGradInParams& p, cudaStream_t stream) {
  const int64_t T_ = p.seg.tokens;
  if (T_ == 0 || p.seg.num_adapters == 0 || p.in_features == 0) return cudaSuccess;
  const int64_t tiles = worst_case_tiles(T_, p.seg.num_adapters, 64);
  const int64_t k_tiles = (p.in_features + 63) / 64;
  if (tiles > 0x7fffffffLL || k_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(k_tiles));
  return LRK_RANK_CHUNK_SWITCH(p.seg.r_max, 32, RC, [&] {
    return LRK_BOOL_SWITCH(p.dropout.threshold != 0, Is_dropout, [&] {
      grad_in_kernel<T, AT, RC, Is_dropout><<<grid, kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace multi_lora
}  // namespace lrkernels
