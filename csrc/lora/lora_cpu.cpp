// lora_linear on CPU: the same semantics as the CUDA kernels, built from ATen GEMMs plus one
// parallel pass for the dropout mask (the same Philox draw as on the GPU). The low-rank path
// runs in the accumulation dtype (float64 for float64 inputs, float32 otherwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

#include "common/fused_cpu.h"
#include "common/parallel_cpu.h"
#include "common/dropout.h"
#include "common/dropout_cpu.h"
#include "lora/lora_checks.h"
#include "lora/lora_cpu_vec.h"

namespace lrkernels {
namespace {

// The dropout paths work on blocks of rows: each block's mask is drawn once, the dropped
// rows live only in a cache-sized buffer, and the rank-r products on the block run in BLAS.
// x is read once per pass and drop(x) is never materialised at full size.
constexpr int64_t kRowBlock = 64;

// Writes drop(x)[t0 : t0 + nb] (accumulation dtype) into xd; keep bits of each row into bits.
template <typename scalar_t, typename acc_t>
void dropped_rows(const scalar_t* x, int64_t t0, int64_t nb, int64_t cols, const DropoutParams& d,
                  acc_t* xd, uint32_t* bits) {
  const uint64_t seed = static_cast<uint64_t>(*d.seed);
  const int64_t groups = (cols + 7) / 8;
  const acc_t ks = static_cast<acc_t>(d.keep_scale);
  for (int64_t i = 0; i < nb; ++i) {
    uint32_t* rb = bits + i * groups;
    dropout_row_keep_bits(seed, t0 + i, groups, d.threshold, rb);
    const scalar_t* xr = x + (t0 + i) * cols;
    acc_t* o = xd + i * cols;
    for (int64_t k = 0; k < cols; ++k) o[k] = ((rb[k >> 3] >> (k & 7)) & 1u) ? static_cast<acc_t>(xr[k]) * ks : acc_t(0);
  }
}

// hidden = drop(x) Aᵀ, with a_acc = A in the accumulation dtype.
at::Tensor shrink_with_dropout(const at::Tensor& x2, const at::Tensor& a_acc, const DropoutParams& d) {
  const int64_t rows = x2.size(0), cols = x2.size(1), r = a_acc.size(0);
  const auto acc_opts = x2.options().dtype(a_acc.scalar_type());
  at::Tensor hidden = at::empty({rows, r}, acc_opts);
  const at::Tensor at_ = a_acc.t();
  const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x2.scalar_type(), "lora_shrink_dropout_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> xd(static_cast<size_t>(kRowBlock * cols));
      std::vector<uint32_t> bits(static_cast<size_t>(kRowBlock * ((cols + 7) / 8)));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * kRowBlock, nb = std::min(kRowBlock, rows - t0);
        dropped_rows(xp, t0, nb, cols, d, xd.data(), bits.data());
        at::Tensor out = hidden.narrow(0, t0, nb);
        at::mm_out(out, at::from_blob(xd.data(), {nb, cols}, acc_opts), at_);
      }
    });
  });
  return hidden;
}

