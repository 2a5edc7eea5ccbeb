// gqa_attention and its backward on CUDA: the same schema, validation (gqa_checks.h) and
// semantics as the CPU kernels (gqa_cpu.cpp), with the hand-written kernels of
// include/lrkernels/gqa.cuh. float32, float16 and bfloat16 q/k/v (softmax and every sum in
// float32; lse float32); float64 is CPU-only (the shared dtype check raises a TypeError).
//
// No host synchronisation: kv_lens is read by the kernels (values outside [0, kv_len] are
// clamped there, where the CPU op raises: a GPU op cannot check device data without a sync), the
// split-KV plan depends on the shapes and the SM count only, and the workspaces come from the
// caching allocator on the current stream, so the ops can be captured in a CUDA graph and
// replayed with new kv_lens contents.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/cuda_dispatch.h"
#include "gqa/gqa_checks.h"
#include "lrkernels/gqa.cuh"

namespace lrkernels {
namespace {

constexpr const char* kFwd = "gqa_attention";
constexpr const char* kBwd = "gqa_attention_backward";

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

// A unit stride over the head dim is what the kernels read; anything else is copied once.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

struct Prepared {
  GqaAttnInputs in;
  at::Tensor q, k, v, mask;  // keep what `in` points into alive
};

Prepared prepare(const GqaShapes& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                 double scale, const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& attn_mask) {
  Prepared pr;
  GqaAttnInputs& in = pr.in;
  in.B = sh.B, in.Hq = sh.Hq, in.Hkv = sh.Hkv, in.G = sh.G, in.Sq = sh.Sq, in.Sk = sh.Sk, in.D = sh.D;
  pr.q = unit_last_stride(q);
  pr.k = unit_last_stride(k);
  pr.v = unit_last_stride(v);
  in.q = pr.q.data_ptr(), in.k = pr.k.data_ptr(), in.v = pr.v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    in.q_s[d] = pr.q.stride(d);
    in.k_s[d] = pr.k.stride(d);
    in.v_s[d] = pr.v.stride(d);
  }
  in.causal = causal;
  in.scale = static_cast<float>(scale);
  if (kv_lens.has_value() && kv_lens->defined()) {
    // read in place, int32 or int64, through its stride (no copy: a captured graph re-reads it)
    const at::Tensor& t = *kv_lens;
    if (t.scalar_type() == at::kLong) in.kv_lens64 = t.data_ptr<int64_t>();
    else in.kv_lens32 = t.data_ptr<int32_t>();
    in.kv_lens_s = t.stride(0);
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    at::Tensor m = *attn_mask;
    while (m.dim() < 4) m = m.unsqueeze(0);
    // a mask passed already expanded (stride 0) is narrowed back to size 1 there, so a conversion
    // below never materialises the broadcast
    for (int64_t d = 0; d < 4; ++d)
      if (m.size(d) > 1 && m.stride(d) == 0) m = m.narrow(d, 0, 1);
    // bool and float32 masks are read as they are; other float dtypes once as float32
    if (m.scalar_type() != at::kBool && m.scalar_type() != at::kFloat) m = m.to(at::kFloat);
    pr.mask = m;
    in.mask = m.data_ptr();
    in.mask_is_bool = m.scalar_type() == at::kBool;
    for (int64_t d = 0; d < 4; ++d) in.m_s[d] = m.size(d) == 1 ? 0 : m.stride(d);
  }
  return pr;
}

std::tuple<at::Tensor, at::Tensor> gqa_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, double scale,
                                                      const std::optional<at::Tensor>& kv_lens,
                                                      const std::optional<at::Tensor>& attn_mask) {
  const GqaShapes sh = check_gqa_args(kFwd, q, k, v, scale, kv_lens, attn_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o = at::empty({sh.B, sh.Hq, sh.Sq, sh.D}, q.options());
  at::Tensor lse = at::empty({sh.B, sh.Hq, sh.Sq}, f32);
  if (o.numel() == 0) return {o, lse};
  Prepared pr = prepare(sh, q, k, v, causal, scale, kv_lens, attn_mask);
  GqaFwdParams p;
  p.in = pr.in;
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  const gqa::SplitPlan plan = gqa::plan_splits(p.in, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor o_part, lse_part;
  if (plan.n_split > 1) {
    const int64_t rows = sh.B * sh.Hq * sh.Sq;
    o_part = at::empty({plan.n_split, rows, sh.D}, f32);
    lse_part = at::empty({plan.n_split, rows}, f32);
    p.n_split = plan.n_split;
    p.split_keys = plan.split_keys;
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  LRK_DISPATCH_CUDA_FLOAT(q.scalar_type(), kFwd, [&] {
    LRK_CUDA_CHECK_LAUNCH(kFwd, "forward", gqa::launch_forward<cuda_t>(p, stream()));
  });
  return {o, lse};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
gqa_attention_backward_cuda(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& o, const at::Tensor& lse, bool causal, double scale,
                            const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& attn_mask,
                            std::array<bool, 3> output_mask) {
  const GqaShapes sh = check_gqa_args(kBwd, q, k, v, scale, kv_lens, attn_mask);
  check_gqa_grad_args(kBwd, sh, q, grad_o, o, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  const bool is_f32 = q.scalar_type() == at::kFloat;
  // torch.use_deterministic_algorithms(True): dQ from its own pass over query tiles (same bits
  // every run). Otherwise dQ accumulates with atomics, in itself (float32, zeroed) or in a zeroed
  // float32 workspace converted at the end. Every row of dk / dv (and of a deterministic dq) is
  // written by the kernels (zeros where nothing is visible).
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor dq, dq_acc;
  if (output_mask[0]) {
    dq = is_f32 && !deterministic ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
    if (!deterministic) dq_acc = is_f32 ? dq : at::zeros(q.sizes(), f32);
  }
  at::Tensor dk = output_mask[1] ? at::empty(k.sizes(), k.options()) : at::Tensor();
  at::Tensor dv = output_mask[2] ? at::empty(v.sizes(), v.options()) : at::Tensor();
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {opt(dq), opt(dk), opt(dv)};

  Prepared pr = prepare(sh, q, k, v, causal, scale, kv_lens, attn_mask);
  const at::Tensor go = unit_last_stride(grad_o), oc = unit_last_stride(o), lc = lse.contiguous();
  at::Tensor delta = at::empty({sh.B * sh.Hq * sh.Sq}, f32);
  GqaBwdParams p;
  p.in = pr.in;
  p.grad_o = go.data_ptr();
  p.o = oc.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.go_s[d] = go.stride(d);
    p.o_s[d] = oc.stride(d);
  }
  p.lse = lc.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.deterministic_dq = deterministic;
  if (dq.defined()) p.dq = dq.data_ptr();
  if (dq_acc.defined()) p.dq_acc = dq_acc.data_ptr<float>();
  if (dk.defined()) p.dk = dk.data_ptr();
  if (dv.defined()) p.dv = dv.data_ptr();
  LRK_DISPATCH_CUDA_FLOAT(q.scalar_type(), kBwd, [&] {
    LRK_CUDA_CHECK_LAUNCH(kBwd, "backward", gqa::launch_backward<cuda_t>(p, stream()));
  });
  return {opt(dq), opt(dk), opt(dv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("gqa_attention", &gqa_attention_cuda);
  m.impl("gqa_attention_backward", &gqa_attention_backward_cuda);
}

}  // namespace lrkernels
