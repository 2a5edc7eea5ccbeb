// Bone / MiSS on CUDA: the backend of the compositions in miss_ops.h (the same code the CPU
// runs), with the hand-written kernels of include/lrkernels/miss.cuh for the balance chunk sum
// and its transpose (dropout fused, mask regenerated from the device-side seed) and for the W'
// chunks bat's GEMMs consume; the GEMMs are cuBLAS through ATen. float32, float16 and bfloat16
// x (adapter arithmetic in float32; M float32 or x's dtype); float64 is CPU-only. No host
// synchronisation: sizes come from shapes, the seed is read by the kernels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_dispatch.h"
#include "common/dropout.h"
#include "miss/miss_checks.h"
#include "miss/miss_ops.h"
#include "lrkernels/miss.cuh"

namespace lrkernels {
namespace {

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// The CUDA backend of miss_ops.h.
struct CudaMiss {
  // 64 MiB of W' per chunk: large enough that the chunked GEMMs keep cuBLAS at full speed
  // (thousands of output rows at LLaMA widths), small next to the activations of a step.
  static constexpr int64_t kChunkBytes = int64_t{64} << 20;
  // balance/mini as y = x Wᵀ + b + S M (the chunk sum is the only pass of its own; the adapter
  // GEMM is rank-r thin). bat always runs over W' chunks.
  static bool chunked_balance(const MissShapes& /*sh*/) { return false; }

  static at::Tensor chunk_sum(const at::Tensor& x2, int64_t r, const DropoutParams& d) {
    at::Tensor s = at::empty({x2.size(0), r}, x2.options().dtype(at::kFloat));
    LRK_DISPATCH_CUDA_FLOAT(x2.scalar_type(), "miss_linear", [&] {
      MissChunkSumParams<cuda_t> p;
      p.x = static_cast<const cuda_t*>(x2.data_ptr());
      p.s = s.data_ptr<float>();
      p.tokens = x2.size(0);
      p.in = x2.size(1);
      p.r = r;
      p.dropout = d;
      LRK_CUDA_CHECK_LAUNCH("miss_linear", "chunk_sum", miss::launch_chunk_sum(p, stream()));
    });
    return s;
  }

  static at::Tensor tiled_input_grad(const at::Tensor& g, int64_t in, const DropoutParams& d, at::ScalarType dt) {
    const at::Tensor gc = g.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({g.size(0), in}, g.options().dtype(dt));
    LRK_DISPATCH_CUDA_FLOAT(dt, "miss_linear_backward", [&] {
      MissTileParams<cuda_t> p;
      p.g = gc.data_ptr<float>();
      p.out = static_cast<cuda_t*>(out.data_ptr());
      p.tokens = g.size(0);
      p.in = in;
      p.r = g.size(1);
      p.dropout = d;
      LRK_CUDA_CHECK_LAUNCH("miss_linear_backward", "tile", miss::launch_tile(p, stream()));
    });
    return out;
  }

  // M as build_balance_kernel reads it: (r, cols) row-major, float32.
  static at::Tensor balance_table(const at::Tensor& macc) { return macc.to(at::kFloat).contiguous(); }

  static void build(const at::Tensor& weight, const at::Tensor& m, bool bat, int64_t r, int64_t cols_m, int64_t o0,
                    int64_t rows, int64_t c0, int64_t n, at::Tensor& buf) {
    TORCH_INTERNAL_ASSERT(weight.stride(1) == 1 && buf.is_contiguous() && m.is_contiguous() &&
                          m.scalar_type() == at::kFloat);
    LRK_DISPATCH_CUDA_FLOAT(weight.scalar_type(), bat ? "miss_bat_linear" : "miss_linear", [&] {
      MissBuildParams<cuda_t> p;
      p.w = static_cast<const cuda_t*>(weight.data_ptr());
      p.m = m.data_ptr<float>();
      p.buf = static_cast<cuda_t*>(buf.data_ptr());
      p.ldw = weight.stride(0);
      p.r = r;
      p.cols_m = cols_m;
      p.o0 = o0;
      p.rows = rows;
      p.c0 = c0;
      p.cols = n;
      LRK_CUDA_CHECK_LAUNCH(bat ? "miss_bat_linear" : "miss_linear", "build W'", miss::launch_build(p, bat, stream()));
    });
  }
  static void build_balance(const at::Tensor& weight, const at::Tensor& table, int64_t r, int64_t cols_m, int64_t o0,
                            int64_t rows, int64_t c0, int64_t n, at::Tensor& buf) {
    build(weight, table, false, r, cols_m, o0, rows, c0, n, buf);
  }
  // W'[o0 : o0 + rows, q0·r : (q0 + nq)·r]; m = M (n_out, r, r).
  static void build_bat(const at::Tensor& weight, const at::Tensor& m, int64_t r, int64_t o0, int64_t rows,
                        int64_t q0, int64_t nq, at::Tensor& buf) {
    build(weight, m, true, r, r, o0, rows, q0 * r, nq * r, buf);
  }
  // The CUDA kernels compute in float32; float64 stays on the CPU kernels.
  static void check_input(const char* op, const at::Tensor& x) {
    TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "lrkernels.", op,
                     ": the CUDA kernels take float32, float16 or bfloat16 x, got float64 (run float64 on CPU)");
  }
  // the W' builders index W with a unit column stride
  static at::Tensor prepare_weight(const at::Tensor& weight) { return weight.contiguous(); }
};

// x's device when it is a CUDA one; otherwise none, and the shared checks report the mixed devices.
std::optional<at::Device> device_of_cuda(const at::Tensor& x) {
  return x.is_cuda() ? std::optional<at::Device>(x.device()) : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> miss_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    const at::Tensor& miss_block, double dropout_p,
                                                    const std::optional<at::Tensor>& seed) {
  const c10::cuda::OptionalCUDAGuard guard(device_of_cuda(x));
  return miss_ops::linear_op<CudaMiss>(x, weight, bias, miss_block, dropout_p, seed);
}

miss_ops::Grads4 miss_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& miss_block, const at::Tensor& chunk_sum,
                                           double dropout_p, const std::optional<at::Tensor>& seed,
                                           std::array<bool, 4> mask) {
  const c10::cuda::OptionalCUDAGuard guard(device_of_cuda(x));
  return miss_ops::linear_backward_op<CudaMiss>(grad_out, x, weight, miss_block, chunk_sum, dropout_p, seed, mask);
}

at::Tensor miss_bat_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& miss_block) {
  const c10::cuda::OptionalCUDAGuard guard(device_of_cuda(x));
  return miss_ops::bat_linear_op<CudaMiss>(x, weight, bias, miss_block);
}

miss_ops::Grads4 miss_bat_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& weight, const at::Tensor& miss_block,
                                               std::array<bool, 4> mask) {
  const c10::cuda::OptionalCUDAGuard guard(device_of_cuda(x));
  return miss_ops::bat_linear_backward_op<CudaMiss>(grad_out, x, weight, miss_block, mask);
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("miss_linear", &miss_linear_cuda);
  m.impl("miss_linear_backward", &miss_linear_backward_cuda);
  m.impl("miss_bat_linear", &miss_bat_linear_cuda);
  m.impl("miss_bat_linear_backward", &miss_bat_linear_backward_cuda);
}

}  // namespace lrkernels
