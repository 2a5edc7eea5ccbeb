// dropout_mask on CUDA: the mask the fused kernels apply, materialised (tests, debugging).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "common/dropout.h"
#include "lrkernels/common/math.cuh"
#include "lrkernels/common/philox.h"

namespace lrkernels {
namespace {

template <typename T>
__global__ void dropout_mask_kernel(T* out, int64_t rows, int64_t cols, DropoutParams d) {
  const int64_t groups = (cols + 7) / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * groups) return;
  const int64_t r = i / groups, g = i % groups;
  const uint32_t bits = dropout_keep_bits(static_cast<uint64_t>(*d.seed), r, g, d.threshold);
  for (int e = 0; e < 8 && g * 8 + e < cols; ++e)
    out[r * cols + g * 8 + e] = from_float<T>(((bits >> e) & 1u) ? d.keep_scale : 0.f);
}

}  // namespace

at::Tensor dropout_mask_cuda(const at::Tensor& seed, int64_t rows, int64_t cols, double p, at::ScalarType dtype) {
  check_dropout_mask_args(rows, cols, dtype, seed);
  const c10::cuda::CUDAGuard guard(seed.device());
  auto out = at::empty({rows, cols}, seed.options().dtype(dtype));
  const DropoutParams d = make_dropout_params(p, seed, seed, "dropout_mask");
  if (d.threshold == 0 || out.numel() == 0) return out.fill_(1);
  const int64_t n = rows * ((cols + 7) / 8);
  LRK_DISPATCH_CUDA_FLOAT(dtype, "dropout_mask", [&] {
    dropout_mask_kernel<cuda_t><<<static_cast<unsigned>((n + 255) / 256), 256, 0,
                                  at::cuda::getCurrentCUDAStream()>>>(
        static_cast<cuda_t*>(out.data_ptr()), rows, cols, d);
    LRK_CUDA_CHECK_LAUNCH("dropout_mask", "mask", cudaGetLastError());
  });
  return out;
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) { m.impl("dropout_mask", &dropout_mask_cuda); }

}  // namespace lrkernels
