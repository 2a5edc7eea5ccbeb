// GaLore / Fira step kernels: the low-rank Adam moment update and Fira's scaled residual
// pass. Both are elementwise and memory-bound; they are written plainly (grid-stride loops,
// fp32 arithmetic, one element per iteration) so that they are easy to check. The
// back-projection GEMM is cuBLAS (see csrc/galore/galore_cuda.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lrkernels/common/cuda_check.cuh"
#include "lrkernels/common/math.cuh"
#include "lrkernels/galore_params.h"

namespace lrkernels {
namespace galore {

constexpr int kThreads = 256;

inline unsigned int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  // Grid-stride loops below cover anything past this cap.
  return static_cast<unsigned int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

// MomentT: float or __nv_bfloat16; GradT: float, __half or __nv_bfloat16.
template <typename MomentT, typename GradT>
__global__ void __launch_bounds__(kThreads) moments_kernel(GaloreMomentsParams p) {
  MomentT* __restrict__ m = static_cast<MomentT*>(p.exp_avg);
  MomentT* __restrict__ v = static_cast<MomentT*>(p.exp_avg_sq);
  const GradT* __restrict__ g = static_cast<const GradT*>(p.grad);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    const float gi = to_float(g[i]);
    const float mi = p.beta1 * to_float(m[i]) + (1.f - p.beta1) * gi;
    const float vi = p.beta2 * to_float(v[i]) + (1.f - p.beta2) * gi * gi;
    m[i] = from_float<MomentT>(mi);
    v[i] = from_float<MomentT>(vi);
    // N from the moments as stored, so a bf16-state step equals the next step's view of it.
    p.update[i] = to_float(from_float<MomentT>(mi)) / (sqrtf(to_float(from_float<MomentT>(vi))) + p.eps);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) residual_kernel(GaloreResidualParams p) {
  T* __restrict__ w = static_cast<T*>(p.weight);
  const T* __restrict__ g = static_cast<const T*>(p.grad);
  const int64_t n = p.rows * p.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float s = p.scale[p.row_scale ? i / p.cols : i % p.cols];
    w[i] = from_float<T>(p.beta * to_float(w[i]) + p.gamma * s * to_float(g[i]));
  }
}

template <typename MomentT, typename GradT>
cudaError_t launch_moments(const GaloreMomentsParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  moments_kernel<MomentT, GradT><<<grid_for(p.numel), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_residual(const GaloreResidualParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  residual_kernel<T><<<grid_for(p.rows * p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace galore
}  // namespace lrkernels
