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

// Rows over grid.y, columns over grid.x (both grid-stride), so no per-element 64-bit division
// to find an element's row or column.
template <typename T>
__global__ void __launch_bounds__(kThreads) residual_kernel(GaloreResidualParams p) {
  T* __restrict__ w = static_cast<T*>(p.weight);
  const T* __restrict__ g = static_cast<const T*>(p.grad);
  const int64_t col_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const float rs = p.row_scale ? p.scale[r] : 0.f;
    T* __restrict__ wr = w + r * p.cols;
    const T* __restrict__ gr = g + r * p.cols;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < p.cols; c += col_stride) {
      const float s = p.row_scale ? rs : p.scale[c];
      wr[c] = from_float<T>(p.beta * to_float(wr[c]) + p.gamma * s * to_float(gr[c]));
    }
  }
}

// float64 (moments, gradient and N all double; reference runs and tests): the same update in
// double arithmetic, as the CPU kernel does for float64.
__global__ void __launch_bounds__(kThreads) moments_kernel_f64(double* __restrict__ m, double* __restrict__ v,
                                                               const double* __restrict__ g, double* __restrict__ u,
                                                               int64_t numel, double beta1, double beta2, double eps) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const double gi = g[i];
    const double mi = beta1 * m[i] + (1.0 - beta1) * gi;
    const double vi = beta2 * v[i] + (1.0 - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    u[i] = mi / (sqrt(vi) + eps);
  }
}

// float64 weight and gradient: W ← β·W + γ·(G ⊙ s) in double, rows over grid.y as above.
__global__ void __launch_bounds__(kThreads) residual_kernel_f64(double* __restrict__ w, const double* __restrict__ g,
                                                                const double* __restrict__ scale, int64_t rows,
                                                                int64_t cols, bool row_scale, double beta,
                                                                double gamma) {
  const int64_t col_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const double rs = row_scale ? scale[r] : 0.0;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += col_stride) {
      const int64_t i = r * cols + c;
      w[i] = beta * w[i] + gamma * (row_scale ? rs : scale[c]) * g[i];
    }
  }
}

inline dim3 residual_grid(int64_t rows, int64_t cols) {
  const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned int>(col_blocks < 1024 ? col_blocks : 1024),
              static_cast<unsigned int>(rows < 65535 ? rows : 65535));
}

inline cudaError_t launch_moments_f64(double* m, double* v, const double* g, double* u, int64_t numel, double beta1,
                                      double beta2, double eps, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  moments_kernel_f64<<<grid_for(numel), kThreads, 0, stream>>>(m, v, g, u, numel, beta1, beta2, eps);
  return cudaGetLastError();
}

inline cudaError_t launch_residual_f64(double* w, const double* g, const double* scale, int64_t rows, int64_t cols,
                                       bool row_scale, double beta, double gamma, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  residual_kernel_f64<<<residual_grid(rows, cols), kThreads, 0, stream>>>(w, g, scale, rows, cols, row_scale, beta,
                                                                          gamma);
  return cudaGetLastError();
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
  residual_kernel<T><<<residual_grid(p.rows, p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace galore
}  // namespace lrkernels
