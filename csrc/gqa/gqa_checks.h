// Argument validation for gqa_attention and its backward, shared by the CPU kernels (gqa_cpu.cpp)
// and the CUDA ones (gqa_cuda.cu) so both reject the same inputs with the same messages. Contents
// of kv_lens are checked by the CPU op per call; the CUDA kernels cannot without a host sync and
// clamp them to [0, kv_len] instead.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace lrkernels {

constexpr int64_t kGqaMaxHeadDim = 256;

struct GqaShapes {
  int64_t B, Hq, Hkv, G, Sq, Sk, D;
};

inline GqaShapes check_gqa_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                double scale, const std::optional<at::Tensor>& kv_lens,
                                const std::optional<at::Tensor>& attn_mask) {
  check_float_input(q, op, "q");
  check_dim(q, 4, op, "q", "(batch, q_heads, q_len, head_dim)");
  check_like(k, q, op, "k", "q");
  check_like(v, q, op, "v", "q");
  check_dim(k, 4, op, "k", "(batch, kv_heads, kv_len, head_dim)");
  check_dim(v, 4, op, "v", "(batch, kv_heads, kv_len, head_dim)");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK_VALUE(D >= 1 && D <= kGqaMaxHeadDim, "lrkernels.", op, ": q's head_dim must be in [1, ",
                    kGqaMaxHeadDim, "], got q of shape ", shape_str(q.sizes()));
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "lrkernels.", op,
                    ": k must have shape (batch, kv_heads, kv_len, head_dim) with q's batch = ", B,
                    " and head_dim = ", D, ", got ", shape_str(k.sizes()));
  TORCH_CHECK_VALUE(Hkv >= 1, "lrkernels.", op, ": k must have at least one head, got shape ",
                    shape_str(k.sizes()));
  TORCH_CHECK_VALUE(Hq % Hkv == 0, "lrkernels.", op, ": q's head count (", Hq,
                    ") must be a multiple of k's head count (", Hkv, ")");
  check_shape(v, k.sizes(), op, "v", "k's shape");
  TORCH_CHECK_VALUE(std::isfinite(scale), "lrkernels.", op, ": scale must be finite, got ", scale);
  if (kv_lens.has_value() && kv_lens->defined()) {
    const at::Tensor& t = *kv_lens;
    TORCH_CHECK_VALUE(t.device() == q.device(), "lrkernels.", op, ": kv_lens is on ", t.device(), " but q is on ",
                      q.device(), "; all tensors must be on one device");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "lrkernels.", op,
                     ": kv_lens must be int32 or int64, got ", t.scalar_type());
    check_shape(t, {B}, op, "kv_lens", "(batch,)");
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_VALUE(m.device() == q.device(), "lrkernels.", op, ": attn_mask is on ", m.device(), " but q is on ",
                      q.device(), "; all tensors must be on one device");
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat ||
                         m.scalar_type() == at::kDouble || m.scalar_type() == at::kBFloat16 ||
                         m.scalar_type() == at::kHalf,
                     "lrkernels.", op, ": attn_mask must be bool (True = attend) or a floating additive mask, got ",
                     m.scalar_type());
    const int64_t full[4] = {B, Hq, Sq, Sk};
    bool ok = m.dim() <= 4;
    for (int64_t d = 0; ok && d < m.dim(); ++d) {
      const int64_t s = m.size(m.dim() - 1 - d), want = full[3 - d];
      ok = s == 1 || s == want;
    }
    TORCH_CHECK_VALUE(ok, "lrkernels.", op, ": attn_mask of shape ", shape_str(m.sizes()),
                      " does not broadcast to (batch, q_heads, q_len, kv_len) = ", shape_str(full));
  }
  return {B, Hq, Hkv, Hq / Hkv, Sq, Sk, D};
}

inline void check_gqa_grad_args(const char* op, const GqaShapes& sh, const at::Tensor& q, const at::Tensor& grad_o,
                                const at::Tensor& o, const at::Tensor& lse) {
  check_like(grad_o, q, op, "grad_o", "q");
  check_like(o, q, op, "o", "q");
  check_shape(grad_o, q.sizes(), op, "grad_o", "q's shape");
  check_shape(o, q.sizes(), op, "o", "q's shape (the forward's output)");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lrkernels.", op, ": lse is on ", lse.device(), " but q is on ",
                    q.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "lrkernels.", op, ": lse must be ", acc,
                   " (the forward's second output), got ", lse.scalar_type());
  check_shape(lse, {sh.B, sh.Hq, sh.Sq}, op, "lse", "(batch, q_heads, q_len) (the forward's second output)");
}

}  // namespace lrkernels
