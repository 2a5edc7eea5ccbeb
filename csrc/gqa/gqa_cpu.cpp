// CPU kernels of gqa_attention (GQA, arXiv 2305.13245) and its backward: validation, the
// kernel parameters, and the split of the work into tasks over at::parallel_for. The tile
// arithmetic lives in gqa_cpu_vec.cpp (one copy per instruction set).
//
// Forward tasks are (batch, KV head, block of query positions): the G query heads of a group
// come together, so each K/V tile is read once for the whole group. When those tasks are too
// few to fill the machine (decode: one query per sequence) the key range is also split, each
// piece produces a normalised partial output with its log-sum-exp, and a second pass merges the
// pieces by their LSE (flash-decoding) — so B = 1 still uses every thread.
//
// Backward recomputes P from lse (FlashAttention-2): one pass over (batch, KV head, key tile)
// owns its dK / dV rows and visits every query row of the group; a second pass over
// (batch, KV head, query block) owns its dQ rows. Each output row has exactly one writer, so no
// atomics or per-thread gradient copies; the price is recomputing the scores once more.
//
// The parallel regions run no ATen ops (raw loops over buffers the caller owns), so they need no
// thread-local-state guard.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "gqa/gqa_checks.h"
#include "gqa/gqa_cpu_vec.h"

namespace lrkernels {
namespace {

constexpr const char* kFwd = "gqa_attention";
constexpr const char* kBwd = "gqa_attention_backward";
// The fewest keys a split of the key range gets (below this the LSE merge costs more than it saves).
constexpr int64_t kGqaMinSplitKeys = 256;

at::ScalarType acc_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block index of the i-th of n blocks in task order: 0, n−1, 1, n−2, ... With causal masking
// block costs grow along the sequence, and at::parallel_for hands each thread a contiguous range
// of tasks: interleaving cheap and dear blocks keeps those ranges equally loaded.
int64_t zigzag(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

// A unit stride over the head dim is what the kernels read; anything else is copied once.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

struct Prepared {
  GqaParams p{};
  at::Tensor q, k, v, lens, mask, grad_o, o, lse;  // keep what p points into alive
};

Prepared prepare(const char* op, const GqaShapes& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 bool causal, double scale, const std::optional<at::Tensor>& kv_lens,
                 const std::optional<at::Tensor>& attn_mask) {
  Prepared pr;
  GqaParams& p = pr.p;
  p.B = sh.B, p.Hq = sh.Hq, p.Hkv = sh.Hkv, p.G = sh.G, p.Sq = sh.Sq, p.Sk = sh.Sk, p.D = sh.D;
  pr.q = unit_last_stride(q);
  pr.k = unit_last_stride(k);
  pr.v = unit_last_stride(v);
  p.q = pr.q.data_ptr(), p.k = pr.k.data_ptr(), p.v = pr.v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_s[d] = pr.q.stride(d);
    p.k_s[d] = pr.k.stride(d);
    p.v_s[d] = pr.v.stride(d);
  }
  p.causal = causal;
  p.scale = scale;
  p.kv_lens = nullptr;
  if (kv_lens.has_value() && kv_lens->defined()) {
    pr.lens = kv_lens->to(at::kLong).contiguous();
    const int64_t* l = pr.lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < sh.B; ++b)
      TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= sh.Sk, "lrkernels.", op, ": kv_lens[", b, "] = ", l[b],
                        " is outside [0, kv_len] = [0, ", sh.Sk, "]");
    p.kv_lens = l;
  }
  p.mask = nullptr;
  if (attn_mask.has_value() && attn_mask->defined()) {
    at::Tensor m = *attn_mask;
    while (m.dim() < 4) m = m.unsqueeze(0);
    // a mask passed already expanded (stride 0) is narrowed back to size 1 there, so converting
    // it never materialises the broadcast
    for (int64_t d = 0; d < 4; ++d)
      if (m.size(d) > 1 && m.stride(d) == 0) m = m.narrow(d, 0, 1);
    const auto acc = acc_dtype(q);
    if (m.scalar_type() == at::kBool)
      pr.mask = at::zeros(m.sizes(), q.options().dtype(acc))
                    .masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
    else
      pr.mask = m.to(acc);
    p.mask = pr.mask.data_ptr();
    for (int64_t d = 0; d < 4; ++d) p.m_s[d] = pr.mask.size(d) == 1 ? 0 : pr.mask.stride(d);
  }
  return pr;
}

