// Multi-LoRA on CPU. The grouping (multi_lora_segments) lists each adapter's tokens
// contiguously; one task per adapter present in the batch then gathers its tokens' rows of x,
// runs the two low-rank GEMMs at that adapter's own rank and adds the update straight into
// its tokens' rows of y. So the cost is one small GEMM pair per adapter, not one masked pass
// over the whole batch per adapter, and no batch-sized gathered or update buffer is written.
// The per-adapter GEMMs are skinny (K or N = r): the tasks run in parallel across adapters,
// each single-threaded, rather than one after another with every thread meeting at a
// barrier per GEMM. Low-rank arithmetic runs in the accumulation dtype (float64 for float64
// inputs, float32 otherwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/dropout_cpu.h"
#include "common/fused_cpu.h"
#include "common/parallel_cpu.h"
#include "lora/lora_cpu_vec.h"
#include "multi_lora/multi_lora_checks.h"

namespace lrkernels {
namespace {

// The grouping as host values: the valid tokens in adapter order, and per-adapter segments.
struct HostGroups {
  at::Tensor idx;                // (n_valid,) int64: token_order[:offsets[L]]
  std::vector<int64_t> offsets;  // L + 1 entries
  std::vector<int64_t> ranks;    // L entries
  int64_t n_valid = 0;
};

HostGroups host_groups(const at::Tensor& order, const at::Tensor& offsets, const std::optional<at::Tensor>& ranks,
                       int64_t L, int64_t r_max) {
  HostGroups g;
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  g.offsets.assign(off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + off.numel());
  g.n_valid = g.offsets.back();
  g.idx = order.narrow(0, 0, g.n_valid).to(at::kLong);
  if (ranks.has_value() && ranks->defined()) {
    const at::Tensor rk = ranks->to(at::kLong).contiguous();
    g.ranks.assign(rk.data_ptr<int64_t>(), rk.data_ptr<int64_t>() + rk.numel());
  } else {
    g.ranks.assign(L, r_max);
  }
  return g;
}

std::vector<double> host_scales(const at::Tensor& scales) {
  const at::Tensor s = scales.to(at::kDouble).contiguous();
  return std::vector<double>(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
}

// The per-adapter options of multi_lora_linear in the accumulation dtype: rank gates g (L, r_max)
// and output scales o (L, out), undefined when absent, and the dropout parameters.
struct AdapterOptions {
  at::Tensor g, o;
  DropoutParams dropout;

  AdapterOptions(const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& out_scale,
                 const MultiLoraOptions& opts, at::ScalarType acc)
      : dropout(opts.dropout) {
    if (opts.has_rank_scale) g = rank_scale->to(acc);
    if (opts.has_out_scale) o = out_scale->to(acc);
  }
  // s · g[l, :r] ((r,)), or undefined without gates (the scale alone applies).
  at::Tensor gain(int64_t l, int64_t r, double s) const { return g.defined() ? g[l].narrow(0, 0, r) * s : at::Tensor(); }
  // o[l] ⊙ B rows: ((h Bᵀ) ⊙ o) = h (o ⊙ B)ᵀ, so the output scale folds into B's rows.
  at::Tensor b_eff(const at::Tensor& b_l, int64_t l) const { return o.defined() ? b_l * o[l].unsqueeze(1) : b_l; }
};

// The gathered rows drop(x)[idx] in the accumulation dtype (a fresh tensor; each row with the
// mask of its token, as lora_linear draws it for that row).
at::Tensor gather_dropped(const at::Tensor& x2, const at::Tensor& idx, const DropoutParams& d, at::ScalarType acc) {
  at::Tensor xg = x2.index_select(0, idx).to(acc).contiguous();
  if (d.threshold == 0) return xg;
  const at::Tensor ix = idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_drop_rows", [&] {
    drop_gathered_rows(xg.data_ptr<scalar_t>(), xg.size(0), xg.size(1), ix.data_ptr<int64_t>(), d);
  });
  return xg;
}

// Runs fn(l, first sorted position, token count, rank) for every adapter with tokens, in
// parallel across adapters (the blocks each call writes are disjoint).
template <typename F>
void for_each_adapter(const HostGroups& g, const F& fn) {
  const int64_t L = static_cast<int64_t>(g.ranks.size());
  // Worker threads start with default thread-local state: hand them the caller's (dispatch
  // keys excluded below autograd, inference mode), so the ATen calls inside stay kernels.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t l = begin; l < end; ++l) {
      const int64_t n = g.offsets[l + 1] - g.offsets[l];
      if (n > 0) fn(l, g.offsets[l], n, g.ranks[l]);
    }
  });
}

