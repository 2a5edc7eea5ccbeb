// Argument validation and the shared grouping step for the multi-LoRA ops, used by the CPU
// and CUDA kernels alike so both reject the same inputs with the same messages. Checks that
// need tensor values (adapter ids in range, ranks ≤ r_max) run on CPU only: on CUDA reading
// them would synchronise with the host, so the kernels bound every index instead.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/dropout.h"

namespace lrkernels {

constexpr int64_t kMultiLoraMaxSlices = 8;

inline void check_index_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                               const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "lrkernels.", op, ": ", name,
                   " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "lrkernels.", op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

// adapter_ids: integer, shape = x's leading shape (or (T,) for a 2-D x); on CPU values in [-1, L).
inline void check_adapter_ids(const at::Tensor& ids, const at::Tensor& x, int64_t num_adapters, const char* op) {
  check_index_tensor(ids, x, op, "adapter_ids", "x");
  const std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  TORCH_CHECK_VALUE(ids.sizes() == c10::IntArrayRef(lead), "lrkernels.", op,
                    ": adapter_ids must have x's leading shape ", shape_str(lead), " (one id per token), got ",
                    shape_str(ids.sizes()));
  if (!ids.is_cuda() && ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < num_adapters, "lrkernels.", op,
                      ": adapter_ids must be in [-1, L) = [-1, ", num_adapters, ") (-1: base model only), got ",
                      (lo < -1 ? lo : hi));
  }
}

// ranks: None or integer (L,), on CPU values in [0, r_max].
inline void check_ranks(const std::optional<at::Tensor>& ranks, const at::Tensor& ref, int64_t num_adapters,
                        int64_t r_max, const char* op) {
  if (!(ranks.has_value() && ranks->defined())) return;
  check_index_tensor(*ranks, ref, op, "ranks", "x");
  check_shape(*ranks, {num_adapters}, op, "ranks", "(L,)");
  if (!ranks->is_cuda() && ranks->numel() > 0) {
    const int64_t lo = ranks->min().item<int64_t>(), hi = ranks->max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= r_max, "lrkernels.", op, ": ranks must be in [0, r_max] = [0, ", r_max,
                      "], got ", (lo < 0 ? lo : hi));
  }
}

inline void check_scales(const at::Tensor& scales, const at::Tensor& ref, int64_t num_adapters, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(scales.scalar_type()), "lrkernels.", op,
                   ": scales must be a floating-point tensor, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.device() == ref.device(), "lrkernels.", op, ": scales is on ", scales.device(),
                    " but x is on ", ref.device(), "; all tensors must be on one device");
  check_shape(scales, {num_adapters}, op, "scales", "(L,)");
}

// token_order (T,) and adapter_offsets (L + 1,), int32, as multi_lora_segments returns them.
// On CPU their values are checked too (offsets in range, token_order a permutation), so a
// hand-made grouping cannot index out of bounds, race or leave rows unwritten. On CUDA the
// values are not read (that would synchronise): indices are bounded, and a grouping that is
// not a permutation leaves the rows of missing tokens undefined — the caller's contract.
inline void check_segments(const at::Tensor& order, const at::Tensor& offsets, const at::Tensor& ref,
                           int64_t tokens, int64_t num_adapters, const char* op) {
  TORCH_CHECK_TYPE(order.scalar_type() == at::kInt, "lrkernels.", op,
                   ": token_order must be int32 (from multi_lora_segments), got ", order.scalar_type());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, "lrkernels.", op,
                   ": adapter_offsets must be int32 (from multi_lora_segments), got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(order.device() == ref.device() && offsets.device() == ref.device(), "lrkernels.", op,
                    ": token_order and adapter_offsets must be on x's device ", ref.device());
  check_shape(order, {tokens}, op, "token_order", "(T,)");
  check_shape(offsets, {num_adapters + 1}, op, "adapter_offsets", "(L + 1,)");
  if (!ref.is_cuda()) {
    const at::Tensor off = offsets.to(at::kLong);
    const bool ok_off = off.numel() == 0 || (off[0].item<int64_t>() == 0 && off[-1].item<int64_t>() <= tokens &&
                                             (num_adapters == 0 || (off.diff() >= 0).all().item<bool>()));
    TORCH_CHECK_VALUE(ok_off, "lrkernels.", op,
                      ": adapter_offsets must start at 0, be non-decreasing and end at most at T = ", tokens);
    if (tokens > 0) {
      TORCH_CHECK_VALUE(order.min().item<int64_t>() >= 0 && order.max().item<int64_t>() < tokens, "lrkernels.",
                        op, ": token_order must hold token indices in [0, T) = [0, ", tokens, ")");
      // Each token exactly once: a token listed twice would be written by two threads at once
      // and a missing one would leave its output row uninitialised.
      const at::Tensor count = at::bincount(order.to(at::kLong), {}, tokens);
      const bool perm = count.numel() == tokens && count.eq(1).all().item<bool>();
      if (!perm) {
        const int64_t bad = count.ne(1).nonzero()[0][0].item<int64_t>();
        TORCH_CHECK_VALUE(false, "lrkernels.", op, ": token_order must be a permutation of [0, T) = [0, ", tokens,
                          ") (from multi_lora_segments), but token ", bad, " appears ", count[bad].item<int64_t>(),
                          " times");
      }
    }
  }
}

