// Sparse plus low-rank linear layer on CUDA (SLTrain's random support, LOST's columns support):
// the same ops, semantics and gradient dtypes as sparse_lowrank_cpu.cpp. y = s·(x Aᵀ) Bᵀ + b + x Sᵀ;
// the forward returns y and saves nothing, the backward recomputes s·x Aᵀ.
//
// Low-rank part and columns support: cuBLAS through ATen. The factors (and a columns support's
// values) are cast to x's dtype for the GEMMs, as autocast does; the GEMMs accumulate in float32
// and write float32 (at::mm with out_dtype for float16 / bfloat16), so y, dx and every weight
// gradient are rounded once, at the end. Columns support = index_select of the n channels + a
// GEMM (forward, dS), and index_add_ of dy V into dx.
// Random support: the hand-written kernels of include/lrkernels/sparse_lowrank.cuh on the
// packed compressed support (CSR for y += x Sᵀ and the SDDMM dS = dyᵀx on the support, CSC for
// dx += dy S). The SpMM adds the float32 low-rank part and writes the output dtype in one pass;
// the SDDMM is deterministic (per-chunk partial sums added in order, no atomics).
//
// No host synchronisation in the main ops: the support is not validated per call as on CPU (that
// would need a sync to raise); the kernels range-check every index and pointer they read and give
// NaN for a corrupted support. Plain int64 flat indices are refused on CUDA (check_sparse_lowrank_cuda),
// and a columns support's duplicates are not detected here (lrkernels.sparse_support rejects them;
// an out-of-range column trips index_select's device-side assert). sparse_support_compress on a
// CUDA tensor (built once per layer) compresses a CPU copy with the CPU kernel, which validates,
// and returns the packed support on the input's device: that one call synchronises.
// float32 / float16 / bfloat16 x; float64 is CPU-only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "lrkernels/sparse_lowrank.cuh"
#include "sparse_lowrank/sparse_lowrank_checks.h"

