// lora_linear on CUDA: base GEMMs in cuBLAS (through ATen), the low-rank path in the
// multi-LoRA kernels (include/lrkernels/multi_lora.cuh SIMT, multi_lora_tc.cuh tensor cores:
// forward shrink and expand for fp16/bf16; lrkernels.set_cuda_kernels chooses, the launch
// counters of the lora_linear family say which ran) as their one-adapter case: the identity
// grouping (null token_order / adapter_offsets: adapter 0 owns tokens 0..T-1 in order, so
// nothing is built on the device and no host sync is needed), rank r = r_max, the scale a
// scalar field, rank_scale (r,) and out_scale (out,) as the (1, r) and (1, out) gains.
// Dropout, gates and output scales are the kernels' compile-time options. Adapter tensors may
// be float32 on an fp16/bf16 x (PEFT's default): the kernels read them as fp32, outputs have
// x's dtype, each gradient its tensor's dtype. No host synchronisation: the dropout seed is
// read by the kernels from device memory, grids depend on shapes only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/cuda_dispatch.h"
#include "common/dropout.h"
#include "lora/lora_checks.h"
#include "lrkernels/multi_lora.cuh"
#include "multi_lora/lora_kernels_cuda.h"

namespace lrkernels {
namespace {

at::Tensor as_adapter(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// The tensor-core shrink and expand pay off once their 64-token tiles are mostly full: at
// least 64 tokens (kernel_select.h has the rest of the rule: fp16/bf16 operands throughout and
// an sm_80+ image on this GPU; lrkernels.set_cuda_kernels overrides). Shapes, the setting and
// the cached image arch only: no host sync.
bool lora_on_tensor_cores(const at::Tensor& x, at::ScalarType adapter_dtype, int64_t tokens, const char* op) {
  static KernelImageArch image(reinterpret_cast<const void*>(&multi_lora::shrink_tc_kernel<__half, 16, false>));
  const bool tc_dtypes = is_low_precision(x.scalar_type()) && adapter_dtype == x.scalar_type();
  return use_tensor_cores(CudaFamily::kLoraLinear, image, tc_dtypes, tokens >= multi_lora::kTcTM, op);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                    const at::Tensor& lora_b, double scale,
                                                    const std::optional<at::Tensor>& rank_scale,
                                                    const std::optional<at::Tensor>& out_scale, double dropout_p,
                                                    const std::optional<at::Tensor>& seed) {
  const char* op = "lora_linear";
  // Nested ATen calls below run beneath autograd: this kernel is the autograd-less level.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LoraShapes sh = check_lora_args(op, x, weight, bias, lora_a, lora_b, scale, rank_scale, out_scale);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  at::Tensor y = opt_ptr(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const at::ScalarType adt = lora_adapter_dtype(x, {&lora_a, &lora_b, opt_ptr(rank_scale), opt_ptr(out_scale)});
  const bool tensor_cores = lora_on_tensor_cores(x, adt, sh.tokens, op);
  // The shrink accumulates into hidden with atomics (zeros first); few tokens and wide layers
  // split K over blocks, whose partial sums meet there in a varying order, so deterministic
  // mode does not split (then each element gets exactly one add).
  at::Tensor hidden = at::zeros({sh.tokens, sh.rank}, x.options().dtype(at::kFloat));
  const at::Tensor a = as_adapter(lora_a, adt), b = as_adapter(lora_b, adt);
  at::Tensor g_keep, o_keep;
  const MultiLoraSegmentsView seg = multi_lora::one_adapter_segments(sh.tokens, sh.rank);

  MultiLoraShrinkParams sp;
  sp.x = x2.data_ptr();
  sp.a = a.data_ptr();
  sp.hidden = hidden.data_ptr<float>();
  sp.in_features = sh.in_features;
  sp.allow_k_split = !at::globalContext().deterministicAlgorithms();
  sp.use_tensor_cores = tensor_cores;
  sp.dropout = d;
  sp.seg = seg;

  MultiLoraExpandParams ep;
  ep.hidden = hidden.data_ptr<float>();
  ep.b = b.data_ptr();
  ep.scale = static_cast<float>(scale);
  ep.rank_scale = lora_gain_data(rank_scale, adt, g_keep);
  ep.out_scale = lora_gain_data(out_scale, adt, o_keep);
  ep.y = y.data_ptr();
  ep.ldy = sh.out_features;
  ep.out_total = sh.out_features;
  ep.slice_start[1] = sh.out_features;
  ep.use_tensor_cores = tensor_cores;
  ep.seg = seg;

  bool shrink_tc = false, expand_tc = false;
  LRK_DISPATCH_LORA_TYPES(x.scalar_type(), adt, op, [&] {
    LRK_CUDA_CHECK_LAUNCH(op, "shrink", (multi_lora::launch_shrink<cuda_t, adapter_t>(sp, stream, &shrink_tc)));
    LRK_CUDA_CHECK_LAUNCH(op, "expand", (multi_lora::launch_expand<cuda_t, adapter_t>(ep, stream, &expand_tc)));
  });
  count_cuda_launch(CudaFamily::kLoraLinear, CudaKernel::kShrink, shrink_tc);
  count_cuda_launch(CudaFamily::kLoraLinear, CudaKernel::kExpand, expand_tc);
  return {y.view(with_last_dim(x, sh.out_features)), hidden.view(with_last_dim(x, sh.rank))};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& hidden, double scale,
                          const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& out_scale,
                          double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 7> mask) {
  const char* op = "lora_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LoraShapes sh = check_lora_backward_args(op, grad_out, x, weight, lora_a, lora_b, hidden, scale, rank_scale,
                                                 out_scale, mask);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto [want_x, want_w, want_bias, want_a, want_b, want_g, want_o] = mask;
  const at::ScalarType dt = x.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);

  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor hid = hidden.reshape({sh.tokens, sh.rank}).contiguous();
  const at::ScalarType adt = lora_adapter_dtype(x, {&lora_a, &lora_b, opt_ptr(rank_scale), opt_ptr(out_scale)});
  const at::Tensor a = as_adapter(lora_a, adt), b = as_adapter(lora_b, adt);
  at::Tensor g_keep, o_keep;
  const void* g_ptr = lora_gain_data(rank_scale, adt, g_keep);
  const void* o_ptr = lora_gain_data(out_scale, adt, o_keep);
  std::optional<at::Tensor> gx, gw, gbias, ga, gb, gg, go;