struct MultiLoraShapes {
  int64_t tokens, in_features, out_features, num_adapters, r_max;
};

// lora_a and lora_b follow the shared mixed-precision rule (check_adapter_param: x's dtype, or
// float32 on a float16/bfloat16 x), on CPU and CUDA. scales may be any floating dtype (it is
// read as float32 or float64).
inline MultiLoraShapes check_multi_lora_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                             const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                                             const at::Tensor& scales, const std::optional<at::Tensor>& ranks) {
  const LinearBaseShapes base = check_linear_base(op, x, weight, bias);
  const int64_t in = base.in_features, out = base.out_features;
  check_dim(lora_a, 3, op, "lora_a", "(L, r_max, in_features)");
  check_adapter_param(lora_a, x, op, "lora_a");
  const int64_t L = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK_VALUE(L >= 1 && r >= 1, "lrkernels.", op,
                    ": lora_a must hold at least one adapter (L >= 1) of r_max >= 1, got shape ",
                    shape_str(lora_a.sizes()));
  check_shape(lora_a, {L, r, in}, op, "lora_a", "(L, r_max, in_features)");
  check_dim(lora_b, 3, op, "lora_b", "(L, out_features, r_max)");
  check_adapter_param(lora_b, x, op, "lora_b");
  check_shape(lora_b, {L, out, r}, op, "lora_b", "(L, out_features, r_max)");
  check_scales(scales, x, L, op);
  check_ranks(ranks, x, L, r, op);
  check_adapter_ids(adapter_ids, x, L, op);
  return MultiLoraShapes{leading_tokens(x), in, out, L, r};
}

// lora_linear's options on the multi-LoRA layer: per-adapter rank gates (L, r_max), output
// scales (L, out_features) and dropout on the adapter input. Gates and scales follow the
// mixed-precision rule of the other adapter tensors.
struct MultiLoraOptions {
  bool has_rank_scale = false, has_out_scale = false;
  DropoutParams dropout;
  bool any() const { return has_rank_scale || has_out_scale || dropout.threshold != 0; }
};

inline MultiLoraOptions check_multi_lora_options(const char* op, const at::Tensor& x, const MultiLoraShapes& sh,
                                                 const std::optional<at::Tensor>& rank_scale,
                                                 const std::optional<at::Tensor>& out_scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  MultiLoraOptions o;
  if (rank_scale.has_value() && rank_scale->defined()) {
    check_adapter_param(*rank_scale, x, op, "rank_scale");
    check_shape(*rank_scale, {sh.num_adapters, sh.r_max}, op, "rank_scale", "(L, r_max)");
    o.has_rank_scale = true;
  }
  if (out_scale.has_value() && out_scale->defined()) {
    check_adapter_param(*out_scale, x, op, "out_scale");
    check_shape(*out_scale, {sh.num_adapters, sh.out_features}, op, "out_scale", "(L, out_features)");
    o.has_out_scale = true;
  }
  o.dropout = make_dropout_params(dropout_p, seed, x, op);
  return o;
}

