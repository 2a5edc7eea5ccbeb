// Tensor-core shrink and expand for lora_linear: fp16/bf16 on sm_80+, WMMA 16×16×16 tiles
// with fp32 accumulation. The SIMT kernels of lora.cuh do two shared-memory loads per FMA;
// here a warp's 16×16×16 MMA replaces 4096 of them. Same math and the same dropout mask as
// the SIMT kernels, which stay the fp32 path and the reference. lora_linear has one adapter
// and no gathering, so a block's rows are simply 64 consecutive tokens (4 warps × 16).
//
// WMMA rules kept throughout: every fragment pointer is 32-byte aligned (tile rows are
// multiples of 16 bytes long and fragments start at multiples of 16 rows and 16 columns) and
// every ldm is a multiple of 16 bytes. Out-of-range rows, columns and rank lanes are staged
// as zeros, so tails and any rank need no special fragments.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "lrkernels/common/math.cuh"
#include "lrkernels/common/philox.h"
#include "lrkernels/common/wmma_tiles.cuh"
#include "lrkernels/lora.cuh"
#include "lrkernels/lora_params.h"

namespace lrkernels {
namespace lora {

constexpr int kTcThreads = 128;  // 4 warps, each owns 16 of the block's 64 tokens
constexpr int kTcTM = 64;        // tokens per block
constexpr int kTcKC = 64;        // shrink: input features staged per step
constexpr int kTcPad = 8;        // elements of row padding: keeps ldm a multiple of 16 bytes

// 8 consecutive elements of a row, as one 16-byte word (vector load when the group lies
// inside [0, end) and `vec` says rows and base are 16-byte aligned; zeros past the end).
template <typename T>
__device__ __forceinline__ uint4 load_group8(const T* __restrict__ row, int64_t col0, int64_t end, bool vec) {
  static_assert(sizeof(T) == 2, "8 elements of a 16-bit type per 16-byte word");
  uint4 raw;
  if (vec && col0 + 8 <= end) {
    raw = *reinterpret_cast<const uint4*>(row + col0);
  } else {
    T* v = reinterpret_cast<T*>(&raw);
    const T zero = from_float<T>(0.f);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = (col0 + e < end) ? row[col0 + e] : zero;
  }
  return raw;
}

// ---------------------------------------------------------------------------------------
// Shrink: hidden[t, j] = Σ_k drop(x)[t, k] A[j, k] for 64 tokens × RC rank lanes.
// x tiles are staged once per rank chunk with the dropout mask applied on the way into shared
// memory (one Philox draw per 8 columns, as in the SIMT kernel), so x is read once for
// r <= RC = 128. Blocks on grid.y split K (p.k_split columns each); with more than one
// split the partial sums meet in hidden (zeroed by the caller) through atomics.
template <typename T, int RC>
__global__ void __launch_bounds__(kTcThreads) shrink_tc_kernel(LoraShrinkParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int TM = kTcTM, KC = kTcKC, LDK = KC + kTcPad, LDC = RC + 4;
  constexpr int NF = RC / 16;
  constexpr int kStageBytes = (TM + RC) * LDK * static_cast<int>(sizeof(T));
  constexpr int kOutBytes = TM * LDC * static_cast<int>(sizeof(float));
  // The fp32 output tile reuses the staging buffers once the K loop is done.
  constexpr int kSmemBytes = kStageBytes > kOutBytes ? kStageBytes : kOutBytes;
  __shared__ __align__(32) unsigned char smem[kSmemBytes];
  T(*xs)[LDK] = reinterpret_cast<T(*)[LDK]>(smem);
  T(*as)[LDK] = reinterpret_cast<T(*)[LDK]>(smem + TM * LDK * sizeof(T));
  float(*cs)[LDC] = reinterpret_cast<float(*)[LDC]>(smem);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t in = p.in_features, rank = p.rank;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * p.k_split;
  const int64_t k_end = (p.k_split > 0 && k_begin + p.k_split < in) ? k_begin + p.k_split : in;
  const bool atomic_out = gridDim.y > 1;
  // Rows of x and A start 16-byte aligned when in % 8 == 0 and the bases are aligned.
  const bool vec_x = (in % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0);
  const bool vec_a = (in % 8 == 0) && (reinterpret_cast<uintptr_t>(a) % 16 == 0);
  const uint32_t threshold = p.dropout.threshold;
  const float keep_scale = p.dropout.keep_scale;
  const uint64_t seed = load_dropout_seed(p.dropout);
  const T zero = from_float<T>(0.f);
  for (int64_t r0 = 0; r0 < rank; r0 += RC) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += KC) {
      // x tile: TM rows × KC columns = TM * KC / 8 groups of 8 (k0 is a multiple of 8, so a
      // group is exactly the SIMT kernel's Philox group col >> 3).
#pragma unroll
      for (int i = 0; i < TM * KC / 8 / kTcThreads; ++i) {
        const int g = tid + i * kTcThreads;
        const int row = g / (KC / 8), grp = g % (KC / 8);
        const int64_t t = t0 + row, col0 = k0 + grp * 8;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (t < p.tokens && col0 < k_end) {
          raw = load_group8(x + t * in, col0, k_end, vec_x);
          if (threshold != 0) {
            const uint32_t keep = dropout_keep_bits(seed, t, col0 >> 3, threshold);
            T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = ((keep >> e) & 1u) ? from_float<T>(to_float(v[e]) * keep_scale) : zero;
          }
        }
        *reinterpret_cast<uint4*>(&xs[row][grp * 8]) = raw;
      }
      // A tile: RC rank lanes × KC columns.
#pragma unroll
      for (int i = 0; i < RC * KC / 8 / kTcThreads; ++i) {
        const int g = tid + i * kTcThreads;
        const int jj = g / (KC / 8), grp = g % (KC / 8);
        const int64_t j = r0 + jj, col0 = k0 + grp * 8;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (j < rank && col0 < k_end) raw = load_group8(a + j * in, col0, k_end, vec_a);
        *reinterpret_cast<uint4*>(&as[jj][grp * 8]) = raw;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> xf;
        wmma::load_matrix_sync(xf, &xs[warp * 16][kk], LDK);
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          if (r0 + f * 16 >= rank) break;  // lanes past the rank: zeros, skipped
          // B(k, n) = A[r0 + n, k]: A's rows read column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> af;
          wmma::load_matrix_sync(af, &as[f * 16][kk], LDK);
          wmma::mma_sync(acc[f], xf, af, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      if (r0 + f * 16 >= rank) break;
      wmma::store_matrix_sync(&cs[warp * 16][f * 16], acc[f], LDC, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = tid; idx < TM * RC; idx += kTcThreads) {
      const int row = idx / RC, jj = idx % RC;
      const int64_t t = t0 + row, j = r0 + jj;
      if (t < p.tokens && j < rank) {
        if (atomic_out) {
          atomicAdd(p.hidden + t * rank + j, cs[row][jj]);
        } else {
          p.hidden[t * rank + j] = cs[row][jj];
        }
      }
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

// ---------------------------------------------------------------------------------------
// Expand: y[t, n] += o[n] · Σ_j h[t, j] B[n, j], h = s · g ⊙ hidden, for 64 tokens × 64
// outputs, in place on y (read and written once). h is fp32; it enters the tensor cores as
// hi + lo (two fp16/bf16 terms, lo holding what hi rounded away), so the product keeps ~16
// mantissa bits of h at twice the (small, K = r) MMA work. RC: rank chunk, 16, 32 or 64.
template <typename T, int RC>
__global__ void __launch_bounds__(kTcThreads) expand_tc_kernel(LoraExpandParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  constexpr int TM = kTcTM, TN = 64, LDR = RC + kTcPad, LDC = TN + 4;
  constexpr int NF = TN / 16;
  constexpr int kTile = TM * LDR * static_cast<int>(sizeof(T));  // TN == TM: three equal tiles
  constexpr int kOutBytes = TM * LDC * static_cast<int>(sizeof(float));
  constexpr int kSmemBytes = 3 * kTile > kOutBytes ? 3 * kTile : kOutBytes;
  __shared__ __align__(32) unsigned char smem[kSmemBytes];
  T(*hs_hi)[LDR] = reinterpret_cast<T(*)[LDR]>(smem);
  T(*hs_lo)[LDR] = reinterpret_cast<T(*)[LDR]>(smem + kTile);
  T(*bs)[LDR] = reinterpret_cast<T(*)[LDR]>(smem + 2 * kTile);
  float(*cs)[LDC] = reinterpret_cast<float(*)[LDC]>(smem);
  const T* __restrict__ b = static_cast<const T*>(p.b);
  const T* __restrict__ g = static_cast<const T*>(p.rank_scale);
  const T* __restrict__ o = static_cast<const T*>(p.out_scale);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t rank = p.rank, out = p.out_features;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;
  const T zero = from_float<T>(0.f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);
  for (int64_t r0 = 0; r0 < rank; r0 += RC) {
    for (int idx = tid; idx < TM * RC; idx += kTcThreads) {
      const int row = idx / RC, jj = idx % RC;
      const int64_t t = t0 + row, j = r0 + jj;
      float v = 0.f;
      if (t < p.tokens && j < rank) {
        v = p.hidden[t * rank + j] * p.scale;
        if (g != nullptr) v *= to_float(g[j]);
      }
      split_hi_lo(v, hs_hi[row][jj], hs_lo[row][jj]);
    }
    for (int idx = tid; idx < TN * RC; idx += kTcThreads) {
      const int nn = idx / RC, jj = idx % RC;
      const int64_t n = n0 + nn, j = r0 + jj;
      bs[nn][jj] = (n < out && j < rank) ? b[n * rank + j] : zero;
    }
    __syncthreads();
    // B'(k, n) = B[n0 + n, r0 + k]; rank steps past the rank are zeros and skipped
    mma_hi_lo_chunk<T, RC>(acc, hs_hi, hs_lo, bs, warp, rank - r0);
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::store_matrix_sync(&cs[warp * 16][f * 16], acc[f], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = tid; idx < TM * TN; idx += kTcThreads) {
    const int row = idx / TN, nn = idx % TN;
    const int64_t t = t0 + row, n = n0 + nn;
    if (t < p.tokens && n < out) {
      const float on = (o != nullptr) ? to_float(o[n]) : 1.f;
      T* dst = y + t * out + n;
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

// ---------------------------------------------------------------------------------------
// Launchers. The binding decides whether to use the tensor cores; fp32 always runs SIMT.

// K columns per shrink block (a multiple of kTcKC), or 0 for all of them: splits K when the
// token tiles alone would leave most of the GPU idle (few tokens, wide layers), but never
// below 4 steps of kTcKC per block. Splitting makes the result depend on atomic order.
inline int64_t shrink_tc_k_split(int64_t tokens, int64_t in_features, int64_t target_blocks) {
  const int64_t tiles = (tokens + kTcTM - 1) / kTcTM;
  const int64_t k_steps = (in_features + kTcKC - 1) / kTcKC;
  if (tiles <= 0 || tiles >= target_blocks || k_steps < 8) return 0;
  int64_t splits = (target_blocks + tiles - 1) / tiles;
  if (splits > k_steps / 4) splits = k_steps / 4;
  if (splits <= 1) return 0;
  return ((k_steps + splits - 1) / splits) * kTcKC;
}

template <typename T>
cudaError_t launch_shrink_tc(const LoraShrinkParams& p, cudaStream_t stream) {
  static_assert(!std::is_same_v<T, float>, "the tensor-core shrink takes fp16/bf16");
  if (p.tokens == 0 || p.rank == 0) return cudaSuccess;
  if (p.k_split < 0 || (p.k_split % kTcKC) != 0) return cudaErrorInvalidValue;
  const int64_t splits =
      (p.k_split > 0 && p.in_features > 0) ? (p.in_features + p.k_split - 1) / p.k_split : 1;
  if (splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(ceil_div_u(p.tokens, kTcTM), static_cast<unsigned>(splits));
  if (p.rank <= 16) {
    shrink_tc_kernel<T, 16><<<grid, kTcThreads, 0, stream>>>(p);
  } else if (p.rank <= 32) {
    shrink_tc_kernel<T, 32><<<grid, kTcThreads, 0, stream>>>(p);
  } else if (p.rank <= 64) {
    shrink_tc_kernel<T, 64><<<grid, kTcThreads, 0, stream>>>(p);
  } else {
    shrink_tc_kernel<T, 128><<<grid, kTcThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_expand_tc(const LoraExpandParams& p, cudaStream_t stream) {
  static_assert(!std::is_same_v<T, float>, "the tensor-core expand takes fp16/bf16");
  if (p.tokens == 0 || p.out_features == 0 || p.rank == 0) return cudaSuccess;
  const dim3 grid(ceil_div_u(p.tokens, kTcTM), ceil_div_u(p.out_features, 64));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  if (p.rank <= 16) {
    expand_tc_kernel<T, 16><<<grid, kTcThreads, 0, stream>>>(p);
  } else if (p.rank <= 32) {
    expand_tc_kernel<T, 32><<<grid, kTcThreads, 0, stream>>>(p);
  } else {
    expand_tc_kernel<T, 64><<<grid, kTcThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// Tensor cores when asked for and the types have them (fp16/bf16 x with adapters of the same
// type: the WMMA tiles take no fp32 operand), else the SIMT kernels. `ran_tensor_cores`
// (optional) says which ran.
template <typename T, typename AT = T>
cudaError_t launch_shrink_on(const LoraShrinkParams& p, bool tensor_cores, cudaStream_t stream,
                             bool* ran_tensor_cores = nullptr) {
  if (ran_tensor_cores != nullptr) *ran_tensor_cores = false;
  if constexpr (!std::is_same_v<T, float> && std::is_same_v<T, AT>) {
    if (tensor_cores) {
      if (ran_tensor_cores != nullptr) *ran_tensor_cores = true;
      return launch_shrink_tc<T>(p, stream);
    }
  }
  return launch_shrink<T, AT>(p, stream);
}

template <typename T, typename AT = T>
cudaError_t launch_expand_on(const LoraExpandParams& p, bool tensor_cores, cudaStream_t stream,
                             bool* ran_tensor_cores = nullptr) {
  if (ran_tensor_cores != nullptr) *ran_tensor_cores = false;
  if constexpr (!std::is_same_v<T, float> && std::is_same_v<T, AT>) {
    if (tensor_cores) {
      if (ran_tensor_cores != nullptr) *ran_tensor_cores = true;
      return launch_expand_tc<T>(p, stream);
    }
  }
  return launch_expand<T, AT>(p, stream);
}

}  // namespace lora
}  // namespace lrkernels