// The pass over x in backward: writes dx = drop'(du A) when dx is given (the caller then
// adds dy W with a beta = 1 GEMM), and returns grad_a = duᵀ drop(x) (accumulation dtype)
// when want_a. One mask draw per row.
at::Tensor grad_in_with_dropout(const at::Tensor& x2, const at::Tensor& du, const at::Tensor& a_acc, at::Tensor* dx,
                                bool want_a, const DropoutParams& d) {
  const int64_t rows = x2.size(0), cols = x2.size(1), r = a_acc.size(0);
  const auto acc_opts = x2.options().dtype(a_acc.scalar_type());
  const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
  const int nthreads = at::get_num_threads();
  at::Tensor partial = want_a ? at::zeros({nthreads, r, cols}, acc_opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x2.scalar_type(), "lora_grad_in_dropout_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    scalar_t* dxp = dx ? dx->data_ptr<scalar_t>() : nullptr;
    const acc_t ks = static_cast<acc_t>(d.keep_scale);
    const int64_t groups = (cols + 7) / 8;
    parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> xd(static_cast<size_t>(kRowBlock * cols));
      std::vector<acc_t> dl(dxp ? static_cast<size_t>(kRowBlock * cols) : 0);
      std::vector<uint32_t> bits(static_cast<size_t>(kRowBlock * groups));
      at::Tensor mine = want_a ? partial[at::get_thread_num()] : at::Tensor();
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t t0 = blk * kRowBlock, nb = std::min(kRowBlock, rows - t0);
        dropped_rows(xp, t0, nb, cols, d, xd.data(), bits.data());
        const at::Tensor du_blk = du.narrow(0, t0, nb);
        if (want_a) mine.addmm_(du_blk.t(), at::from_blob(xd.data(), {nb, cols}, acc_opts));
        if (dxp) {
          at::Tensor dlt = at::from_blob(dl.data(), {nb, cols}, acc_opts);
          at::mm_out(dlt, du_blk, a_acc);
          for (int64_t i = 0; i < nb; ++i) {
            const uint32_t* rb = bits.data() + i * groups;
            scalar_t* o = dxp + (t0 + i) * cols;
            const acc_t* l = dl.data() + i * cols;
            for (int64_t k = 0; k < cols; ++k)
              o[k] = ((rb[k >> 3] >> (k & 7)) & 1u) ? static_cast<scalar_t>(l[k] * ks) : scalar_t(0);
          }
        }
      }
    });
  });
  return want_a ? partial.sum(0) : at::Tensor();
}

// The pass over dy in backward, in row blocks so each block of dy is read from memory once
// for both products: P = dyᵀ h (when h is defined) and dh = dy b_eff (when b_eff is).
std::pair<at::Tensor, at::Tensor> grad_out_pass(const at::Tensor& dya, const at::Tensor& h, const at::Tensor& b_eff) {
  const int64_t rows = dya.size(0), out = dya.size(1);
  const int64_t r = h.defined() ? h.size(1) : b_eff.size(1);
  const auto opts = dya.options();
  const int nthreads = at::get_num_threads();
  at::Tensor partial = h.defined() ? at::zeros({nthreads, out, r}, opts) : at::Tensor();
  at::Tensor dh = b_eff.defined() ? at::empty({rows, r}, opts) : at::Tensor();
  constexpr int64_t kBlock = 128;
  const int64_t nblocks = (rows + kBlock - 1) / kBlock;
  parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor mine = h.defined() ? partial[at::get_thread_num()] : at::Tensor();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kBlock, nb = std::min(kBlock, rows - t0);
      const at::Tensor dy_blk = dya.narrow(0, t0, nb);
      if (h.defined()) mine.addmm_(dy_blk.t(), h.narrow(0, t0, nb));
      if (b_eff.defined()) {
        at::Tensor dst = dh.narrow(0, t0, nb);
        at::mm_out(dst, dy_blk, b_eff);
      }
    }
  });
  return {h.defined() ? partial.sum(0) : at::Tensor(), dh};
}

// (s · g) as a (r,) vector in the accumulation dtype.
at::Tensor rank_gain(const at::Tensor* g, double scale, int64_t r, const at::TensorOptions& opts) {
  if (g == nullptr) return at::full({r}, scale, opts);
  return g->to(opts.dtype()) * scale;
}

// ---- the blocked path (float32 / bfloat16 activations; lora_cpu_vec.h) ---------------------
//
// Rows are processed in blocks, one block at a time per thread, and each block does all of its
// work while it is in cache: forward = shrink (with the mask) → base GEMM of the block (BLAS,
// single-threaded inside the parallel region) → rank-r expand into the fresh output rows;
// backward = one pass over the dy block for ∂L/∂h and dyᵀh → the block's dx GEMM → one pass
// over the x block for dA and the rank-r part of dx (the mask regenerated). Compared with the
// ATen path this drops the separate trips through memory over x, y, dy and dx.

LoraVecDropout vec_dropout(const DropoutParams& d) {
  LoraVecDropout rd;
  if (d.threshold) {
    rd.seed = static_cast<uint64_t>(*d.seed);
    rd.threshold = d.threshold;
    rd.keep_scale = d.keep_scale;
  }
  return rd;
}

