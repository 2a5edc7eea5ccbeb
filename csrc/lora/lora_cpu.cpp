// lora_linear on CPU: the same semantics as the CUDA kernels, built from ATen GEMMs plus one
// parallel pass for the dropout mask (the same Philox draw as on the GPU). The low-rank path
// runs in the accumulation dtype (float64 for float64 inputs, float32 otherwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/dropout.h"
#include "common/dropout_cpu.h"
#include "lora/lora_checks.h"

namespace lrkernels {
namespace {

// drop(x) in the accumulation dtype, in one pass.
at::Tensor dropped_input(const at::Tensor& x2, const DropoutParams& d, at::ScalarType acc) {
  if (d.threshold == 0) return x2.to(acc);
  const int64_t rows = x2.size(0), cols = x2.size(1);
  auto out = at::empty({rows, cols}, x2.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x2.scalar_type(), "lora_dropout_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    const acc_t ks = static_cast<acc_t>(d.keep_scale);
    for_each_dropout_group(rows, cols, d, [&](int64_t r, int64_t g, uint32_t bits) {
      const int64_t base = r * cols + g * 8;
      const int n = static_cast<int>(std::min<int64_t>(8, cols - g * 8));
      for (int e = 0; e < n; ++e)
        op[base + e] = ((bits >> e) & 1u) ? static_cast<acc_t>(xp[base + e]) * ks : acc_t(0);
    });
  });
  return out;
}

// grad_x += drop'(dl), and, when xd is given, xd = drop(x): one pass, one mask draw.
void dropout_backward_pass(const at::Tensor& x2, const at::Tensor& dl, at::Tensor& dx, at::Tensor* xd,
                           const DropoutParams& d) {
  const int64_t rows = x2.size(0), cols = x2.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x2.scalar_type(), "lora_dropout_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    const acc_t* lp = dl.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    acc_t* xdp = xd ? xd->data_ptr<acc_t>() : nullptr;
    const acc_t ks = static_cast<acc_t>(d.keep_scale);
    for_each_dropout_group(rows, cols, d, [&](int64_t r, int64_t g, uint32_t bits) {
      const int64_t base = r * cols + g * 8;
      const int n = static_cast<int>(std::min<int64_t>(8, cols - g * 8));
      for (int e = 0; e < n; ++e) {
        const bool keep = (bits >> e) & 1u;
        if (keep) dxp[base + e] = static_cast<scalar_t>(static_cast<acc_t>(dxp[base + e]) + lp[base + e] * ks);
        if (xdp) xdp[base + e] = keep ? static_cast<acc_t>(xp[base + e]) * ks : acc_t(0);
      }
    });
  });
}

// (s · g) as a (r,) vector in the accumulation dtype.
at::Tensor rank_gain(const at::Tensor* g, double scale, int64_t r, const at::TensorOptions& opts) {
  if (g == nullptr) return at::full({r}, scale, opts);
  return g->to(opts.dtype()) * scale;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, double scale,
                                                   const std::optional<at::Tensor>& rank_scale,
                                                   const std::optional<at::Tensor>& out_scale, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  const char* op = "lora_linear";
  const LoraShapes sh = check_lora_args(op, x, weight, bias, lora_a, lora_b, scale, rank_scale, out_scale);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const auto acc = lora_acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  at::Tensor y = opt_ptr(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor hidden = at::mm(dropped_input(x2, d, acc), lora_a.to(acc).t());
  const at::Tensor h = hidden * rank_gain(opt_ptr(rank_scale), scale, sh.rank, acc_opts);
  at::Tensor b_eff = lora_b.to(acc);
  // ((h Bᵀ) ⊙ o) = h (o ⊙ B)ᵀ: the output scale folds into B's rows.
  if (const at::Tensor* o = opt_ptr(out_scale)) b_eff = b_eff * o->to(acc).unsqueeze(1);
  if (y.scalar_type() == acc) {
    y.addmm_(h, b_eff.t());
  } else {
    y.add_(at::mm(h, b_eff.t()));
  }
  return {y.view(lora_out_shape(x, sh.out_features)), hidden.view(lora_out_shape(x, sh.rank))};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& hidden, double scale,
                         const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& out_scale,
                         double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 7> mask) {
  const char* op = "lora_linear_backward";
  const LoraShapes sh = check_lora_backward_args(op, grad_out, x, weight, lora_a, lora_b, hidden, scale, rank_scale,
                                                 out_scale, mask);
  const auto acc = lora_acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const DropoutParams d = make_dropout_params(dropout_p, seed, x, op);
  const auto [want_x, want_w, want_bias, want_a, want_b, want_g, want_o] = mask;
  const at::Tensor* g = opt_ptr(rank_scale);
  const at::Tensor* o = opt_ptr(out_scale);

  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor hid = hidden.reshape({sh.tokens, sh.rank});
  std::optional<at::Tensor> gx, gw, gbias, ga, gb, gg, go;

  if (want_w) gw = at::mm(dy2.t(), x2);
  if (want_bias) gbias = dy2.sum(0);
  const bool need_dh = want_x || want_a || (want_g && g);
  if (need_dh || want_b || want_o) {
    const at::Tensor dya = dy2.to(acc);
    const at::Tensor b_acc = lora_b.to(acc);
    const at::Tensor gain = rank_gain(g, scale, sh.rank, acc_opts);
    if (want_b || want_o) {
      // P = dyᵀ h; ∂L/∂B = o ⊙ P (row-wise), ∂L/∂o = Σ_j B ⊙ P.
      const at::Tensor p = at::mm(dya.t(), hid * gain);
      if (want_b) gb = (o ? p * o->to(acc).unsqueeze(1) : p).to(x.scalar_type());
      if (want_o && o) go = (p * b_acc).sum(1).to(x.scalar_type());
    }
    if (need_dh) {
      const at::Tensor b_eff = o ? b_acc * o->to(acc).unsqueeze(1) : b_acc;
      const at::Tensor dh = at::mm(dya, b_eff);  // ∂L/∂h
      if (want_g && g) gg = ((dh * hid).sum(0) * scale).to(x.scalar_type());
      const at::Tensor du = dh * gain;          // ∂L/∂u
      const at::Tensor a_acc = lora_a.to(acc);
      at::Tensor xd;
      if (want_x) {
        at::Tensor dx = at::mm(dy2, weight);
        if (d.threshold == 0) {
          if (dx.scalar_type() == acc) dx.addmm_(du, a_acc);
          else dx.add_(at::mm(du, a_acc));
        } else {
          if (want_a) xd = at::empty({sh.tokens, sh.in_features}, acc_opts);
          dropout_backward_pass(x2, at::mm(du, a_acc), dx, want_a ? &xd : nullptr, d);
        }
        gx = dx.view(x.sizes());
      }
      if (want_a) {
        if (!xd.defined()) xd = dropped_input(x2, d, acc);
        ga = at::mm(du.t(), xd).to(x.scalar_type());
      }
    }
  }
  return {gx, gw, gbias, ga, gb, gg, go};
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace lrkernels
