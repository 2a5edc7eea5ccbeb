// C³A frequency-domain kernels: the block contraction (forward and input gradient) and the
// kernel-gradient reduction over tokens. See c3a_params.h for the notation. The FFTs
// themselves run in cuFFT (c3a_fft.cuh); these kernels are the Σ over blocks in between,
// one complex multiply-accumulate per (token, block pair, frequency), in fp32.
//
// Threads walk frequencies fastest, so a warp reads consecutive complex values of one
// spectrum row (coalesced), and the small kernel spectrum K̂ (P·Q·F values) stays in cache.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lrkernels/c3a_params.h"
#include "lrkernels/common/cuda_check.cuh"

namespace lrkernels {
namespace c3a {

constexpr int kThreads = 256;
constexpr int kOutChunk = 8;     // output blocks per thread in the contraction
constexpr int kTokenGroup = 4;   // tokens per thread in the contraction
constexpr int kGradChunk = 4;    // P and Q blocks per thread in the kernel gradient
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float2 cmul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

// One thread per (group of TT tokens, frequency); a y-slice of the grid per chunk of OC output
// blocks. Each K̂ value a thread loads serves its TT tokens (the kernel spectrum is re-read
// from cache once per TT tokens, not per token), each input value its OC outputs.
template <int OC, int TT, bool Transposed>
__global__ void __launch_bounds__(kThreads) contract_kernel(C3AContractParams p) {
  const int64_t F = p.freqs;
  const int64_t groups = (p.tokens + TT - 1) / TT;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= groups * F) return;
  const int64_t g = idx / F, f = idx - g * F;
  const int64_t t0 = g * TT;
  const float2* __restrict__ in = reinterpret_cast<const float2*>(p.in);
  const float2* __restrict__ kf = reinterpret_cast<const float2*>(p.kernel_fft);
  const float2* __restrict__ bias = reinterpret_cast<const float2*>(p.bias_fft);
  float2* __restrict__ out = reinterpret_cast<float2*>(p.out);
  for (int64_t o0 = static_cast<int64_t>(blockIdx.y) * OC; o0 < p.n_out; o0 += static_cast<int64_t>(gridDim.y) * OC) {
    float2 acc[TT][OC];
#pragma unroll
    for (int r = 0; r < TT; ++r)
#pragma unroll
      for (int j = 0; j < OC; ++j) acc[r][j] = make_float2(0.f, 0.f);
    for (int64_t i = 0; i < p.n_in; ++i) {
      float2 k[OC];
#pragma unroll
      for (int j = 0; j < OC; ++j) {
        const int64_t o = o0 + j;
        k[j] = make_float2(0.f, 0.f);
        if (o < p.n_out) {
          if (Transposed) {
            k[j] = kf[(i * p.n_out + o) * F + f];  // K̂[p = i, q = o]
          } else {
            k[j] = kf[(o * p.n_in + i) * F + f];   // conj(K̂[p = o, q = i])
            k[j].y = -k[j].y;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < TT; ++r) {
        const int64_t t = t0 + r;
        if (t < p.tokens) {
          const float2 v = in[(t * p.n_in + i) * F + f];
#pragma unroll
          for (int j = 0; j < OC; ++j) {
            const float2 m = cmul(v, k[j]);
            acc[r][j].x += m.x;
            acc[r][j].y += m.y;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < TT; ++r) {
      const int64_t t = t0 + r;
      if (t >= p.tokens) continue;
#pragma unroll
      for (int j = 0; j < OC; ++j) {
        const int64_t o = o0 + j;
        if (o < p.n_out) {
          float2 v = make_float2(p.scale * acc[r][j].x, p.scale * acc[r][j].y);
          if (bias != nullptr) {
            const float2 bv = bias[o * F + f];
            v.x += p.bias_scale * bv.x;
            v.y += p.bias_scale * bv.y;
          }
          out[(t * p.n_out + o) * F + f] = v;
        }
      }
    }
  }
}

// One thread per (PC×QC tile of block pairs, frequency); the grid's y dimension splits the
// tokens, each slice summing its range in registers and adding it to the output atomically.
template <int PC, int QC>
__global__ void __launch_bounds__(kThreads) kernel_grad_kernel(C3AKernelGradParams p, int64_t tokens_per_slice) {
  const int64_t F = p.freqs;
  const int64_t n_pt = (p.n_out + PC - 1) / PC, n_qt = (p.n_in + QC - 1) / QC;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= n_pt * n_qt * F) return;
  const int64_t tile = idx / F, f = idx - tile * F;
  const int64_t p0 = (tile / n_qt) * PC, q0 = (tile % n_qt) * QC;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tokens_per_slice;
  const int64_t t1 = t0 + tokens_per_slice < p.tokens ? t0 + tokens_per_slice : p.tokens;
  const float2* __restrict__ g = reinterpret_cast<const float2*>(p.grad_fft);
  const float2* __restrict__ xf = reinterpret_cast<const float2*>(p.x_fft);
  float2 acc[PC][QC];
#pragma unroll
  for (int a = 0; a < PC; ++a)
#pragma unroll
    for (int c = 0; c < QC; ++c) acc[a][c] = make_float2(0.f, 0.f);
  for (int64_t t = t0; t < t1; ++t) {
    float2 gv[PC], xv[QC];
#pragma unroll
    for (int a = 0; a < PC; ++a) {
      const int64_t pp = p0 + a;
      gv[a] = pp < p.n_out ? g[(t * p.n_out + pp) * F + f] : make_float2(0.f, 0.f);
      gv[a].y = -gv[a].y;  // conj(dŷ)
    }
#pragma unroll
    for (int c = 0; c < QC; ++c) {
      const int64_t qq = q0 + c;
      xv[c] = qq < p.n_in ? xf[(t * p.n_in + qq) * F + f] : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int a = 0; a < PC; ++a)
#pragma unroll
      for (int c = 0; c < QC; ++c) {
        const float2 m = cmul(gv[a], xv[c]);
        acc[a][c].x += m.x;
        acc[a][c].y += m.y;
      }
  }
  if (t1 <= t0) return;
#pragma unroll
  for (int a = 0; a < PC; ++a)
#pragma unroll
    for (int c = 0; c < QC; ++c) {
      const int64_t pp = p0 + a, qq = q0 + c;
      if (pp < p.n_out && qq < p.n_in) {
        float* dst = p.grad_kernel_fft + 2 * ((pp * p.n_in + qq) * F + f);
        atomicAdd(dst, p.scale * acc[a][c].x);
        atomicAdd(dst + 1, p.scale * acc[a][c].y);
      }
    }
}

template <int OC, bool Transposed>
inline cudaError_t launch_contract_oc(const C3AContractParams& p, int64_t work, cudaStream_t stream) {
  const int64_t chunks = (p.n_out + OC - 1) / OC;
  const dim3 grid(static_cast<unsigned>((work + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(chunks, kMaxGridY)));
  contract_kernel<OC, kTokenGroup, Transposed><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Output blocks per thread: kOutChunk, or fewer when there are fewer outputs (b = out, or the
// input gradient of a layer with few input blocks), so no multiply is spent on absent ones.
template <bool Transposed>
inline cudaError_t launch_contract(const C3AContractParams& p, cudaStream_t stream) {
  const int64_t work = (p.tokens + kTokenGroup - 1) / kTokenGroup * p.freqs;
  if (work == 0 || p.n_out == 0) return cudaSuccess;
  if (p.n_out <= 1) return launch_contract_oc<1, Transposed>(p, work, stream);
  if (p.n_out <= 2) return launch_contract_oc<2, Transposed>(p, work, stream);
  if (p.n_out <= 4) return launch_contract_oc<4, Transposed>(p, work, stream);
  return launch_contract_oc<kOutChunk, Transposed>(p, work, stream);
}

// y-slices: enough blocks to fill the GPU (~1024), each slice at least 16 tokens.
inline cudaError_t launch_kernel_grad(const C3AKernelGradParams& p, cudaStream_t stream) {
  const int64_t n_pt = (p.n_out + kGradChunk - 1) / kGradChunk, n_qt = (p.n_in + kGradChunk - 1) / kGradChunk;
  const int64_t work = n_pt * n_qt * p.freqs;
  if (work == 0 || p.tokens == 0) return cudaSuccess;
  const int64_t blocks_x = (work + kThreads - 1) / kThreads;
  int64_t slices = std::max<int64_t>(1, 1024 / blocks_x);
  slices = std::min<int64_t>(slices, (p.tokens + 15) / 16);
  slices = std::max<int64_t>(1, std::min<int64_t>(slices, kMaxGridY));
  const int64_t per_slice = (p.tokens + slices - 1) / slices;
  slices = (p.tokens + per_slice - 1) / per_slice;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(slices));
  kernel_grad_kernel<kGradChunk, kGradChunk><<<grid, kThreads, 0, stream>>>(p, per_slice);
  return cudaGetLastError();
}

}  // namespace c3a
}  // namespace lrkernels