  if (want_w) gw = at::mm(dy2.t(), x2);
  if (want_bias) gbias = dy2.sum(0);
  const bool need_dh = want_x || want_a || want_g;
  if (!(need_dh || want_b || want_o)) return {gx, gw, gbias, ga, gb, gg, go};

  // The passes below sum partial products with float atomics: bits vary from run to run.
  at::globalContext().alertNotDeterministic("lrkernels.lora_linear_backward (CUDA)");
  const MultiLoraSegmentsView seg = multi_lora::one_adapter_segments(sh.tokens, sh.rank);
  // Pass 1 over dy: dh = dy (o ⊙ B) = ∂L/∂(s·g⊙u) and P = dyᵀ (s·g⊙u) together.
  at::Tensor dh = at::zeros({sh.tokens, sh.rank}, f32);
  at::Tensor p_raw = at::zeros({sh.out_features, sh.rank}, f32);
  MultiLoraGradOutParams gp;
  gp.grad_out = dy2.data_ptr();
  gp.hidden = hid.data_ptr<float>();
  gp.b = b.data_ptr();
  gp.scale = static_cast<float>(scale);
  gp.rank_scale = g_ptr;
  gp.out_scale = o_ptr;
  gp.grad_z = dh.data_ptr<float>();
  gp.grad_b = p_raw.data_ptr<float>();
  gp.out_features = sh.out_features;
  gp.seg = seg;
  LRK_DISPATCH_LORA_TYPES(dt, adt, op, [&] {
    LRK_CUDA_CHECK_LAUNCH(op, "grad_out", (multi_lora::launch_grad_out<cuda_t, adapter_t>(gp, stream)));
  });

  // Small (r-sized) epilogues in ATen; each gradient in its own tensor's dtype.
  const at::Tensor* o = opt_ptr(out_scale);
  const at::Tensor* g = opt_ptr(rank_scale);
  if (want_b) gb = (o ? p_raw * o->to(at::kFloat).unsqueeze(1) : p_raw).to(lora_b.scalar_type());
  if (want_o) go = (p_raw * b.to(at::kFloat)).sum(1).to(o->scalar_type());
  if (want_g) gg = ((dh * hid).sum(0) * scale).to(g->scalar_type());
  if (!(want_x || want_a)) return {gx, gw, gbias, ga, gb, gg, go};
  const at::Tensor gain = g ? g->to(at::kFloat) * scale : at::full({sh.rank}, scale, f32);
  const at::Tensor du = dh * gain;

  // Pass 2 over x (mask regenerated): grad_x += drop'(du A), grad_a = duᵀ drop(x).
  at::Tensor dx, ga32;
  if (want_x) dx = at::mm(dy2, weight);
  if (want_a) ga32 = at::zeros({sh.rank, sh.in_features}, f32);
  MultiLoraGradInParams ip;
  ip.x = x2.data_ptr();
  ip.a = a.data_ptr();
  ip.grad_u = du.data_ptr<float>();
  ip.grad_x = want_x ? dx.data_ptr() : nullptr;
  ip.grad_a = want_a ? ga32.data_ptr<float>() : nullptr;
  ip.in_features = sh.in_features;
  ip.dropout = d;
  ip.seg = seg;
  LRK_DISPATCH_LORA_TYPES(dt, adt, op, [&] {
    LRK_CUDA_CHECK_LAUNCH(op, "grad_in", (multi_lora::launch_grad_in<cuda_t, adapter_t>(ip, stream)));
  });
  if (want_x) gx = dx.view(x.sizes());
  if (want_a) ga = ga32.to(lora_a.scalar_type());
  return {gx, gw, gbias, ga, gb, gg, go};
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace lrkernels