inline at::ScalarType multi_lora_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool opt_ptr_defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_backward_extras(const char* op, const at::Tensor& grad_out, const at::Tensor& hidden,
                                  const at::Tensor& x, const MultiLoraShapes& sh) {
  check_like(grad_out, x, op, "grad_out", "x");
  const std::vector<int64_t> gs = with_last_dim(x, sh.out_features), hs = with_last_dim(x, sh.r_max);
  check_shape(grad_out, gs, op, "grad_out", "(..., out_features)");
  TORCH_CHECK_VALUE(hidden.device() == x.device(), "lrkernels.", op, ": hidden is on ", hidden.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(hidden.scalar_type() == multi_lora_acc_dtype(x), "lrkernels.", op, ": hidden must be ",
                   multi_lora_acc_dtype(x), " (the forward's second output), got ", hidden.scalar_type());
  check_shape(hidden, hs, op, "hidden", "(..., r_max)");
}

struct ShrinkShapes {
  int64_t tokens, in_features, slices, num_adapters, r_max;
};

inline ShrinkShapes check_shrink_args(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                                      const at::Tensor& adapter_ids, const at::Tensor& token_order,
                                      const at::Tensor& adapter_offsets, const std::optional<at::Tensor>& ranks) {
  check_x(op, x);
  TORCH_CHECK_VALUE(lora_a.dim() == 3 || lora_a.dim() == 4, "lrkernels.", op,
                    ": lora_a must be (L, r_max, in_features) or (S, L, r_max, in_features), got shape ",
                    shape_str(lora_a.sizes()));
  check_like(lora_a, x, op, "lora_a", "x");
  const bool sliced = lora_a.dim() == 4;
  const int64_t S = sliced ? lora_a.size(0) : 1, L = lora_a.size(-3), r_max = lora_a.size(-2), in = x.size(-1);
  TORCH_CHECK_VALUE(S >= 1 && S <= kMultiLoraMaxSlices, "lrkernels.", op, ": lora_a must have 1 to ",
                    kMultiLoraMaxSlices, " slices, got ", S);
  TORCH_CHECK_VALUE(lora_a.size(-1) == in && r_max >= 1, "lrkernels.", op,
                    ": lora_a must have shape (..., L, r_max >= 1, in_features = ", in, "), got ",
                    shape_str(lora_a.sizes()));
  check_adapter_ids(adapter_ids, x, L, op);
  check_ranks(ranks, x, L, r_max, op);
  const int64_t T = leading_tokens(x);
  check_segments(token_order, adapter_offsets, x, T, L, op);
  return ShrinkShapes{T, in, S, L, r_max};
}

struct ExpandShapes {
  int64_t tokens, out_total, slices, num_adapters, r_max;
  std::vector<int64_t> slice_sizes;
};

inline ExpandShapes check_expand_args(const char* op, const at::Tensor& y, const at::Tensor& hidden,
                                      const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                                      const at::Tensor& token_order, const at::Tensor& adapter_offsets,
                                      const at::Tensor& scales, const std::optional<at::Tensor>& ranks,
                                      const std::optional<c10::IntArrayRef>& slice_sizes) {
  check_float_input(y, op, "y");
  TORCH_CHECK_VALUE(y.dim() == 2, "lrkernels.", op, ": y must be 2-D (T, out_total), got shape ",
                    shape_str(y.sizes()));
  TORCH_CHECK_VALUE(y.size(1) <= 1 || y.stride(1) == 1, "lrkernels.", op,
                    ": y's rows must be contiguous (stride(1) == 1), got strides ", shape_str(y.strides()));
  check_dim(lora_b, 3, op, "lora_b", "(L, out_total, r_max)");
  check_like(lora_b, y, op, "lora_b", "y");
  const int64_t T = y.size(0), L = lora_b.size(0), out_total = lora_b.size(1), r_max = lora_b.size(2);
  TORCH_CHECK_VALUE(r_max >= 1, "lrkernels.", op, ": lora_b must have r_max >= 1, got shape ",
                    shape_str(lora_b.sizes()));
  TORCH_CHECK_VALUE(y.size(1) == out_total, "lrkernels.", op, ": y must have shape (T, out_total) = (", T, ", ",
                    out_total, "), got ", shape_str(y.sizes()));
  const auto acc = multi_lora_acc_dtype(y);
  TORCH_CHECK_TYPE(hidden.scalar_type() == acc, "lrkernels.", op, ": hidden must be ", acc,
                   " (lora_shrink's output), got ", hidden.scalar_type());
  TORCH_CHECK_VALUE(hidden.device() == y.device(), "lrkernels.", op, ": hidden is on ", hidden.device(),
                    " but y is on ", y.device());
  TORCH_CHECK_VALUE((hidden.dim() == 2 || hidden.dim() == 3) && hidden.size(-2) == T && hidden.size(-1) == r_max,
                    "lrkernels.", op, ": hidden must have shape (T, r_max) = (", T, ", ", r_max,
                    ") or (S, T, r_max), got ", shape_str(hidden.sizes()));
  const int64_t S = hidden.dim() == 3 ? hidden.size(0) : 1;
  TORCH_CHECK_VALUE(S >= 1 && S <= kMultiLoraMaxSlices, "lrkernels.", op, ": hidden must have 1 to ",
                    kMultiLoraMaxSlices, " slices, got ", S);
  std::vector<int64_t> sizes;
  if (slice_sizes.has_value()) {
    sizes.assign(slice_sizes->begin(), slice_sizes->end());
  } else {
    TORCH_CHECK_VALUE(out_total % S == 0, "lrkernels.", op, ": slice_sizes is None, so lora_b's out_total = ",
                      out_total, " must split evenly into the ", S, " hidden slices");
    sizes.assign(S, out_total / S);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(sizes.size()) == S, "lrkernels.", op, ": slice_sizes has ", sizes.size(),
                    " entries but hidden has ", S, " slices");
  int64_t sum = 0;
  for (int64_t v : sizes) {
    TORCH_CHECK_VALUE(v >= 0, "lrkernels.", op, ": slice_sizes must be non-negative, got ", v);
    sum += v;
  }
  TORCH_CHECK_VALUE(sum == out_total, "lrkernels.", op, ": slice_sizes must sum to lora_b's out_total = ",
                    out_total, ", got ", sum);
  TORCH_CHECK_VALUE(adapter_ids.dim() == 1 && adapter_ids.size(0) == T, "lrkernels.", op,
                    ": adapter_ids must have shape (T,) = (", T, ",), got ", shape_str(adapter_ids.sizes()));
  check_adapter_ids(adapter_ids, y, L, op);
  check_scales(scales, y, L, op);
  check_ranks(ranks, y, L, r_max, op);
  check_segments(token_order, adapter_offsets, y, T, L, op);
  return ExpandShapes{T, out_total, S, L, r_max, sizes};
}

// Stable grouping of tokens by adapter, computed on the tensors' device with no host
// synchronisation: sort keys (id, or L for base-only / out-of-range ids), then the segment
// starts by binary search. Shared by the CPU and CUDA kernels of multi_lora_segments.
inline std::tuple<at::Tensor, at::Tensor> group_tokens_by_adapter(const at::Tensor& ids_flat, int64_t L) {
  const at::Tensor ids = ids_flat.to(at::kLong);
  const at::Tensor valid = (ids >= 0).logical_and(ids < L);
  const at::Tensor keys = at::where(valid, ids, at::full({}, L, ids.options()));
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted).to(at::kInt);
  const at::Tensor bounds = at::arange(L + 1, ids.options());
  const at::Tensor offsets = at::searchsorted(std::get<0>(sorted), bounds, /*out_int32=*/true, /*right=*/false);
  return {order, offsets};
}

}  // namespace lrkernels