// A float32 copy of m (rows, cols) with its rows zero-padded to lora_vec_pad(cols).
at::Tensor padded_f32(const at::Tensor& m) {
  at::Tensor out = at::zeros({m.size(0), lora_vec_pad(m.size(1))}, m.options().dtype(at::kFloat));
  out.narrow(1, 0, m.size(1)).copy_(m);
  return out;
}

// E: float or c10::BFloat16 (x's dtype). The low-rank side is float32.
// bt = (r, out): row j is gain[j] · (o ⊙ B[:, j]), so the expand reads the saved hidden as is.
template <typename E>
std::tuple<at::Tensor, at::Tensor> forward_fused(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor* bias,
                                                 const at::Tensor& lora_a, const at::Tensor& bt,
                                                 const DropoutParams& d) {
  const int64_t rows = x2.size(0), in = x2.size(1), out = weight.size(0), r = lora_a.size(0);
  const auto f32 = x2.options().dtype(at::kFloat);
  const at::Tensor at_pad = padded_f32(lora_a.t());  // (in, rp)
  const at::Tensor bt_pad = padded_f32(bt);          // (r, outp)
  at::Tensor hidden = at::empty({rows, r}, f32);
  at::Tensor y = at::empty({rows, out}, x2.options());
  if (rows == 0) return {y, hidden};
  const at::Tensor wt = weight.t();
  const LoraVecDropout rd = vec_dropout(d);
  const LoraVecOps<E>& k = lora_vec_ops<E>();
  const int64_t rb = fused_row_block(rows), nblocks = (rows + rb - 1) / rb;
  const E* xp = x2.data_ptr<E>();
  const float* ap = at_pad.data_ptr<float>();
  const float* btp = bt_pad.data_ptr<float>();
  const int64_t ldb = bt_pad.size(1);
  float* hp = hidden.data_ptr<float>();
  E* yp = y.data_ptr<E>();
  // float32: the base GEMM one row block at a time, inside the block loop (the block is still
  // in cache for the shrink and expand). bfloat16: one GEMM over all rows on all threads first:
  // the bf16 GEMM packs W again on every call, which per block cost ~25% over the base linear.
  // The result is the same either way (y = x Wᵀ + b in E, then the rank-r part added to it).
  constexpr bool whole_gemm = std::is_same_v<E, c10::BFloat16>;
  if (whole_gemm) {
    if (bias)
      at::addmm_out(y, *bias, x2, wt);
    else
      at::mm_out(y, x2, wt);
  }
  parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(static_cast<size_t>(lora_vec_scratch_floats(in)));
    std::vector<uint32_t> bits(static_cast<size_t>(lora_vec_scratch_bits(in)));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * rb, nb = std::min(rb, rows - t0);
      k.shrink(xp + t0 * in, in, t0, nb, in, ap, r, hp + t0 * r, r, rd, scratch.data(), bits.data());
      if (!whole_gemm) {
        at::Tensor yb = y.narrow(0, t0, nb);
        const at::Tensor xb = x2.narrow(0, t0, nb);
        if (bias)
          at::addmm_out(yb, *bias, xb, wt);
        else
          at::mm_out(yb, xb, wt);
      }
      k.expand_acc(yp + t0 * out, out, nb, out, hp + t0 * r, r, r, btp, ldb);
    }
  });
  return {y, hidden};
}

struct FusedGrads {
  at::Tensor dx, p, dh, da;  // each defined only when asked for
};

