// Multi-LoRA on CUDA: base GEMMs in cuBLAS (through ATen), the grouping by a device-side
// stable sort, the per-adapter low-rank products in the hand-written kernels of
// include/lrkernels/multi_lora.cuh. No host synchronisation anywhere: adapter ids and ranks
// are never read on the host (out-of-range ids count as base-only, ranks are clamped), grids
// are sized for the worst case, so the ops are CUDA-graph capturable with changing ids.
// multi_lora_linear takes float32 adapter weights on an fp16/bf16 x (PEFT's default): SIMT
// kernels reading them as fp32, outputs in x's dtype, each gradient in its tensor's dtype.
// Dropout on x, per-adapter rank gates (rank_scale) and output scales (out_scale) are
// compile-time options of the same kernels, SIMT and tensor-core alike (the launchers pick the
// instantiation), so an option never changes which path (SIMT or tensor cores) runs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_dispatch.h"
#include "lrkernels/multi_lora.cuh"
#include "multi_lora/lora_kernels_cuda.h"
#include "multi_lora/multi_lora_checks.h"

namespace lrkernels {
namespace {

struct SegmentsKeep {
  at::Tensor order, offsets, ranks;
};

MultiLoraSegmentsView make_view(SegmentsKeep& keep, const at::Tensor& order, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& ranks, int64_t tokens, int64_t L, int64_t r_max) {
  keep.order = order.contiguous();
  keep.offsets = offsets.contiguous();
  MultiLoraSegmentsView v;
  v.token_order = keep.order.data_ptr<int32_t>();
  v.adapter_offsets = keep.offsets.data_ptr<int32_t>();
  if (ranks.has_value() && ranks->defined()) {
    keep.ranks = ranks->to(at::kInt).contiguous();
    v.ranks = keep.ranks.data_ptr<int32_t>();
  }
  v.tokens = tokens;
  v.num_adapters = L;
  v.r_max = r_max;
  return v;
}

// The tensor-core kernels pay off when tiles are full: on average at least 32 tokens per
// adapter (prefill). kernel_select.h has the rest of the rule (fp16/bf16 operands throughout,
// an sm_80+ image on this GPU; lrkernels.set_cuda_kernels overrides). Shapes, the setting and
// the cached image arch only: no host sync.
bool on_tensor_cores(const at::Tensor& t, at::ScalarType adapter_dtype, const MultiLoraSegmentsView& seg,
                     const char* op) {
  static KernelImageArch image(reinterpret_cast<const void*>(&multi_lora::shrink_tc_kernel<__half, 16, false>));
  const bool tc_dtypes = is_low_precision(t.scalar_type()) && adapter_dtype == t.scalar_type();
  return use_tensor_cores(CudaFamily::kMultiLora, image, tc_dtypes, seg.tokens >= 32 * seg.num_adapters, op);
}

// The rank gates and output scales as the kernels read them (in the adapters' type, null when
// absent).
struct Gains {
  at::Tensor g_keep, o_keep;
  const void* g = nullptr;
  const void* o = nullptr;
};

void run_shrink(const char* op, const at::Tensor& x2, const at::Tensor& a4, at::Tensor& hidden,
                const MultiLoraSegmentsView& seg, const DropoutParams& dropout, cudaStream_t stream) {
  MultiLoraShrinkParams p;
  // Split-K partial sums meet in hidden through float atomics, in an order that varies from
  // run to run; unsplit, each element gets one add onto zeros: deterministic mode does that.
  p.allow_k_split = !at::globalContext().deterministicAlgorithms();
  p.x = x2.data_ptr();
  p.a = a4.data_ptr();
  p.hidden = hidden.data_ptr<float>();
  p.in_features = x2.size(1);
  p.slices = a4.size(0);
  p.seg = seg;
  p.dropout = dropout;
  p.use_tensor_cores = on_tensor_cores(x2, a4.scalar_type(), seg, op);
  bool tc = false;
  LRK_DISPATCH_LORA_TYPES(x2.scalar_type(), a4.scalar_type(), op, [&] {
    LRK_CUDA_CHECK_LAUNCH(op, "shrink", (multi_lora::launch_shrink<cuda_t, adapter_t>(p, stream, &tc)));
  });
  count_cuda_launch(CudaFamily::kMultiLora, CudaKernel::kShrink, tc);
}

void run_expand(const char* op, at::Tensor& y2, const at::Tensor& hidden, const at::Tensor& b,
                const at::Tensor& scales_f32, const Gains& gains, const std::vector<int64_t>& slice_sizes,
                const MultiLoraSegmentsView& seg, cudaStream_t stream) {
  MultiLoraExpandParams p;
  p.hidden = hidden.data_ptr<float>();
  p.b = b.data_ptr();
  p.scales = scales_f32.data_ptr<float>();
  p.rank_scale = gains.g;
  p.out_scale = gains.o;
  p.y = y2.data_ptr();
  p.ldy = y2.stride(0);
  p.out_total = b.size(1);
  p.slices = static_cast<int64_t>(slice_sizes.size());
  p.slice_start[0] = 0;
  for (size_t s = 0; s < slice_sizes.size(); ++s) p.slice_start[s + 1] = p.slice_start[s] + slice_sizes[s];
  p.seg = seg;
  p.use_tensor_cores = on_tensor_cores(y2, b.scalar_type(), seg, op);
  bool tc = false;
  LRK_DISPATCH_LORA_TYPES(y2.scalar_type(), b.scalar_type(), op, [&] {
    LRK_CUDA_CHECK_LAUNCH(op, "expand", (multi_lora::launch_expand<cuda_t, adapter_t>(p, stream, &tc)));
  });
  count_cuda_launch(CudaFamily::kMultiLora, CudaKernel::kExpand, tc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_lora_segments_cuda(const at::Tensor& adapter_ids, int64_t num_adapters) {
  const char* op = "multi_lora_segments";
  TORCH_CHECK_TYPE(adapter_ids.scalar_type() == at::kInt || adapter_ids.scalar_type() == at::kLong, "lrkernels.",
                   op, ": adapter_ids must be int32 or int64, got ", adapter_ids.scalar_type());
  TORCH_CHECK_VALUE(num_adapters >= 0, "lrkernels.", op, ": num_adapters must be >= 0, got ", num_adapters);
  const c10::cuda::CUDAGuard guard(adapter_ids.device());
  return group_tokens_by_adapter(adapter_ids.reshape({-1}), num_adapters);
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& adapter_ids,
                            const at::Tensor& token_order, const at::Tensor& adapter_offsets,
                            const std::optional<at::Tensor>& ranks) {
  const char* op = "lora_shrink";
  const ShrinkShapes sh = check_shrink_args(op, x, lora_a, adapter_ids, token_order, adapter_offsets, ranks);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool sliced = lora_a.dim() == 4;
  const at::Tensor a4 = (sliced ? lora_a : lora_a.unsqueeze(0)).contiguous();
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  at::Tensor hidden = at::zeros({sh.slices, sh.tokens, sh.r_max}, x.options().dtype(at::kFloat));
  SegmentsKeep keep;
  const MultiLoraSegmentsView seg =
      make_view(keep, token_order, adapter_offsets, ranks, sh.tokens, sh.num_adapters, sh.r_max);
  run_shrink(op, x2, a4, hidden, seg, DropoutParams{}, stream);
  return sliced ? hidden : hidden[0];
}

void lora_expand_cuda(at::Tensor& y, const at::Tensor& hidden, const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                      const at::Tensor& token_order, const at::Tensor& adapter_offsets, const at::Tensor& scales,
                      const std::optional<at::Tensor>& ranks, std::optional<c10::IntArrayRef> slice_sizes) {
  const char* op = "lora_expand_";
  const ExpandShapes sh = check_expand_args(op, y, hidden, lora_b, adapter_ids, token_order, adapter_offsets, scales,
                                            ranks, slice_sizes);
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor h3 = (hidden.dim() == 3 ? hidden : hidden.unsqueeze(0)).contiguous();
  const at::Tensor b = lora_b.contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  SegmentsKeep keep;
  const MultiLoraSegmentsView seg =
      make_view(keep, token_order, adapter_offsets, ranks, sh.tokens, sh.num_adapters, sh.r_max);
  run_expand(op, y, h3, b, s32, Gains{}, sh.slice_sizes, seg, stream);
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& adapter_ids, const at::Tensor& scales,
    const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& token_order,
    const std::optional<at::Tensor>& adapter_offsets, const std::optional<at::Tensor>& rank_scale,
    const std::optional<at::Tensor>& out_scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "multi_lora_linear";
  const MultiLoraShapes sh = check_multi_lora_args(op, x, weight, bias, lora_a, lora_b, adapter_ids, scales, ranks);
  const MultiLoraOptions opts = check_multi_lora_options(op, x, sh, rank_scale, out_scale, dropout_p, seed);
  TORCH_CHECK_VALUE(token_order.has_value() == adapter_offsets.has_value(), "lrkernels.", op,
                    ": pass both token_order and adapter_offsets (from multi_lora_segments) or neither");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor order, offsets;
  if (token_order.has_value()) {
    order = *token_order;
    offsets = *adapter_offsets;
    check_segments(order, offsets, x, sh.tokens, sh.num_adapters, op);
  } else {
    std::tie(order, offsets) = group_tokens_by_adapter(adapter_ids.reshape({-1}), sh.num_adapters);
  }
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  at::Tensor y = opt_ptr_defined(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor hidden = at::zeros({1, sh.tokens, sh.r_max}, x.options().dtype(at::kFloat));
  SegmentsKeep keep;
  const MultiLoraSegmentsView seg = make_view(keep, order, offsets, ranks, sh.tokens, sh.num_adapters, sh.r_max);
  const at::ScalarType adt =
      lora_adapter_dtype(x, {&lora_a, &lora_b, opt_ptr(rank_scale), opt_ptr(out_scale)});
  Gains gains;
  gains.g = lora_gain_data(rank_scale, adt, gains.g_keep);
  gains.o = lora_gain_data(out_scale, adt, gains.o_keep);
  run_shrink(op, x2, lora_a.to(adt).contiguous().unsqueeze(0), hidden, seg, opts.dropout, stream);
  run_expand(op, y, hidden, lora_b.to(adt).contiguous(), scales.to(at::kFloat).contiguous(), gains,
             {sh.out_features}, seg, stream);
  return {y.view(with_last_dim(x, sh.out_features)), hidden.view(with_last_dim(x, sh.r_max))};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
multi_lora_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                                const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                                const at::Tensor& hidden, const at::Tensor& token_order,
                                const at::Tensor& adapter_offsets, std::array<bool, 8> mask,
                               const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& out_scale,
                               double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "multi_lora_linear_backward";
  const MultiLoraShapes sh =
      check_multi_lora_args(op, x, weight, std::nullopt, lora_a, lora_b, adapter_ids, scales, ranks);
  check_backward_extras(op, grad_out, hidden, x, sh);
  const MultiLoraOptions opts = check_multi_lora_options(op, x, sh, rank_scale, out_scale, dropout_p, seed);
  check_segments(token_order, adapter_offsets, x, sh.tokens, sh.num_adapters, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool want_x = mask[0], want_w = mask[1], want_bias = mask[2], want_a = mask[3], want_b = mask[4],
             want_s = mask[5], want_g = mask[6] && opts.has_rank_scale, want_o = mask[7] && opts.has_out_scale;
  const at::ScalarType dt = x.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor hid = hidden.reshape({sh.tokens, sh.r_max}).contiguous();
  const at::ScalarType adt =
      lora_adapter_dtype(x, {&lora_a, &lora_b, opt_ptr(rank_scale), opt_ptr(out_scale)});
  const at::Tensor a = lora_a.to(adt).contiguous(), b = lora_b.to(adt).contiguous();
  const at::Tensor s32 = scales.to(at::kFloat).contiguous();
  Gains gains;
  gains.g = lora_gain_data(rank_scale, adt, gains.g_keep);
  gains.o = lora_gain_data(out_scale, adt, gains.o_keep);
  SegmentsKeep keep;
  const MultiLoraSegmentsView seg =
      make_view(keep, token_order, adapter_offsets, ranks, sh.tokens, sh.num_adapters, sh.r_max);
  std::optional<at::Tensor> gx, gw, gbias, ga, gb, gs, gg, go;

  if (want_w) gw = at::mm(dy2.t(), x2);
  if (want_bias) gbias = dy2.sum(0);
  at::Tensor dx;
  if (want_x) dx = at::mm(dy2, weight);
  const bool need_dz = want_x || want_a || want_s || want_g;
  const bool need_p = want_b || want_o;
  if (need_dz || need_p) {
    at::globalContext().alertNotDeterministic("lrkernels.multi_lora_linear_backward (CUDA)");
    // Pass 1 over dy, with u = s·(g ⊙ h) and z = (u Bᵀ) ⊙ o per token's adapter:
    // dz = dy (o ⊙ B) = ∂L/∂u and P = dyᵀ u per adapter (multi_lora_params.h).
    at::Tensor dz, p32;
    if (need_dz) dz = at::zeros({sh.tokens, sh.r_max}, f32);
    if (need_p) p32 = at::zeros({sh.num_adapters, sh.out_features, sh.r_max}, f32);
    MultiLoraGradOutParams gp;
    gp.grad_out = dy2.data_ptr();
    gp.hidden = hid.data_ptr<float>();
    gp.b = b.data_ptr();
    gp.scales = s32.data_ptr<float>();
    gp.rank_scale = gains.g;
    gp.out_scale = gains.o;
    gp.grad_z = need_dz ? dz.data_ptr<float>() : nullptr;
    gp.grad_b = need_p ? p32.data_ptr<float>() : nullptr;
    gp.out_features = sh.out_features;
    gp.seg = seg;
    LRK_DISPATCH_LORA_TYPES(dt, adt, op, [&] {
      LRK_CUDA_CHECK_LAUNCH(op, "grad_out", (multi_lora::launch_grad_out<cuda_t, adapter_t>(gp, stream)));
    });
    // Small (adapter-sized) epilogues in ATen; each gradient in its own tensor's dtype.
    // ∂B = o ⊙ P, ∂o = Σ_j B ⊙ P (P is zero past each adapter's rank).
    const at::Tensor o32 = gains.o != nullptr ? out_scale->to(at::kFloat) : at::Tensor();
    if (want_b) gb = (o32.defined() ? p32 * o32.unsqueeze(2) : p32).to(lora_b.scalar_type());
    if (want_o) go = (p32 * b.to(at::kFloat)).sum(2).to(out_scale->scalar_type());
    if (need_dz) {
      // Each token's adapter as the grouping says (the kernels and the CPU backward follow the
      // grouping, not adapter_ids), computed on the device: sorted position p belongs to the
      // adapter l with offsets[l] <= p < offsets[l + 1]; past offsets[L], base-only (dz rows 0).
      const auto i64 = token_order.options().dtype(at::kLong);
      const at::Tensor pos_adapter =
          at::searchsorted(adapter_offsets.to(at::kLong), at::arange(sh.tokens, i64), /*out_int32=*/false,
                           /*right=*/true) - 1;
      const at::Tensor tok = token_order.to(at::kLong).clamp(0, std::max<int64_t>(sh.tokens - 1, 0));
      const at::Tensor ids = at::full({sh.tokens}, -1, i64).index_put_({tok}, pos_adapter);
      const at::Tensor valid = (ids >= 0).logical_and(ids < sh.num_adapters);
      const at::Tensor safe = at::where(valid, ids, at::zeros_like(ids));
      // g of each token's adapter (T, r_max); base-only tokens have dz = 0 whatever it is
      const at::Tensor g_tok = gains.g != nullptr ? rank_scale->to(at::kFloat).index_select(0, safe) : at::Tensor();
      const at::Tensor dzh = dz * hid;  // (T, r_max)
      if (want_s) {
        // ∂s_l = Σ_{t of l} Σ_j dz ⊙ g ⊙ h
        const at::Tensor dot = at::where(valid, (g_tok.defined() ? dzh * g_tok : dzh).sum(1), at::zeros({}, f32));
        gs = at::zeros({sh.num_adapters}, f32).index_add_(0, safe, dot).to(scales.scalar_type());
      }
      if (want_g) {
        // ∂g_l = s_l Σ_{t of l} dz ⊙ h: tokens grouped by adapter with index_add_ (no host sync)
        const at::Tensor rows = at::where(valid.unsqueeze(1), dzh, at::zeros({}, f32));
        gg = (at::zeros({sh.num_adapters, sh.r_max}, f32).index_add_(0, safe, rows) * s32.unsqueeze(1))
                 .to(rank_scale->scalar_type());
      }
      if (want_x || want_a) {
        // du = ∂L/∂h = s·g ⊙ dz
        const at::Tensor s_tok = at::where(valid, s32.index_select(0, safe), at::zeros({}, f32));
        at::Tensor du = dz * s_tok.unsqueeze(1);
        if (g_tok.defined()) du = du * g_tok;
        du = du.contiguous();
        at::Tensor ga32;
        if (want_a) ga32 = at::zeros({sh.num_adapters, sh.r_max, sh.in_features}, f32);
        // Pass 2 over x (the dropout mask regenerated from the seed): grad_x += drop'(du A),
        // grad_a = duᵀ drop(x).
        MultiLoraGradInParams ip;
        ip.x = x2.data_ptr();
        ip.a = a.data_ptr();
        ip.grad_u = du.data_ptr<float>();
        ip.grad_x = want_x ? dx.data_ptr() : nullptr;
        ip.grad_a = want_a ? ga32.data_ptr<float>() : nullptr;
        ip.in_features = sh.in_features;
        ip.dropout = opts.dropout;
        ip.seg = seg;
        LRK_DISPATCH_LORA_TYPES(dt, adt, op, [&] {
          LRK_CUDA_CHECK_LAUNCH(op, "grad_in", (multi_lora::launch_grad_in<cuda_t, adapter_t>(ip, stream)));
        });
        if (want_a) ga = ga32.to(lora_a.scalar_type());
      }
    }
  }
  if (want_x) gx = dx.view(x.sizes());
  return {gx, gw, gbias, ga, gb, gs, gg, go};
}

TORCH_LIBRARY_IMPL(lrkernels, CUDA, m) {
  m.impl("multi_lora_segments", &multi_lora_segments_cuda);
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_expand_", &lora_expand_cuda);
  m.impl("multi_lora_linear", &multi_lora_linear_cuda);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cuda);
}

}  // namespace lrkernels