namespace lrkernels {
namespace {

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

std::optional<at::Device> device_of_cuda(const at::Tensor& x) {
  return x.is_cuda() ? std::optional<at::Device>(x.device()) : std::nullopt;
}

// a b in cuBLAS with a float32 result (float32 accumulation for every dtype).
at::Tensor mm32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

// out (T, rows) = base (T, rows, float32) + x S'ᵀ over one compression of the support: the CSR
// (rows = out, x = x) or the CSC (rows = in, x = dy). base may be out itself for float32.
void spmm(const char* op, const char* what, const at::Tensor& x2, const int32_t* ptr, const int32_t* idx,
          const int32_t* perm, const at::Tensor& vals32, const at::Tensor& base, at::Tensor& out2, int64_t nnz) {
  TORCH_INTERNAL_ASSERT(x2.is_contiguous() && base.is_contiguous() && out2.is_contiguous() &&
                        base.scalar_type() == at::kFloat && vals32.scalar_type() == at::kFloat);
  LRK_DISPATCH_CUDA_FLOAT(x2.scalar_type(), op, [&] {
    SparseSpmmParams<cuda_t> p;
    p.x = static_cast<const cuda_t*>(x2.data_ptr());
    p.ptr = ptr;
    p.idx = idx;
    p.perm = perm;
    p.vals = nnz > 0 ? vals32.data_ptr<float>() : nullptr;
    p.base = base.data_ptr<float>();
    p.out = static_cast<cuda_t*>(out2.data_ptr());
    p.tokens = x2.size(0);
    p.rows = out2.size(1);
    p.cols = x2.size(1);
    p.nnz = nnz;
    LRK_CUDA_CHECK_LAUNCH(op, what, sparse_lowrank::launch_spmm(p, stream()));
  });
}

}  // namespace

at::Tensor sparse_support_compress_cuda(const at::Tensor& indices, int64_t out_features, int64_t in_features) {
  static const auto cpu_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("lrkernels::sparse_support_compress", "")
                                 .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return cpu_op.call(indices.cpu(), out_features, in_features).to(indices.device());
}

at::Tensor sparse_lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                      const at::Tensor& sparse_values, const at::Tensor& sparse_support,
                                      const std::optional<at::Tensor>& bias, double scale) {
  const char* op = "sparse_lowrank_linear";
  const c10::cuda::OptionalCUDAGuard guard(device_of_cuda(x));
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const SparseLowRankShapes sh =
      check_sparse_lowrank_args(op, x, lora_a, lora_b, sparse_values, sparse_support, bias, scale);
  check_sparse_lowrank_cuda(op, x, sh);
  const auto xdt = x.scalar_type();
  const bool f32 = xdt == at::kFloat, has_bias = bias.has_value() && bias->defined();
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  // y in x's leading shape, filled through a 2-D view (the op returns a tensor of its own)
  const at::Tensor y = at::empty(with_last_dim(x, sh.out_features), x.options());
  at::Tensor y2 = y.view({sh.tokens, sh.out_features});
  // the float32 accumulator: y itself for float32 x
  at::Tensor acc = f32 ? y2 : at::empty({sh.tokens, sh.out_features}, x.options().dtype(at::kFloat));
  const at::Tensor hidden = mm32(x2, lora_a.to(at::kFloat).mul(scale).to(xdt).t());  // s·x Aᵀ, float32, transient
  const at::Tensor b32 = lora_b.to(at::kFloat);
  if (has_bias) at::addmm_out(acc, bias->to(at::kFloat), hidden, b32.t());
  else at::mm_out(acc, hidden, b32.t());
  if (sh.kind == SupportKind::kColumns) {
    if (sh.nnz > 0) acc.add_(mm32(x2.index_select(1, sparse_support), sparse_values.to(xdt).t()));
    if (!f32) y2.copy_(acc);
  } else {
    const at::Tensor packed = sparse_support.contiguous();
    const SparseSupportView sv = support_view(packed, sh.out_features, sh.in_features, sh.nnz);
    const at::Tensor vals32 = sparse_values.to(at::kFloat).contiguous();
    spmm(op, "SpMM (CSR)", x2, sv.row_ptr, sv.csr_col, sv.csr_perm, vals32, acc, y2, sh.nnz);
  }
  return y;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
sparse_lowrank_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, const at::Tensor& sparse_values,
                                    const at::Tensor& sparse_support, double scale, std::array<bool, 5> mask) {
  const char* op = "sparse_lowrank_linear_backward";
  const c10::cuda::OptionalCUDAGuard guard(device_of_cuda(x));
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const SparseLowRankShapes sh =
      check_sparse_lowrank_args(op, x, lora_a, lora_b, sparse_values, sparse_support, std::nullopt, scale);
  check_sparse_lowrank_grad(op, grad_out, x, sh);
  check_sparse_lowrank_cuda(op, x, sh);
  const auto [want_x, want_a, want_b, want_v, want_bias] = mask;
  const auto xdt = x.scalar_type();
  const bool f32 = xdt == at::kFloat;
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor x2 =
      (want_a || want_b || want_v) ? x.reshape({sh.tokens, sh.in_features}).contiguous() : at::Tensor();
  const bool random = sh.kind != SupportKind::kColumns;
  at::Tensor packed;
  SparseSupportView sv{};
  if (random && (want_x || want_v)) {
    packed = sparse_support.contiguous();
    sv = support_view(packed, sh.out_features, sh.in_features, sh.nnz);
  }
  std::optional<at::Tensor> gx, ga, gb, gv, gbias;
  // g = s·dy B (what reaches s·x Aᵀ): dA = gᵀ x, dx = g A + dy S
  if (want_x || want_a) {
    const at::Tensor g = mm32(dy2, lora_b.to(at::kFloat).mul(scale).to(xdt)).to(xdt);  // (T, r)
    if (want_a) ga = mm32(g.t(), x2).to(lora_a.scalar_type());
    if (want_x) {
      at::Tensor gx_full = at::empty(x.sizes(), x.options());
      at::Tensor gx2 = gx_full.view({sh.tokens, sh.in_features});
      at::Tensor acc = f32 ? gx2 : at::empty({sh.tokens, sh.in_features}, x.options().dtype(at::kFloat));
      if (f32) at::mm_out(acc, g, lora_a.to(xdt));
      else acc.copy_(mm32(g, lora_a.to(xdt)));
      if (random) {
        const at::Tensor vals32 = sparse_values.to(at::kFloat).contiguous();
        spmm(op, "SpMM (CSC)", dy2, sv.col_ptr, sv.csc_row, sv.csc_perm, vals32, acc, gx2, sh.nnz);
      } else {
        if (sh.nnz > 0) acc.index_add_(1, sparse_support, mm32(dy2, sparse_values.to(xdt)));
        if (!f32) gx2.copy_(acc);
      }
      gx = gx_full;
    }
  }
  // dB = dyᵀ h with h = s·x Aᵀ recomputed
  if (want_b) {
    const at::Tensor h = mm32(x2, lora_a.to(at::kFloat).mul(scale).to(xdt).t()).to(xdt);  // (T, r)
    gb = mm32(dy2.t(), h).to(lora_b.scalar_type());
  }
  // dS = dyᵀ x on the support
  if (want_v) {
    if (random) {
      at::Tensor dv = at::full({sh.nnz}, NAN, x.options().dtype(at::kFloat));  // every entry is written
      at::Tensor partial;
      LRK_DISPATCH_CUDA_FLOAT(xdt, op, [&] {
        SparseSddmmParams<cuda_t> p;
        p.dy = static_cast<const cuda_t*>(dy2.data_ptr());
        p.x = static_cast<const cuda_t*>(x2.data_ptr());
        p.row_ptr = sv.row_ptr;
        p.csr_col = sv.csr_col;
        p.csr_perm = sv.csr_perm;
        p.dv = dv.data_ptr<float>();
        p.tokens = sh.tokens;
        p.out = sh.out_features;
        p.in = sh.in_features;
        p.nnz = sh.nnz;
        sparse_lowrank::plan_sddmm(p);
        if (p.chunks > 1) {
          partial = at::empty({p.chunks * sh.nnz}, dv.options());
          p.partial = partial.data_ptr<float>();
        }
        LRK_CUDA_CHECK_LAUNCH(op, "SDDMM", sparse_lowrank::launch_sddmm(p, stream()));
      });
      gv = dv.to(sparse_values.scalar_type());
    } else {
      gv = mm32(dy2.t(), x2.index_select(1, sparse_support)).to(sparse_values.scalar_type());
    }
  }
  if (want_bias) gbias = dy2.sum(0, /*keepdim=*/false, at::kFloat);
  return {gx, ga, gb, gv, gbias};
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("sparse_support_compress", &sparse_support_compress_cuda);
  m.impl("sparse_lowrank_linear", &sparse_lowrank_linear_cuda);
  m.impl("sparse_lowrank_linear_backward", &sparse_lowrank_linear_backward_cuda);
}

}  // namespace lrkernels
