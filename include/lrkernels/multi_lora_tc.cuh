// Tensor-core shrink and expand for the prefill case (many tokens per adapter), fp16/bf16 on
// sm_80+, with WMMA 16×16×16 tiles and fp32 accumulation. Same block-to-work mapping as the
// SIMT kernels (multi_lora_tiles.h): a block takes 64 tokens of one adapter and gathers their
// rows into shared memory, so the tensor cores see full 16-row tiles however the tokens are
// ordered in the batch. Used only when the binding asks for it (use_tensor_cores in the
// params); the SIMT kernels remain the reference. The same compile-time options as the SIMT
// kernels: Is_dropout in the shrink (x staged as drop(x), rounded to T as the MMA operand),
// Has_gate / Has_out_scale in the expand.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "lrkernels/common/dropout.cuh"
#include "lrkernels/common/macros.h"
#include "lrkernels/common/math.cuh"
#include "lrkernels/common/wmma_tiles.cuh"
#include "lrkernels/multi_lora_params.h"
#include "lrkernels/multi_lora_tiles.h"

namespace lrkernels {
namespace multi_lora {

constexpr int kTcThreads = 128;  // 4 warps, each owns 16 of the block's 64 tokens
constexpr int kTcTM = 64, kTcKC = 32, kTcPad = 8;

// RC: rank chunk (16, 32 or 64 lanes = RC / 16 accumulator fragments per warp). K ranges
// start at multiples of KC, so x is staged in 8-column groups, one Philox draw each.
template <typename T, int RC, bool Is_dropout>
__global__ void __launch_bounds__(kTcThreads) shrink_tc_kernel(MultiLoraShrinkParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int TM = kTcTM, KC = kTcKC, LD = KC + kTcPad;  // LD: a multiple of 8 elements (WMMA rule)
  constexpr int NF = RC / 16;
  // 32-byte alignment for every fragment pointer: rows are 80 bytes, fragments start at
  // multiples of 16 rows (1280 bytes) and 16 columns (32 bytes).
  __shared__ __align__(32) T xs[TM][LD];
  __shared__ __align__(32) T as[RC][LD];
  __shared__ __align__(32) float cs[TM][RC + 4];
  __shared__ int64_t toks[TM];
  int64_t l, pos0;
  int count;
  if (!find_tile<TM>(p.seg, blockIdx.x, l, pos0, count)) return;
  const int64_t r = adapter_rank(p.seg, l);
  if (r == 0) return;
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t s = blockIdx.z, in = p.in_features, r_max = p.seg.r_max;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * p.k_split;
  const int64_t k_end = (k_begin + p.k_split < in) ? k_begin + p.k_split : in;
  if (tid < TM) toks[tid] = tile_token(p.seg, pos0, tid, count);
  __syncthreads();
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ a = static_cast<const T*>(p.a) + (s * p.seg.num_adapters + l) * r_max * in;
  float* __restrict__ hidden = p.hidden + s * p.seg.tokens * r_max;
  const T zero = from_float<T>(0.f);
  const uint64_t seed = Is_dropout ? load_dropout_seed(p.dropout) : 0ull;
  for (int64_t r0 = 0; r0 < r; r0 += RC) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += KC) {
      if constexpr (Is_dropout) {
        for (int gi = tid; gi < TM * KC / 8; gi += kTcThreads) {
          const int row = gi / (KC / 8), grp = gi % (KC / 8);
          float v[8];
          load_group8_dropped<true>(x, in, toks[row], k0 + grp * 8, k_end, p.dropout, seed, v);
#pragma unroll
          for (int e = 0; e < 8; ++e) xs[row][grp * 8 + e] = from_float<T>(v[e]);
        }
      } else {
        for (int idx = tid; idx < TM * KC; idx += kTcThreads) {
          const int row = idx / KC, kk = idx % KC;
          const int64_t t = toks[row], k = k0 + kk;
          xs[row][kk] = (t >= 0 && k < k_end) ? x[t * in + k] : zero;
        }
      }
      for (int idx = tid; idx < RC * KC; idx += kTcThreads) {
        const int jj = idx / KC, kk = idx % KC;
        const int64_t j = r0 + jj, k = k0 + kk;
        as[jj][kk] = (j < r && k < k_end) ? a[j * in + k] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::load_matrix_sync(af, &xs[warp * 16][kk], LD);
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          if (r0 + f * 16 >= r) break;  // fragments past this adapter's rank: no work
          // B(k, n) = A[n, k]: A's rows read column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
          wmma::load_matrix_sync(bf, &as[f * 16][kk], LD);
          wmma::mma_sync(acc[f], af, bf, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::store_matrix_sync(&cs[warp * 16][f * 16], acc[f], RC + 4, wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < TM * RC; idx += kTcThreads) {
      const int row = idx / RC, jj = idx % RC;
      const int64_t t = toks[row], j = r0 + jj;
      if (t >= 0 && j < r) atomicAdd(hidden + t * r_max + j, cs[row][jj]);
    }
    __syncthreads();
  }
#else
  // Compiled below sm_80: no WMMA bf16 here, so no body. The host never launches this image
  // (it checks the loaded image's arch, common/kernel_select.h); if it ever did, trap rather
  // than return with the output unwritten.
  __trap();
#endif
}

// Expand: y[t, n] += o[a_t, n] · Σ_j (s · g[a_t, j] · hidden[t, j]) B[a_t, n, j] for a
// 64-token × 64-column tile.
// hidden is fp32; it enters the tensor cores as a sum of two fp16/bf16 terms (hi + lo, the
// second holding what the first rounded away), so the product keeps ~16 mantissa bits of
// hidden rather than 8 or 11, at twice the (small, K = r) MMA work. RC: rank chunk, 16 or 32.
template <typename T, int RC, bool Has_gate, bool Has_out_scale>
__global__ void __launch_bounds__(kTcThreads) expand_tc_kernel(MultiLoraExpandParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int TM = 64, TN = 64, LD = RC + kTcPad;  // LD: a multiple of 8 elements (WMMA rule)
  constexpr int NF = TN / 16;
  __shared__ __align__(32) T hs_hi[TM][LD];
  __shared__ __align__(32) T hs_lo[TM][LD];
  __shared__ __align__(32) T bs[TN][LD];
  __shared__ __align__(32) float cs[TM][TN + 4];
  __shared__ int64_t toks[TM];
  int64_t l, pos0;
  int count;
  if (!find_tile<TM>(p.seg, blockIdx.x, l, pos0, count)) return;
  const int64_t r = adapter_rank(p.seg, l);
  if (r == 0) return;
  int64_t s, n0, n_end;
  if (!find_column_tile<TN>(p.slice_start, p.slices, blockIdx.y, s, n0, n_end)) return;
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t r_max = p.seg.r_max;
  if (tid < TM) toks[tid] = tile_token(p.seg, pos0, tid, count);
  __syncthreads();
  const T* __restrict__ b = static_cast<const T*>(p.b) + l * p.out_total * r_max;
  const T* __restrict__ g = Has_gate ? static_cast<const T*>(p.rank_scale) + l * r_max : nullptr;
  const T* __restrict__ o = Has_out_scale ? static_cast<const T*>(p.out_scale) + l * p.out_total : nullptr;
  const float* __restrict__ hidden = p.hidden + s * p.seg.tokens * r_max;
  const float scale = p.scales != nullptr ? p.scales[l] : p.scale;
  const T zero = from_float<T>(0.f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
  for (int64_t r0 = 0; r0 < r; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kTcThreads) {
      const int row = idx / RC, jj = idx % RC;
      const int64_t t = toks[row], j = r0 + jj;
      float v = 0.f;
      if (t >= 0 && j < r) {
        v = hidden[t * r_max + j] * scale;
        if constexpr (Has_gate) v *= to_float(g[j]);
      }
      split_hi_lo(v, hs_hi[row][jj], hs_lo[row][jj]);
    }
    for (int idx = tid; idx < TN * RC; idx += kTcThreads) {
      const int nn = idx / RC, jj = idx % RC;
      const int64_t n = n0 + nn, j = r0 + jj;
      bs[nn][jj] = (n < n_end && j < r) ? b[n * r_max + j] : zero;
    }
    __syncthreads();
    // B(k, n) = B[n0 + n, r0 + k]; steps past this adapter's rank are zeros and skipped
    mma_hi_lo_chunk<T, RC>(acc, hs_hi, hs_lo, bs, warp, r - r0);
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::store_matrix_sync(&cs[warp * 16][f * 16], acc[f], TN + 4, wmma::mem_row_major);
  __syncthreads();
  T* __restrict__ y = static_cast<T*>(p.y);
  for (int idx = tid; idx < TM * TN; idx += kTcThreads) {
    const int row = idx / TN, nn = idx % TN;
    const int64_t t = toks[row], n = n0 + nn;
    if (t >= 0 && n < n_end) {
      float on = 1.f;
      if constexpr (Has_out_scale) on = to_float(o[n]);
      T* dst = y + t * p.ldy + n;
      *dst = from_float<T>(to_float(*dst) + on * cs[row][nn]);
    }
  }
#else
  // Compiled below sm_80: no WMMA bf16 here, so no body. The host never launches this image
  // (it checks the loaded image's arch, common/kernel_select.h); if it ever did, trap rather
  // than return with the output unwritten.
  __trap();
#endif
}

template <typename T>
cudaError_t launch_expand_tc(const MultiLoraExpandParams& p, cudaStream_t stream) {
  const int64_t T_ = p.seg.tokens;
  if (T_ == 0 || p.seg.num_adapters == 0 || p.out_total == 0) return cudaSuccess;
  int64_t col_tiles = 0;
  for (int64_t s = 0; s < p.slices; ++s) col_tiles += (p.slice_start[s + 1] - p.slice_start[s] + 63) / 64;
  if (col_tiles == 0) return cudaSuccess;
  const int64_t tiles = worst_case_tiles(T_, p.seg.num_adapters, kTcTM);
  if (tiles > 0x7fffffffLL || col_tiles > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_tiles));
  return LRK_BOOL_SWITCH(p.rank_scale != nullptr, Has_gate, [&] {
    return LRK_BOOL_SWITCH(p.out_scale != nullptr, Has_out_scale, [&] {
      if (p.seg.r_max <= 16) {
        expand_tc_kernel<T, 16, Has_gate, Has_out_scale><<<grid, kTcThreads, 0, stream>>>(p);
      } else {
        expand_tc_kernel<T, 32, Has_gate, Has_out_scale><<<grid, kTcThreads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    });
  });
}

template <typename T>
cudaError_t launch_shrink_tc(MultiLoraShrinkParams p, cudaStream_t stream) {
  const int64_t T_ = p.seg.tokens;
  if (T_ == 0 || p.seg.num_adapters == 0 || p.in_features == 0) return cudaSuccess;
  const int64_t tiles = worst_case_tiles(T_, p.seg.num_adapters, kTcTM);
  p.k_split = p.allow_k_split ? shrink_k_split(p.in_features, tiles, p.slices, kTcKC, 1024)
                              : ((p.in_features + kTcKC - 1) / kTcKC) * kTcKC;
  const int64_t splits = (p.in_features + p.k_split - 1) / p.k_split;
  if (tiles > 0x7fffffffLL || splits > 65535 || p.slices > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits), static_cast<unsigned>(p.slices));
  return LRK_BOOL_SWITCH(p.dropout.threshold != 0, Is_dropout, [&] {
    if (p.seg.r_max <= 16) {
      shrink_tc_kernel<T, 16, Is_dropout><<<grid, kTcThreads, 0, stream>>>(p);
    } else if (p.seg.r_max <= 32) {
      shrink_tc_kernel<T, 32, Is_dropout><<<grid, kTcThreads, 0, stream>>>(p);
    } else {
      shrink_tc_kernel<T, 64, Is_dropout><<<grid, kTcThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace multi_lora
}  // namespace lrkernels