// y[idx[p]] += delta[p] for every sorted position p, rounding once to y's dtype. Tokens are
// distinct, so rows are independent and the loop runs in parallel. y's rows must be
// contiguous (stride(1) == 1); delta is in y's accumulation dtype.
void scatter_add_rows(at::Tensor& y2, const at::Tensor& idx, const at::Tensor& delta) {
  const int64_t n = idx.numel(), cols = delta.size(1);
  if (n == 0 || cols == 0) return;
  const at::Tensor d = delta.contiguous();
  const at::Tensor ix = idx.contiguous();
  const int64_t* ip = ix.data_ptr<int64_t>();
  const int64_t ldy = y2.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y2.scalar_type(), "multi_lora_scatter_add_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_INTERNAL_ASSERT(d.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    scalar_t* yp = y2.data_ptr<scalar_t>();
    const acc_t* dp = d.data_ptr<acc_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 16384 / cols), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* yr = yp + ip[p] * ldy;
        const acc_t* dr = dp + p * cols;
        for (int64_t c = 0; c < cols; ++c) yr[c] = static_cast<scalar_t>(static_cast<acc_t>(yr[c]) + dr[c]);
      }
    });
  });
}

// multi_lora_linear's blocked path (float32; the kernels of lora/lora_cpu_vec.h). Positions of
// the grouped order (each adapter's tokens contiguous, base-only tokens last) are cut into blocks; per block, its tokens' rows of
// x are gathered once into a cache-sized buffer, the block's base GEMM runs on it, then every
// adapter run inside the block does its shrink and expand (at its own rank) on the same rows
// while they are in cache, and the finished rows are copied out to y and hidden. One trip
// through memory for x and y, as for the base linear alone.
std::tuple<at::Tensor, at::Tensor> forward_fused(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor* bias,
                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                 const at::Tensor& order, const HostGroups& g,
                                                 const std::vector<double>& sc, const AdapterOptions& ao,
                                                 int64_t r_max) {
  const int64_t rows = x2.size(0), in = x2.size(1), out = weight.size(0);
  const int64_t L = static_cast<int64_t>(g.ranks.size());
  const auto opts = x2.options();
  at::Tensor y = at::empty({rows, out}, opts);
  at::Tensor hidden = at::zeros({rows, r_max}, opts);
  if (rows == 0) return {y, hidden};
  // Per adapter with tokens: Aᵀ and s·B[:, :r]ᵀ (gates and output scales folded in), rows
  // zero-padded (lora_vec_pad).
  std::vector<at::Tensor> at_l(L), bt_l(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t r = g.ranks[l];
    if (g.offsets[l + 1] == g.offsets[l] || r == 0) continue;
    at_l[l] = at::zeros({in, lora_vec_pad(r)}, opts);
    at_l[l].narrow(1, 0, r).copy_(lora_a[l].narrow(0, 0, r).t());
    // bt = (o ⊙ B) · diag(s · g), transposed: the expand reads the saved (ungated) hidden as is.
    const at::Tensor b_l = ao.b_eff(lora_b[l].narrow(1, 0, r).to(at::kFloat), l);
    const at::Tensor gain = ao.gain(l, r, sc[l]);
    bt_l[l] = at::zeros({r, lora_vec_pad(out)}, opts);
    bt_l[l].narrow(1, 0, out).copy_((gain.defined() ? b_l * gain.unsqueeze(0) : b_l * sc[l]).t());
  }
  const at::Tensor ord = order.to(at::kLong).contiguous();
  const int64_t* op = ord.data_ptr<int64_t>();
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* hp = hidden.data_ptr<float>();
  const at::Tensor wt = weight.t();
  const int64_t rb = fused_row_block(rows), nblocks = (rows + rb - 1) / rb;
  const LoraVecDropout no_dropout;
  const LoraVecOps<float>& k = lora_vec_ops<float>();
  parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor xb = at::empty({rb, in}, opts), yb = at::empty({rb, out}, opts), hb = at::empty({rb, r_max}, opts);
    std::vector<float> scratch(static_cast<size_t>(lora_vec_scratch_floats(in)));
    std::vector<uint32_t> bits(static_cast<size_t>(lora_vec_scratch_bits(in)));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p0 = blk * rb, nb = std::min(rb, rows - p0);
      float* xbp = xb.data_ptr<float>();
      float* ybp = yb.data_ptr<float>();
      float* hbp = hb.data_ptr<float>();
      for (int64_t i = 0; i < nb; ++i) std::memcpy(xbp + i * in, xp + op[p0 + i] * in, sizeof(float) * in);
      std::memset(hbp, 0, sizeof(float) * nb * r_max);
      at::Tensor yv = yb.narrow(0, 0, nb);
      const at::Tensor xv = xb.narrow(0, 0, nb);
      if (bias)
        at::addmm_out(yv, *bias, xv, wt);
      else
        at::mm_out(yv, xv, wt);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t q0 = std::max(p0, g.offsets[l]), q1 = std::min(p0 + nb, g.offsets[l + 1]);
        if (q1 <= q0 || !at_l[l].defined()) continue;
        const int64_t i0 = q0 - p0, n = q1 - q0, r = g.ranks[l];
        k.shrink(xbp + i0 * in, in, 0, n, in, at_l[l].data_ptr<float>(), r, hbp + i0 * r_max, r_max, no_dropout,
                 scratch.data(), bits.data());
        if (sc[l] != 0.0)
          k.expand_acc(ybp + i0 * out, out, n, out, hbp + i0 * r_max, r_max, r, bt_l[l].data_ptr<float>(),
                       bt_l[l].size(1));
      }
      for (int64_t i = 0; i < nb; ++i) {
        std::memcpy(yp + op[p0 + i] * out, ybp + i * out, sizeof(float) * out);
        std::memcpy(hp + op[p0 + i] * r_max, hbp + i * r_max, sizeof(float) * r_max);
      }
    }
  });
  return {y, hidden};
}