template <typename E>
void run_forward(const GqaParams& p, E* o, void* lse, const at::TensorOptions& acc_opts) {
  const auto& f = gqa_vec_fns<E>();
  const int64_t bq = gqa_block_queries(p.G), nqb = ceil_div(p.Sq, bq), n_base = p.B * p.Hkv * nqb;
  const int64_t threads = at::get_num_threads();
  int64_t n_split = 1;
  if (n_base < 4 * threads && p.Sk > kGqaMinSplitKeys)
    n_split = std::min(ceil_div(4 * threads, n_base), ceil_div(p.Sk, kGqaMinSplitKeys));
  auto task = [&](int64_t t, int64_t& b, int64_t& g, int64_t& q0, int64_t& q1) {
    const int64_t qb = zigzag(t % nqb, nqb);
    g = (t / nqb) % p.Hkv;
    b = t / (nqb * p.Hkv);
    q0 = qb * bq;
    q1 = std::min(p.Sq, q0 + bq);
  };
  if (n_split <= 1) {
    at::parallel_for(0, n_base, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t b, g, q0, q1;
        task(t, b, g, q0, q1);
        f.forward(p, b, g, q0, q1, 0, p.Sk, o, lse, nullptr, nullptr);
      }
    });
    return;
  }
  // splits of whole key tiles
  const int64_t chunk = ceil_div(ceil_div(p.Sk, n_split), kGqaKeyTile) * kGqaKeyTile;
  n_split = ceil_div(p.Sk, chunk);
  const int64_t Rmax = p.G * std::min(bq, p.Sq);
  at::Tensor parts = at::empty({n_base, n_split, Rmax, p.D}, acc_opts);
  at::Tensor lse_parts = at::empty({n_base, n_split, Rmax}, acc_opts);
  const int64_t esize = static_cast<int64_t>(parts.element_size());
  char* pp = static_cast<char*>(parts.data_ptr());
  char* lp = static_cast<char*>(lse_parts.data_ptr());
  at::parallel_for(0, n_base * n_split, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ts = t0; ts < t1; ++ts) {
      const int64_t t = ts / n_split, s = ts % n_split;
      int64_t b, g, q0, q1;
      task(t, b, g, q0, q1);
      f.forward(p, b, g, q0, q1, s * chunk, std::min(p.Sk, (s + 1) * chunk), nullptr, nullptr,
                pp + ts * Rmax * p.D * esize, lp + ts * Rmax * esize);
    }
  });
  at::parallel_for(0, n_base, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t b, g, q0, q1;
      task(t, b, g, q0, q1);
      f.combine(p, b, g, q0, q1, n_split, pp + t * n_split * Rmax * p.D * esize, Rmax * p.D,
                lp + t * n_split * Rmax * esize, Rmax, o, lse);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gqa_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool causal, double scale,
                                                     const std::optional<at::Tensor>& kv_lens,
                                                     const std::optional<at::Tensor>& attn_mask) {
  const GqaShapes sh = check_gqa_args(kFwd, q, k, v, scale, kv_lens, attn_mask);
  const auto acc_opts = q.options().dtype(acc_dtype(q));
  at::Tensor o = at::empty({sh.B, sh.Hq, sh.Sq, sh.D}, q.options());
  at::Tensor lse = at::empty({sh.B, sh.Hq, sh.Sq}, acc_opts);
  Prepared pr = prepare(kFwd, sh, q, k, v, causal, scale, kv_lens, attn_mask);
  if (o.numel() == 0) return {o, lse};
  switch (q.scalar_type()) {
    case at::kFloat: run_forward<float>(pr.p, o.data_ptr<float>(), lse.data_ptr(), acc_opts); break;
    case at::kDouble: run_forward<double>(pr.p, o.data_ptr<double>(), lse.data_ptr(), acc_opts); break;
    default: run_forward<c10::BFloat16>(pr.p, o.data_ptr<c10::BFloat16>(), lse.data_ptr(), acc_opts); break;
  }
  return {o, lse};
}