// b_eff = o ⊙ B (out, r); gain = s · g (r,). want_p: P = dyᵀ (hidden ⊙ gain); need_dh: ∂L/∂h.
// dx comes back in x's dtype, the rest in float32.
template <typename E>
FusedGrads backward_fused(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& weight,
                          const at::Tensor& lora_a, const at::Tensor& b_eff, const at::Tensor& gain,
                          const at::Tensor& hid, bool want_x, bool want_a, bool want_p, bool need_dh,
                          const DropoutParams& d) {
  const int64_t rows = x2.size(0), in = x2.size(1), out = dy2.size(1), r = lora_a.size(0);
  const int64_t rp = lora_vec_pad(r), inp = lora_vec_pad(in);
  const auto opts = x2.options().dtype(at::kFloat);
  const int nthreads = at::get_num_threads();
  const bool want_du = want_x || want_a;
  FusedGrads g;
  at::Tensor beff_pad, hg_pad, du;
  if (need_dh) {
    beff_pad = padded_f32(b_eff);  // (out, rp)
    g.dh = at::empty({rows, rp}, opts);
  }
  if (want_p) {
    hg_pad = padded_f32(hid * gain);  // (rows, rp)
    g.p = at::zeros({nthreads, out, rp}, opts);
  }
  if (want_du) du = at::empty({rows, r}, opts);
  if (want_a) g.da = at::zeros({nthreads, r, inp}, opts);
  if (want_x) g.dx = at::empty({rows, in}, x2.options());
  const at::Tensor a_pad = padded_f32(lora_a);  // (r, inp)
  const LoraVecDropout rd = vec_dropout(d);
  const LoraVecOps<E>& k = lora_vec_ops<E>();
  const int64_t rb = fused_row_block(rows), nblocks = (rows + rb - 1) / rb;
  const float* gainp = gain.data_ptr<float>();
  const E* dyp = dy2.data_ptr<E>();
  const E* xp = x2.data_ptr<E>();
  constexpr bool whole_gemm = std::is_same_v<E, c10::BFloat16>;  // as in forward_fused
  if (want_x && whole_gemm) at::mm_out(g.dx, dy2, weight);
  parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    float* pp = want_p ? g.p[tid].data_ptr<float>() : nullptr;
    float* dap = want_a ? g.da[tid].data_ptr<float>() : nullptr;
    std::vector<float> scratch(static_cast<size_t>(lora_vec_scratch_floats(std::max(in, out))));
    std::vector<uint32_t> bits(static_cast<size_t>(lora_vec_scratch_bits(in)));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * rb, nb = std::min(rb, rows - t0);
      float* dhp = need_dh ? g.dh.data_ptr<float>() + t0 * rp : nullptr;
      k.grad_out(dyp + t0 * out, out, nb, out, rp, need_dh ? beff_pad.data_ptr<float>() : nullptr,
                 want_p ? hg_pad.data_ptr<float>() + t0 * rp : nullptr, dhp, pp, scratch.data());
      if (!want_du) continue;
      float* dup = du.data_ptr<float>() + t0 * r;
      for (int64_t t = 0; t < nb; ++t)
        for (int64_t j = 0; j < r; ++j) dup[t * r + j] = dhp[t * rp + j] * gainp[j];
      if (want_x && !whole_gemm) {
        at::Tensor dxb = g.dx.narrow(0, t0, nb);
        at::mm_out(dxb, dy2.narrow(0, t0, nb), weight);
      }
      k.grad_in(xp + t0 * in, in, t0, nb, in, dup, r, r, a_pad.data_ptr<float>(), inp, dap,
                want_x ? g.dx.data_ptr<E>() + t0 * in : nullptr, in, rd, scratch.data(), bits.data());
    }
  });
  if (want_p) g.p = g.p.sum(0).narrow(1, 0, r);
  if (need_dh) g.dh = g.dh.narrow(1, 0, r);
  if (want_a) g.da = g.da.sum(0).narrow(1, 0, in);
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
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
  const auto acc = lora_acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor a_acc = lora_a.to(acc);
  const at::Tensor gain = rank_gain(opt_ptr(rank_scale), scale, sh.rank, acc_opts);
  at::Tensor b_eff = lora_b.to(acc);
  // ((h Bᵀ) ⊙ o) = h (o ⊙ B)ᵀ: the output scale folds into B's rows.
  if (const at::Tensor* o = opt_ptr(out_scale)) b_eff = b_eff * o->to(acc).unsqueeze(1);
  if (use_fused_cpu(x, sh.tokens, /*min_rows_per_thread=*/128, /*bfloat16=*/true)) {
    const at::Tensor bt = (b_eff * gain.unsqueeze(0)).t();
    auto [y, hidden] = x.scalar_type() == at::kFloat
                           ? forward_fused<float>(x2, weight, opt_ptr(bias), a_acc, bt, d)
                           : forward_fused<c10::BFloat16>(x2, weight, opt_ptr(bias), a_acc, bt, d);
    return {y.view(with_last_dim(x, sh.out_features)), hidden.view(with_last_dim(x, sh.rank))};
  }
  at::Tensor hidden = d.threshold ? shrink_with_dropout(x2, a_acc, d) : at::mm(x2.to(acc), a_acc.t());
  const at::Tensor h = hidden * gain;
  // The rank-r term (and the bias) is written first; the base GEMM then accumulates into it
  // with beta = 1, reading y inside its own tiles, so y takes no extra pass through memory.
  at::Tensor y = opt_ptr(bias) ? at::addmm(bias->to(acc), h, b_eff.t()) : at::mm(h, b_eff.t());
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  y.addmm_(x2, weight.t());
  return {y.view(with_last_dim(x, sh.out_features)), hidden.view(with_last_dim(x, sh.rank))};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& hidden, double scale,
                         const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& out_scale,
                         double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 7> mask) {
  const char* op = "lora_linear_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
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
    const at::Tensor b_acc = lora_b.to(acc);
    const at::Tensor gain = rank_gain(g, scale, sh.rank, acc_opts);
    const at::Tensor b_eff = o ? b_acc * o->to(acc).unsqueeze(1) : b_acc;
    if (use_fused_cpu(x, sh.tokens, /*min_rows_per_thread=*/32, /*bfloat16=*/true)) {
      const auto run = x.scalar_type() == at::kFloat ? &backward_fused<float> : &backward_fused<c10::BFloat16>;
      FusedGrads fg = run(dy2, x2, weight, lora_a, b_eff, gain, hid.contiguous(), want_x, want_a, want_b || want_o,
                          need_dh, d);
      if (want_b) gb = (o ? fg.p * o->to(acc).unsqueeze(1) : fg.p).to(lora_b.scalar_type());
      if (want_o && o) go = (fg.p * b_acc).sum(1).to(o->scalar_type());
      if (want_g && g) gg = ((fg.dh * hid).sum(0) * scale).to(g->scalar_type());
      if (want_a) ga = fg.da.to(lora_a.scalar_type());
      if (want_x) gx = fg.dx.view(x.sizes());
      return {gx, gw, gbias, ga, gb, gg, go};
    }
    // P = dyᵀ h and ∂L/∂h = dy (o ⊙ B) in one pass over dy.
    const at::Tensor dya = dy2.to(acc);
    auto [p, dh] = grad_out_pass(dya, (want_b || want_o) ? (hid * gain).contiguous() : at::Tensor(),
                                 need_dh ? b_eff.contiguous() : at::Tensor());
    // ∂L/∂B = o ⊙ P (row-wise), ∂L/∂o = Σ_j B ⊙ P.
    if (want_b) gb = (o ? p * o->to(acc).unsqueeze(1) : p).to(lora_b.scalar_type());
    if (want_o && o) go = (p * b_acc).sum(1).to(o->scalar_type());
    if (need_dh) {
      if (want_g && g) gg = ((dh * hid).sum(0) * scale).to(g->scalar_type());
      const at::Tensor du = (dh * gain).contiguous();  // ∂L/∂u
      const at::Tensor a_acc = lora_a.to(acc).contiguous();
      at::Tensor dx;
      if (d.threshold == 0) {
        if (want_x) dx = at::mm(du, a_acc).to(x.scalar_type());
        if (want_a) ga = at::mm(du.t(), x2.to(acc)).to(lora_a.scalar_type());
      } else {
        if (want_x) dx = at::empty({sh.tokens, sh.in_features}, x.options());
        at::Tensor ga_acc = grad_in_with_dropout(x2, du, a_acc, want_x ? &dx : nullptr, want_a, d);
        if (want_a) ga = ga_acc.to(lora_a.scalar_type());
      }
      if (want_x) {
        dx.addmm_(dy2, weight);  // the base GEMM accumulates onto the rank-r part (beta = 1)
        gx = dx.view(x.sizes());
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