struct BlockedGrads {
  at::Tensor dx, ga, gb, gs, gg, go;  // each defined only when asked for; accumulation dtype
};

// multi_lora_linear_backward's blocked path (float32, no dropout), the backward of forward_fused:
// the grouped positions are cut into blocks; per block the rows of dy, x and hidden are gathered
// once, the block's dx = dy W GEMM runs on them, and every adapter run inside the block does its
// pass over dy (∂L/∂u = dy (o ⊙ B) and P += dyᵀ u, u = s·(g ⊙ h)) and its pass over x (dA and the
// rank-r part of dx) on the rows while they are in cache, with lora_linear's kernels at the
// adapter's own rank; the finished dx rows are copied out. P and dA are summed per thread and per
// adapter (allocated when a thread first meets the adapter: runs are contiguous, so each thread
// meets few) and reduced at the end.
BlockedGrads backward_fused(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& weight,
                            const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& hid,
                            const at::Tensor& order, const HostGroups& g, const std::vector<double>& sc,
                            const AdapterOptions& ao, int64_t r_max, bool want_x, bool want_a, bool want_b,
                            bool want_s, bool want_g, bool want_o) {
  const int64_t rows = x2.size(0), in = x2.size(1), out = dy2.size(1);
  const int64_t L = static_cast<int64_t>(g.ranks.size());
  const auto opts = x2.options();
  const bool want_p = want_b || want_o, need_dz = want_x || want_a || want_s || want_g, want_du = want_x || want_a;
  const int64_t inp = lora_vec_pad(in), rp_max = lora_vec_pad(std::max<int64_t>(r_max, 1));
  // Per adapter with tokens: o ⊙ B[:, :r] (out, rp), A[:r] (r, inp), the gain s·g (r,).
  std::vector<at::Tensor> beff_l(L), a_l(L), gain_l(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t r = g.ranks[l];
    if (g.offsets[l + 1] == g.offsets[l] || r == 0) continue;
    const int64_t rp = lora_vec_pad(r);
    beff_l[l] = at::zeros({out, rp}, opts);
    beff_l[l].narrow(1, 0, r).copy_(ao.b_eff(lora_b[l].narrow(1, 0, r), l));
    a_l[l] = at::zeros({r, inp}, opts);
    a_l[l].narrow(1, 0, in).copy_(lora_a[l].narrow(0, 0, r));
    const at::Tensor gain = ao.gain(l, r, sc[l]);
    gain_l[l] = (gain.defined() ? gain : at::full({r}, sc[l], opts)).contiguous();
  }
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<at::Tensor>> p_t(nthreads, std::vector<at::Tensor>(L)), da_t(nthreads, std::vector<at::Tensor>(L));
  at::Tensor gs_t = want_s ? at::zeros({nthreads, L}, opts.dtype(at::kDouble)) : at::Tensor();
  at::Tensor gg_t = want_g ? at::zeros({nthreads, L, r_max}, opts) : at::Tensor();
  BlockedGrads out_g;
  if (want_x) out_g.dx = at::empty({rows, in}, opts);
  const at::Tensor ord = order.to(at::kLong).contiguous();
  const int64_t* op = ord.data_ptr<int64_t>();
  const float* xp = x2.data_ptr<float>();
  const float* dyp = dy2.data_ptr<float>();
  const float* hp = hid.data_ptr<float>();
  const int64_t rb = fused_row_block(rows), nblocks = (rows + rb - 1) / rb;
  const LoraVecDropout no_dropout;
  const LoraVecOps<float>& k = lora_vec_ops<float>();
  parallel_for_caller_state(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    at::Tensor xb = at::empty({rb, in}, opts), dyb = at::empty({rb, out}, opts), dxb = at::empty({rb, in}, opts);
    std::vector<float> hb(static_cast<size_t>(rb * r_max)), hg(static_cast<size_t>(rb * rp_max)),
        dh(static_cast<size_t>(rb * rp_max)), du(static_cast<size_t>(rb * std::max<int64_t>(r_max, 1)));
    std::vector<float> scratch(static_cast<size_t>(lora_vec_scratch_floats(std::max(in, out))));
    std::vector<uint32_t> bits(static_cast<size_t>(lora_vec_scratch_bits(in)));
    double* gsp = want_s ? gs_t[tid].data_ptr<double>() : nullptr;
    float* ggp = want_g ? gg_t[tid].data_ptr<float>() : nullptr;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p0 = blk * rb, nb = std::min(rb, rows - p0);
      float* xbp = xb.data_ptr<float>();
      float* dybp = dyb.data_ptr<float>();
      float* dxbp = dxb.data_ptr<float>();
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t t = op[p0 + i];
        if (want_du) std::memcpy(xbp + i * in, xp + t * in, sizeof(float) * in);
        std::memcpy(dybp + i * out, dyp + t * out, sizeof(float) * out);
        std::memcpy(hb.data() + i * r_max, hp + t * r_max, sizeof(float) * r_max);
      }
      if (want_x) {
        at::Tensor dxv = dxb.narrow(0, 0, nb);
        at::mm_out(dxv, dyb.narrow(0, 0, nb), weight);
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t q0 = std::max(p0, g.offsets[l]), q1 = std::min(p0 + nb, g.offsets[l + 1]);
        if (q1 <= q0 || !beff_l[l].defined()) continue;
        const int64_t i0 = q0 - p0, n = q1 - q0, r = g.ranks[l], rp = lora_vec_pad(r);
        const float* gain = gain_l[l].data_ptr<float>();
        const float* gate = ao.g.defined() ? ao.g[l].data_ptr<float>() : nullptr;
        const float* hrow = hb.data() + i0 * r_max;
        if (want_p) {  // u = s·(g ⊙ h), rows padded to rp
          for (int64_t t = 0; t < n; ++t) {
            float* u = hg.data() + t * rp;
            for (int64_t j = 0; j < r; ++j) u[j] = hrow[t * r_max + j] * gain[j];
            for (int64_t j = r; j < rp; ++j) u[j] = 0.f;
          }
          if (!p_t[tid][l].defined()) p_t[tid][l] = at::zeros({out, rp}, opts);
        }
        k.grad_out(dybp + i0 * out, out, n, out, rp, need_dz ? beff_l[l].data_ptr<float>() : nullptr,
                   want_p ? hg.data() : nullptr, need_dz ? dh.data() : nullptr,
                   want_p ? p_t[tid][l].data_ptr<float>() : nullptr, scratch.data());
        if (!need_dz) continue;
        for (int64_t t = 0; t < n; ++t) {
          const float* d = dh.data() + t * rp;
          const float* h = hrow + t * r_max;
          if (gsp) {
            double acc = 0.0;
            for (int64_t j = 0; j < r; ++j) acc += static_cast<double>(d[j]) * h[j] * (gate ? gate[j] : 1.f);
            gsp[l] += acc;
          }
          if (ggp)
            for (int64_t j = 0; j < r; ++j) ggp[l * r_max + j] += static_cast<float>(sc[l]) * d[j] * h[j];
          if (want_du)
            for (int64_t j = 0; j < r; ++j) du[t * r + j] = d[j] * gain[j];
        }
        if (!want_du) continue;
        if (want_a && !da_t[tid][l].defined()) da_t[tid][l] = at::zeros({r, inp}, opts);
        k.grad_in(xbp + i0 * in, in, 0, n, in, du.data(), r, r, a_l[l].data_ptr<float>(), inp,
                  want_a ? da_t[tid][l].data_ptr<float>() : nullptr, want_x ? dxbp + i0 * in : nullptr, in,
                  no_dropout, scratch.data(), bits.data());
      }
      if (want_x) {
        float* dxp = out_g.dx.data_ptr<float>();
        for (int64_t i = 0; i < nb; ++i) std::memcpy(dxp + op[p0 + i] * in, dxbp + i * in, sizeof(float) * in);
      }
    }
  });
  if (want_a) out_g.ga = at::zeros({L, r_max, in}, opts);
  if (want_b) out_g.gb = at::zeros({L, out, r_max}, opts);
  if (want_o) out_g.go = at::zeros({L, out}, opts);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t r = g.ranks[l];
    at::Tensor p_sum, da_sum;
    for (int t = 0; t < nthreads; ++t) {
      if (p_t[t][l].defined()) p_sum = p_sum.defined() ? p_sum + p_t[t][l] : p_t[t][l];
      if (da_t[t][l].defined()) da_sum = da_sum.defined() ? da_sum + da_t[t][l] : da_t[t][l];
    }
    if (p_sum.defined()) {
      const at::Tensor p = p_sum.narrow(1, 0, r);
      if (want_b) out_g.gb[l].narrow(1, 0, r).copy_(ao.o.defined() ? p * ao.o[l].unsqueeze(1) : p);
      if (want_o) out_g.go[l].copy_((p * lora_b[l].narrow(1, 0, r)).sum(1));
    }
    if (da_sum.defined()) out_g.ga[l].narrow(0, 0, r).copy_(da_sum.narrow(1, 0, in));
  }
  if (want_s) out_g.gs = gs_t.sum(0).to(at::kFloat);
  if (want_g) out_g.gg = gg_t.sum(0);
  return out_g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_lora_segments_cpu(const at::Tensor& adapter_ids, int64_t num_adapters) {
  const char* op = "multi_lora_segments";
  TORCH_CHECK_TYPE(adapter_ids.scalar_type() == at::kInt || adapter_ids.scalar_type() == at::kLong, "lrkernels.",
                   op, ": adapter_ids must be int32 or int64, got ", adapter_ids.scalar_type());
  TORCH_CHECK_VALUE(num_adapters >= 0, "lrkernels.", op, ": num_adapters must be >= 0, got ", num_adapters);
  const at::Tensor flat = adapter_ids.reshape({-1});
  if (flat.numel() > 0) {
    const int64_t lo = flat.min().item<int64_t>(), hi = flat.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < num_adapters, "lrkernels.", op, ": adapter_ids must be in [-1, L) = [-1, ",
                      num_adapters, ") (-1: base model only), got ", (lo < -1 ? lo : hi));
  }
  return group_tokens_by_adapter(flat, num_adapters);
}

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& adapter_ids,
                           const at::Tensor& token_order, const at::Tensor& adapter_offsets,
                           const std::optional<at::Tensor>& ranks) {
  const char* op = "lora_shrink";
  const ShrinkShapes sh = check_shrink_args(op, x, lora_a, adapter_ids, token_order, adapter_offsets, ranks);
  const int64_t S = sh.slices, L = sh.num_adapters, r_max = sh.r_max, in = sh.in_features, T = sh.tokens;
  const bool sliced = lora_a.dim() == 4;
  const at::Tensor a4 = sliced ? lora_a : lora_a.unsqueeze(0);
  const auto acc = multi_lora_acc_dtype(x);
  const HostGroups g = host_groups(token_order, adapter_offsets, ranks, L, r_max);
  at::Tensor hidden = at::zeros({S, T, r_max}, x.options().dtype(acc));
  const at::Tensor x2 = x.reshape({T, in});
  // One task per adapter: gather its rows of x once, then one GEMM per slice at its own rank.
  for_each_adapter(g, [&](int64_t l, int64_t p0, int64_t n, int64_t r) {
    if (r == 0) return;
    const at::Tensor idx_l = g.idx.narrow(0, p0, n);
    const at::Tensor xg = x2.index_select(0, idx_l).to(acc);
    for (int64_t s = 0; s < S; ++s) {
      hidden[s].narrow(1, 0, r).index_copy_(0, idx_l, at::mm(xg, a4[s][l].narrow(0, 0, r).to(acc).t()));
    }
  });
  return sliced ? hidden : hidden[0];
}