// The one-pass backward (grad_group) runs one task per (batch, KV head): it is taken when
// those tasks fill the threads, all three gradients are wanted and a KV head's dK / dV
// accumulators stay small; otherwise the two passes split the work finer.
constexpr int64_t kGqaGroupPassMaxKeys = 1 << 16;

template <typename E>
void run_backward(const GqaParams& p, E* dq, E* dk, E* dv) {
  const auto& f = gqa_vec_fns<E>();
  const int64_t groups = p.B * p.Hkv;
  if (dq && dk && dv && groups >= 2 * at::get_num_threads() && p.Sk <= kGqaGroupPassMaxKeys && p.Sq > 1) {
    at::parallel_for(0, groups, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) f.grad_group(p, t / p.Hkv, t % p.Hkv, dq, dk, dv);
    });
    return;
  }
  if (dk || dv) {
    const int64_t nkb = ceil_div(p.Sk, kGqaKeyTile), n = p.B * p.Hkv * nkb;
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t kb = zigzag(t % nkb, nkb), g = (t / nkb) % p.Hkv, b = t / (nkb * p.Hkv);
        const int64_t j0 = kb * kGqaKeyTile;
        f.grad_kv(p, b, g, j0, std::min(p.Sk, j0 + kGqaKeyTile), dk, dv);
      }
    });
  }
  if (dq) {
    const int64_t bq = gqa_block_queries(p.G), nqb = ceil_div(p.Sq, bq), n = p.B * p.Hkv * nqb;
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t qb = zigzag(t % nqb, nqb), g = (t / nqb) % p.Hkv, b = t / (nqb * p.Hkv);
        f.grad_q(p, b, g, qb * bq, std::min(p.Sq, qb * bq + bq), dq);
      }
    });
  }
}

template <typename E>
E* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<E>() : nullptr;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
gqa_attention_backward_cpu(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& o, const at::Tensor& lse, bool causal, double scale,
                           const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& attn_mask,
                           std::array<bool, 3> output_mask) {
  const GqaShapes sh = check_gqa_args(kBwd, q, k, v, scale, kv_lens, attn_mask);
  check_gqa_grad_args(kBwd, sh, q, grad_o, o, lse);
  Prepared pr = prepare(kBwd, sh, q, k, v, causal, scale, kv_lens, attn_mask);
  pr.grad_o = unit_last_stride(grad_o);
  pr.o = unit_last_stride(o);
  pr.lse = lse.contiguous();
  GqaParams& p = pr.p;
  p.grad_o = pr.grad_o.data_ptr();
  p.o = pr.o.data_ptr();
  p.lse = pr.lse.data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.go_s[d] = pr.grad_o.stride(d);
    p.o_s[d] = pr.o.stride(d);
  }
  // every row is written by the kernels except those no query sees (past kv_lens): zeros
  at::Tensor dq = output_mask[0] ? at::zeros(q.sizes(), q.options()) : at::Tensor();
  at::Tensor dk = output_mask[1] ? at::zeros(k.sizes(), k.options()) : at::Tensor();
  at::Tensor dv = output_mask[2] ? at::zeros(v.sizes(), v.options()) : at::Tensor();
  if (sh.B * sh.Hq * sh.Sq > 0 && sh.Sk > 0) {
    switch (q.scalar_type()) {
      case at::kFloat: run_backward<float>(p, ptr_or_null<float>(dq), ptr_or_null<float>(dk), ptr_or_null<float>(dv));
        break;
      case at::kDouble:
        run_backward<double>(p, ptr_or_null<double>(dq), ptr_or_null<double>(dk), ptr_or_null<double>(dv));
        break;
      default:
        run_backward<c10::BFloat16>(p, ptr_or_null<c10::BFloat16>(dq), ptr_or_null<c10::BFloat16>(dk),
                                    ptr_or_null<c10::BFloat16>(dv));
        break;
    }
  }
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  return {opt(dq), opt(dk), opt(dv)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("gqa_attention", &gqa_attention_cpu);
  m.impl("gqa_attention_backward", &gqa_attention_backward_cpu);
}

}  // namespace lrkernels