void lora_expand_cpu(at::Tensor& y, const at::Tensor& hidden, const at::Tensor& lora_b, const at::Tensor& adapter_ids,
                     const at::Tensor& token_order, const at::Tensor& adapter_offsets, const at::Tensor& scales,
                     const std::optional<at::Tensor>& ranks, std::optional<c10::IntArrayRef> slice_sizes) {
  const char* op = "lora_expand_";
  const ExpandShapes sh = check_expand_args(op, y, hidden, lora_b, adapter_ids, token_order, adapter_offsets, scales,
                                            ranks, slice_sizes);
  const int64_t S = sh.slices, L = sh.num_adapters, r_max = sh.r_max, out_total = sh.out_total;
  const std::vector<int64_t>& sizes = sh.slice_sizes;
  const auto acc = multi_lora_acc_dtype(y);
  const at::Tensor h3 = hidden.dim() == 3 ? hidden : hidden.unsqueeze(0);
  const HostGroups g = host_groups(token_order, adapter_offsets, ranks, L, r_max);
  if (g.n_valid == 0 || out_total == 0) return;
  const std::vector<double> sc = host_scales(scales);
  // One task per adapter: its tokens' hidden rows, then per slice one GEMM at its own rank
  // whose rows are added straight into y's rows of that slice.
  for_each_adapter(g, [&](int64_t l, int64_t p0, int64_t n, int64_t r) {
    if (r == 0 || sc[l] == 0.0) return;
    const at::Tensor idx_l = g.idx.narrow(0, p0, n);
    int64_t col = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (sizes[s] > 0) {
        const at::Tensor h = h3[s].index_select(0, idx_l).narrow(1, 0, r) * sc[l];
        at::Tensor y_cols = y.narrow(1, col, sizes[s]);
        scatter_add_rows(y_cols, idx_l, at::mm(h, lora_b[l].narrow(0, col, sizes[s]).narrow(1, 0, r).to(acc).t()));
      }
      col += sizes[s];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multi_lora_linear_cpu(
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
  at::Tensor order, offsets;
  if (token_order.has_value()) {
    order = *token_order;
    offsets = *adapter_offsets;
    check_segments(order, offsets, x, sh.tokens, sh.num_adapters, op);
  } else {
    std::tie(order, offsets) = group_tokens_by_adapter(adapter_ids.reshape({-1}), sh.num_adapters);
  }
  const auto acc = multi_lora_acc_dtype(x);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const HostGroups g = host_groups(order, offsets, ranks, sh.num_adapters, sh.r_max);
  const AdapterOptions ao(rank_scale, out_scale, opts, acc);
  // The blocked path draws dropout masks for runs of consecutive rows; the grouped order is
  // not one, so with dropout the per-adapter path below runs (it drops each gathered row).
  if (opts.dropout.threshold == 0 && use_fused_cpu(x, sh.tokens)) {
    auto [y, hidden] = forward_fused(x2, weight, opt_ptr_defined(bias) ? &*bias : nullptr, lora_a, lora_b, order, g,
                                     host_scales(scales), ao, sh.r_max);
    return {y.view(with_last_dim(x, sh.out_features)), hidden.view(with_last_dim(x, sh.r_max))};
  }
  at::Tensor y = opt_ptr_defined(bias) ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  at::Tensor hidden = at::zeros({sh.tokens, sh.r_max}, x.options().dtype(acc));
  if (g.n_valid > 0) {
    // One adapter per task, start to finish: its tokens' rows of x (gathered), hidden and
    // update all stay in cache, and the update is added straight into y's rows, so no
    // batch-sized gathered copy or update buffer is ever written.
    const std::vector<double> sc = host_scales(scales);
    for_each_adapter(g, [&](int64_t l, int64_t p0, int64_t n, int64_t r) {
      if (r == 0) return;
      const at::Tensor idx_l = g.idx.narrow(0, p0, n);
      const at::Tensor h = at::mm(gather_dropped(x2, idx_l, ao.dropout, acc), lora_a[l].narrow(0, 0, r).to(acc).t());
      hidden.narrow(1, 0, r).index_copy_(0, idx_l, h);
      if (sc[l] == 0.0) return;
      const at::Tensor gain = ao.gain(l, r, sc[l]);
      const at::Tensor hg = gain.defined() ? h * gain : h * sc[l];
      scatter_add_rows(y, idx_l, at::mm(hg, ao.b_eff(lora_b[l].narrow(1, 0, r).to(acc), l).t()));
    });
  }
  return {y.view(with_last_dim(x, sh.out_features)), hidden.view(with_last_dim(x, sh.r_max))};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
multi_lora_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
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
  // Plain bools, not structured bindings: the per-adapter lambda captures them.
  const bool want_x = mask[0], want_w = mask[1], want_bias = mask[2], want_a = mask[3], want_b = mask[4],
             want_s = mask[5], want_g = mask[6] && opts.has_rank_scale, want_o = mask[7] && opts.has_out_scale;
  const auto acc = multi_lora_acc_dtype(x);
  const auto acc_opts = x.options().dtype(acc);
  const at::Tensor x2 = x.reshape({sh.tokens, sh.in_features}).contiguous();
  const at::Tensor dy2 = grad_out.reshape({sh.tokens, sh.out_features}).contiguous();
  const at::Tensor hid = hidden.reshape({sh.tokens, sh.r_max});
  std::optional<at::Tensor> gx, gw, gbias, ga, gb, gs, gg, go;
  if (want_w) gw = at::mm(dy2.t(), x2);
  if (want_bias) gbias = dy2.sum(0);
  if (want_a || want_b || want_s || want_x || want_g || want_o) {
    const HostGroups g = host_groups(token_order, adapter_offsets, ranks, sh.num_adapters, sh.r_max);
    const std::vector<double> sc = host_scales(scales);
    const AdapterOptions ao(rank_scale, out_scale, opts, acc);
    // The blocked kernels regenerate dropout masks for runs of consecutive rows only (as in the
    // forward): with dropout, and for other dtypes, the per-adapter path below runs.
    if (opts.dropout.threshold == 0 && use_fused_cpu(x, sh.tokens, /*min_rows_per_thread=*/32)) {
      BlockedGrads bg = backward_fused(dy2, x2, weight, lora_a, lora_b, hid.contiguous(), token_order, g, sc, ao,
                                       sh.r_max, want_x, want_a, want_b, want_s, want_g, want_o);
      if (want_x) gx = bg.dx.view(x.sizes());
      if (want_a) ga = bg.ga.to(lora_a.scalar_type());
      if (want_b) gb = bg.gb.to(lora_b.scalar_type());
      if (want_s) gs = bg.gs.to(scales.scalar_type());
      if (want_g) gg = bg.gg.to(rank_scale->scalar_type());
      if (want_o) go = bg.go.to(out_scale->scalar_type());
      return {gx, gw, gbias, ga, gb, gs, gg, go};
    }
    at::Tensor dx;
    if (want_x) dx = at::mm(dy2, weight);
    at::Tensor ga_acc, gb_acc, gs_acc, gg_acc, go_acc;
    if (want_a) ga_acc = at::zeros({sh.num_adapters, sh.r_max, sh.in_features}, acc_opts);
    if (want_b) gb_acc = at::zeros({sh.num_adapters, sh.out_features, sh.r_max}, acc_opts);
    if (want_s) gs_acc = at::zeros({sh.num_adapters}, acc_opts);
    if (want_g) gg_acc = at::zeros({sh.num_adapters, sh.r_max}, acc_opts);
    if (want_o) go_acc = at::zeros({sh.num_adapters, sh.out_features}, acc_opts);
    const bool need_dz = want_a || want_s || want_x || want_g;
    // One task per adapter, as in the forward: its tokens' rows of dy, hidden (and x) are
    // gathered, its gradients are whole per-adapter blocks, its grad_x rows are added in place.
    // With u = s·(g ⊙ h) and z = (u Bᵀ) ⊙ o: P = dyᵀ u gives ∂B = o ⊙ P and ∂o = Σ_j B ⊙ P;
    // dz = dy (o ⊙ B) = ∂L/∂u gives ∂s = Σ dz ⊙ g ⊙ h, ∂g = s Σ_t dz ⊙ h, ∂h = dz ⊙ s·g.
    for_each_adapter(g, [&](int64_t l, int64_t p0, int64_t n, int64_t r) {
      if (r == 0) return;
      const at::Tensor idx_l = g.idx.narrow(0, p0, n);
      const at::Tensor dy_l = dy2.index_select(0, idx_l).to(acc);                 // (n, out)
      const at::Tensor h_l = hid.index_select(0, idx_l).narrow(1, 0, r);          // (n, r)
      const at::Tensor b_l = lora_b[l].narrow(1, 0, r).to(acc);                   // (out, r)
      const at::Tensor gain = ao.gain(l, r, sc[l]);                               // s·g or undefined
      if (want_b || want_o) {
        const at::Tensor p = at::mm(dy_l.t(), gain.defined() ? h_l * gain : h_l * sc[l]);  // (out, r)
        if (want_b) gb_acc[l].narrow(1, 0, r).copy_(ao.o.defined() ? p * ao.o[l].unsqueeze(1) : p);
        if (want_o) go_acc[l].copy_((p * b_l).sum(1));
      }
      if (!need_dz) return;
      const at::Tensor dz = at::mm(dy_l, ao.b_eff(b_l, l));  // ∂L/∂u: (n, r)
      if (want_s) gs_acc[l] = ao.g.defined() ? (dz * h_l * ao.g[l].narrow(0, 0, r)).sum() : (dz * h_l).sum();
      if (want_g) gg_acc[l].narrow(0, 0, r).copy_((dz * h_l).sum(0) * sc[l]);
      if (!(want_a || want_x)) return;
      const at::Tensor du = gain.defined() ? dz * gain : dz * sc[l];  // ∂L/∂h
      if (want_a) ga_acc[l].narrow(0, 0, r).copy_(at::mm(du.t(), gather_dropped(x2, idx_l, ao.dropout, acc)));
      if (want_x) {
        at::Tensor dxl = at::mm(du, lora_a[l].narrow(0, 0, r).to(acc)).contiguous();  // ∂L/∂drop(x)
        if (ao.dropout.threshold != 0) {
          const at::Tensor ix = idx_l.contiguous();
          AT_DISPATCH_FLOATING_TYPES(acc, "multi_lora_drop_grad_rows", [&] {
            drop_gathered_rows(dxl.data_ptr<scalar_t>(), n, dxl.size(1), ix.data_ptr<int64_t>(), ao.dropout);
          });
        }
        scatter_add_rows(dx, idx_l, dxl);
      }
    });
    if (want_x) gx = dx.view(x.sizes());
    if (want_a) ga = ga_acc.to(lora_a.scalar_type());
    if (want_b) gb = gb_acc.to(lora_b.scalar_type());
    if (want_s) gs = gs_acc.to(scales.scalar_type());
    if (want_g) gg = gg_acc.to(rank_scale->scalar_type());
    if (want_o) go = go_acc.to(out_scale->scalar_type());
  }
  return {gx, gw, gbias, ga, gb, gs, gg, go};
}

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("multi_lora_segments", &multi_lora_segments_cpu);
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_expand_", &lora_expand_cpu);
  m.impl("multi_lora_linear", &multi_lora_linear_cpu);
  m.impl("multi_lora_linear_backward", &multi_lora_linear_backward_cpu);
}

}  // namespace lrkernels
