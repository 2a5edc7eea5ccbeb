// The GQA attention kernels of gqa.cuh (fwd_kernel with and without KV splits, combine_kernel,
// delta_kernel, bwd_kernel with atomic dQ, dq_kernel (deterministic dQ), convert_kernel, through
// launch_forward / launch_backward) run under
// the host emulator, checked against float64 references of the formulas of gqa_params.h as the
// binding (csrc/gqa/gqa_cuda.cu) uses them:
//   forward   o_bhi = Σ_j softmax_j(s) v_bgj, s_j = scale·⟨q_bhi, k_bgj⟩ + mask_bhij over the keys
//             j < len_b (and j ≤ i + len_b − Sq with causal), g = h / G; lse = log Σ_j exp(s_j);
//             a row with no visible key: o = 0, lse = −inf
//   backward  P = softmax(s), Δ_i = ⟨dO_i, O_i⟩ with the O the kernel is given (its own forward's,
//             rounded to the storage type, as the op passes it), dS = P ⊙ (dO Vᵀ − Δ),
//             dQ = scale·dS K, dK = scale·Σ_group dSᵀ Q, dV = Σ_group Pᵀ dO
// The references take the inputs as rounded to the storage type, so what is left is the kernels'
// float32 arithmetic (sums over ≤ 256 columns or ≤ 130 keys: relative error ~1e-6, inside
// emu_check's 1e-5 for float32) plus the final rounding of each output to fp16 / bf16 (half an
// ulp: 2^-9 relative for bf16, inside the 1e-2 of those dtypes). lse is float32 for every
// storage type and is held to the float32 tolerance.
//
// Grid: group sizes G ∈ {1, 3, 4}, head dims {32, 64, 80, 128} (and 256, the largest bucket),
// Sq ∈ {1, 7, 33}, Sk ∈ {1, 17, 130}, causal on and off with Sq ≠ Sk, ragged kv_lens (0 and Sk
// included), bool and additive masks (−inf entries, fully masked rows) broadcast through zero
// strides, q and grad_o as (B, S, H, D) views, K / V rows padded, fp32 / fp16 / bf16 storage, and
// the split-KV decode path forced to small splits (empty splits past kv_lens included) as well
// as chosen by plan_splits for a long decode.
#include "emu_check.h"

#include <limits>

#include "lrkernels/gqa.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct Case {
  int64_t B, Hq, Hkv, Sq, Sk, D;
  bool causal, lens;
  int mask;        // 0 none, 1 bool, 2 additive
  int mask_shape;  // which dims the mask has: 0 (B,1,Sq,Sk), 1 (1,Hq,Sq,Sk), 2 (B,1,1,Sk), 3 (1,1,Sq,1)
  int64_t split;   // 0: no split; > 0: keys per split (a multiple of the key tile); -1: plan_splits(num_sms = 1)
  bool strided;    // q / grad_o as (B, S, H, D) views, K / V rows padded
};

std::string describe(const Case& c, const char* dtype) {
  char buf[240];
  std::snprintf(buf, sizeof buf,
                "[%s B=%ld Hq=%ld Hkv=%ld Sq=%ld Sk=%ld D=%ld causal=%d lens=%d mask=%d/%d split=%ld strided=%d]",
                dtype, c.B, c.Hq, c.Hkv, c.Sq, c.Sk, c.D, c.causal, c.lens, c.mask, c.mask_shape, c.split, c.strided);
  return buf;
}

// A (B, H, S, D) tensor stored with the given strides (the buffer covers the largest offset).
template <typename T>
struct Strided {
  std::vector<T> data;
  int64_t s[3];  // strides over (batch, head, position)
  int64_t B, H, S, D;
  const T& at(int64_t b, int64_t h, int64_t i, int64_t d) const { return data[b * s[0] + h * s[1] + i * s[2] + d]; }
  double get(int64_t b, int64_t h, int64_t i, int64_t d) const { return to_double(at(b, h, i, d)); }
};

// bshd: stored (B, S, H, D); pad: extra elements after each row of D
template <typename T>
Strided<T> make_tensor(Random& rng, int64_t B, int64_t H, int64_t S, int64_t D, bool bshd, int64_t pad) {
  Strided<T> t;
  t.B = B, t.H = H, t.S = S, t.D = D;
  const int64_t row = D + pad;
  if (bshd) {
    t.s[2] = H * row, t.s[1] = row, t.s[0] = S * H * row;
  } else {
    t.s[2] = row, t.s[1] = S * row, t.s[0] = H * S * row;
  }
  t.data = rng.tensor<T>(static_cast<size_t>(std::max<int64_t>(B * H * S * row, 1)), 1.0);
  return t;
}

struct Mask {
  std::vector<unsigned char> bools;
  std::vector<float> adds;
  int64_t s[4] = {0, 0, 0, 0};
  int kind = 0;
  double term(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const int64_t off = b * s[0] + h * s[1] + i * s[2] + j * s[3];
    if (kind == 1) return bools[off] ? 0.0 : kNegInf;
    if (kind == 2) return adds[off];
    return 0.0;
  }
};

Mask make_mask(Random& rng, const Case& c) {
  Mask m;
  m.kind = c.mask;
  if (c.mask == 0) return m;
  static const bool has[4][4] = {{1, 0, 1, 1}, {0, 1, 1, 1}, {1, 0, 0, 1}, {0, 0, 1, 0}};
  const int64_t full[4] = {c.B, c.Hq, c.Sq, c.Sk};
  int64_t size[4], n = 1;
  for (int d = 3; d >= 0; --d) {
    size[d] = has[c.mask_shape][d] ? full[d] : 1;
    m.s[d] = size[d] == 1 ? 0 : n;
    n *= size[d];
  }
  n = std::max<int64_t>(n, 1);
  if (c.mask == 1) {
    m.bools.resize(n);
    for (auto& e : m.bools) e = rng.integer(0, 9) < 7;  // 70% attend
    // a fully masked (b, ·, i) row: every key of position 0 masked (when the mask has a row per i)
    if (has[c.mask_shape][2] && has[c.mask_shape][3])
      for (int64_t j = 0; j < size[3]; ++j) m.bools[j * m.s[3]] = 0;
  } else {
    m.adds.resize(n);
    for (auto& e : m.adds) e = rng.integer(0, 9) < 2 ? -INFINITY : static_cast<float>(rng.normal());
  }
  return m;
}

template <typename T>
void run(Checker& check, Random& rng, const Case& c) {
  const std::string config = describe(c, type_name<T>());
  const double tol = tolerance<T>(), tol32 = tolerance<float>();
  const int64_t B = c.B, Hq = c.Hq, Hkv = c.Hkv, G = Hq / Hkv, Sq = c.Sq, Sk = c.Sk, D = c.D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const auto q = make_tensor<T>(rng, B, Hq, Sq, D, c.strided, 0);
  const auto k = make_tensor<T>(rng, B, Hkv, Sk, D, false, c.strided ? 3 : 0);
  const auto v = make_tensor<T>(rng, B, Hkv, Sk, D, false, c.strided ? 5 : 0);
  const auto go = make_tensor<T>(rng, B, Hq, Sq, D, c.strided, 0);
  std::vector<int64_t> lens(B, Sk);
  if (c.lens)
    for (int64_t b = 0; b < B; ++b) lens[b] = b == 0 ? Sk : (b == 1 ? 0 : rng.integer(0, Sk));
  const std::vector<int32_t> lens32(lens.begin(), lens.end());
  const Mask mask = make_mask(rng, c);

  GqaAttnInputs in;
  in.B = B, in.Hq = Hq, in.Hkv = Hkv, in.G = G, in.Sq = Sq, in.Sk = Sk, in.D = D;
  in.q = q.data.data(), in.k = k.data.data(), in.v = v.data.data();
  for (int d = 0; d < 3; ++d) in.q_s[d] = q.s[d], in.k_s[d] = k.s[d], in.v_s[d] = v.s[d];
  if (c.lens) {  // int64 and int32 lengths, alternately, the int32 ones read with a stride of 1
    if (B % 2) in.kv_lens64 = lens.data();
    else in.kv_lens32 = lens32.data();
  }
  if (c.mask) {
    in.mask = c.mask == 1 ? static_cast<const void*>(mask.bools.data()) : static_cast<const void*>(mask.adds.data());
    in.mask_is_bool = c.mask == 1;
    for (int d = 0; d < 4; ++d) in.m_s[d] = mask.s[d];
  }
  in.scale = static_cast<float>(scale);
  in.causal = c.causal;

  // float64 reference: P (B, Hq, Sq, Sk), o, lse
  const int64_t nrows = B * Hq * Sq;
  std::vector<double> P(nrows * Sk, 0.0), want_o(nrows * D, 0.0), want_lse(nrows, kNegInf);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t row = (b * Hq + h) * Sq + i, gk = h / G;
        int64_t end = lens[b];
        if (c.causal) end = std::clamp<int64_t>(i + lens[b] - Sq + 1, 0, lens[b]);
        std::vector<double> s(Sk, kNegInf);
        double mx = kNegInf;
        for (int64_t j = 0; j < end; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q.get(b, h, i, d) * k.get(b, gk, j, d);
          s[j] = dot * double(in.scale) + mask.term(b, h, i, j);
          mx = std::max(mx, s[j]);
        }
        if (mx == kNegInf) continue;
        double sum = 0;
        for (int64_t j = 0; j < end; ++j) sum += std::exp(s[j] - mx);
        want_lse[row] = mx + std::log(sum);
        for (int64_t j = 0; j < end; ++j) {
          const double pj = std::exp(s[j] - mx) / sum;
          P[row * Sk + j] = pj;
          for (int64_t d = 0; d < D; ++d) want_o[row * D + d] += pj * v.get(b, gk, j, d);
        }
      }

  // forward
  std::vector<T> o = guarded(std::vector<T>(nrows * D, from_double<T>(NAN)));
  std::vector<float> lse = guarded(std::vector<float>(nrows, NAN));
  GqaFwdParams fp;
  fp.in = in;
  fp.o = o.data();
  fp.lse = lse.data();
  std::vector<float> o_part, lse_part;
  if (c.split != 0) {
    if (c.split > 0) {
      fp.split_keys = c.split;
      fp.n_split = std::max<int64_t>(gqa::ceil_div(Sk, c.split), 1);
    } else {
      const gqa::SplitPlan plan = gqa::plan_splits(in, 1);
      check.expect(plan.n_split > 1 && plan.split_keys % gqa::fwd_key_tile(D) == 0 &&
                       plan.split_keys >= gqa::kMinSplitKeys && plan.n_split * plan.split_keys >= Sk &&
                       (plan.n_split - 1) * plan.split_keys < Sk,
                   "plan_splits", config, "no valid split of a long decode");
      fp.n_split = plan.n_split;
      fp.split_keys = plan.split_keys;
    }
    o_part.assign(fp.n_split * nrows * D, NAN);
    lse_part.assign(fp.n_split * nrows, NAN);
    fp.o_part = o_part.data();
    fp.lse_part = lse_part.data();
  }
  if (gqa::launch_forward<T>(fp, nullptr) != cudaSuccess) check.launch_failed("forward", config);
  std::vector<double> got_lse_live, want_lse_live;
  bool dead_ok = true;
  for (int64_t r = 0; r < nrows; ++r) {
    if (want_lse[r] == kNegInf) {
      dead_ok = dead_ok && lse[r] == -INFINITY;
      for (int64_t d = 0; d < D; ++d) dead_ok = dead_ok && to_double(o[r * D + d]) == 0.0;
    } else {
      got_lse_live.push_back(lse[r]);
      want_lse_live.push_back(want_lse[r]);
    }
  }
  check.expect(dead_ok, "forward dead rows", config, "a row that sees no key must give o = 0 and lse = -inf");
  check.compare(c.split ? "forward o (split)" : "forward o", config, body(o, nrows * D), want_o, tol);
  check.compare(c.split ? "forward lse (split)" : "forward lse", config, got_lse_live, want_lse_live, tol32);
  check_guards(check, config, {tail(o, nrows * D), tail(lse, nrows)});

  // backward, from the kernel's own o and lse (what the op's autograd passes)
  std::vector<double> want_dq(nrows * D, 0.0), want_dk(B * Hkv * Sk * D, 0.0), want_dv(B * Hkv * Sk * D, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        const int64_t row = (b * Hq + h) * Sq + i, gk = h / G;
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += go.get(b, h, i, d) * to_double(o[row * D + d]);
        for (int64_t j = 0; j < Sk; ++j) {
          const double pj = P[row * Sk + j];
          if (pj == 0) continue;
          double dp = 0;
          for (int64_t d = 0; d < D; ++d) dp += go.get(b, h, i, d) * v.get(b, gk, j, d);
          const double ds = pj * (dp - delta) * double(in.scale);
          const int64_t kv = ((b * Hkv + gk) * Sk + j) * D;
          for (int64_t d = 0; d < D; ++d) {
            want_dq[row * D + d] += ds * k.get(b, gk, j, d);
            want_dk[kv + d] += ds * q.get(b, h, i, d);
            want_dv[kv + d] += pj * go.get(b, h, i, d);
          }
        }
      }
  const int64_t nkv = B * Hkv * Sk * D;
  // dQ both ways: atomics into a float32 accumulator (the default), and its own pass (deterministic)
  for (const bool deterministic : {false, true}) {
    const std::string cfg = config + (deterministic ? " deterministic dq" : "");
    const bool in_place = std::is_same_v<T, float> && !deterministic;  // fp32 accumulates in dq itself
    std::vector<T> dq = guarded(std::vector<T>(nrows * D, from_double<T>(in_place ? 0.0 : NAN)));
    std::vector<T> dk = guarded(std::vector<T>(nkv, from_double<T>(NAN)));
    std::vector<T> dv = guarded(std::vector<T>(nkv, from_double<T>(NAN)));
    std::vector<float> dq_acc(std::max<int64_t>(nrows * D, 1), 0.0f), delta(std::max<int64_t>(nrows, 1), NAN);
    GqaBwdParams bp;
    bp.in = in;
    bp.grad_o = go.data.data();
    for (int d = 0; d < 3; ++d) bp.go_s[d] = go.s[d], bp.o_s[d] = (d == 0 ? Hq * Sq * D : (d == 1 ? Sq * D : D));
    bp.o = o.data();
    bp.lse = lse.data();
    bp.delta = delta.data();
    bp.deterministic_dq = deterministic;
    if (!deterministic) bp.dq_acc = in_place ? reinterpret_cast<float*>(dq.data()) : dq_acc.data();
    bp.dq = dq.data();
    bp.dk = dk.data();
    bp.dv = dv.data();
    if (gqa::launch_backward<T>(bp, nullptr) != cudaSuccess) check.launch_failed("backward", cfg);
    check.compare(deterministic ? "backward dq (deterministic)" : "backward dq", cfg, body(dq, nrows * D), want_dq,
                  tol);
    check.compare("backward dk", cfg, body(dk, nkv), want_dk, tol);
    check.compare("backward dv", cfg, body(dv, nkv), want_dv, tol);
    check_guards(check, cfg, {tail(dq, nrows * D), tail(dk, nkv), tail(dv, nkv)});
  }
  // only dq wanted (the key-tile pass is skipped in deterministic mode), only dv wanted
  {
    std::vector<T> dq = guarded(std::vector<T>(nrows * D, from_double<T>(NAN)));
    std::vector<T> dv = guarded(std::vector<T>(nkv, from_double<T>(NAN)));
    std::vector<float> delta(std::max<int64_t>(nrows, 1), NAN);
    GqaBwdParams bp;
    bp.in = in;
    bp.grad_o = go.data.data();
    for (int d = 0; d < 3; ++d) bp.go_s[d] = go.s[d], bp.o_s[d] = (d == 0 ? Hq * Sq * D : (d == 1 ? Sq * D : D));
    bp.o = o.data();
    bp.lse = lse.data();
    bp.delta = delta.data();
    bp.deterministic_dq = true;
    bp.dq = dq.data();
    if (gqa::launch_backward<T>(bp, nullptr) != cudaSuccess) check.launch_failed("backward dq only", config);
    check.compare("backward dq only", config, body(dq, nrows * D), want_dq, tol);
    bp.dq = nullptr;
    bp.dv = dv.data();
    if (gqa::launch_backward<T>(bp, nullptr) != cudaSuccess) check.launch_failed("backward dv only", config);
    check.compare("backward dv only", config, body(dv, nkv), want_dv, tol);
    check_guards(check, config, {tail(dq, nrows * D), tail(dv, nkv)});
  }
}

// A NaN in one query row poisons that row's o and lse and no other (the running max lets a NaN
// through, as the CPU kernels do), with and without KV splits. A property check: it holds (and is
// checked) in every mode.
void run_nan(Checker& check, Random& rng) {
  const int64_t B = 1, Hq = 4, Hkv = 2, Sq = 3, Sk = 130, D = 16, nrows = B * Hq * Sq;
  for (const int64_t split : {int64_t{0}, int64_t{64}}) {
    const std::string config = split ? "[f32 NaN in q, split 64]" : "[f32 NaN in q]";
    auto q = rng.tensor<float>(nrows * D, 1.0);
    const auto k = rng.tensor<float>(B * Hkv * Sk * D, 1.0), v = rng.tensor<float>(B * Hkv * Sk * D, 1.0);
    const int64_t bad = 1 * Sq + 2;  // head 1, position 2
    q[bad * D + 5] = NAN;
    GqaFwdParams p;
    p.in.B = B, p.in.Hq = Hq, p.in.Hkv = Hkv, p.in.G = Hq / Hkv, p.in.Sq = Sq, p.in.Sk = Sk, p.in.D = D;
    p.in.q = q.data(), p.in.k = k.data(), p.in.v = v.data();
    const int64_t qs[3] = {Hq * Sq * D, Sq * D, D}, ks[3] = {Hkv * Sk * D, Sk * D, D};
    for (int d = 0; d < 3; ++d) p.in.q_s[d] = qs[d], p.in.k_s[d] = ks[d], p.in.v_s[d] = ks[d];
    p.in.scale = 0.25f;
    std::vector<float> o(nrows * D), lse(nrows), o_part, lse_part;
    p.o = o.data();
    p.lse = lse.data();
    if (split) {
      p.n_split = gqa::ceil_div(Sk, split), p.split_keys = split;
      o_part.resize(p.n_split * nrows * D);
      lse_part.resize(p.n_split * nrows);
      p.o_part = o_part.data(), p.lse_part = lse_part.data();
    }
    if (gqa::launch_forward<float>(p, nullptr) != cudaSuccess) check.launch_failed("forward (NaN)", config);
    bool ok = true;
    for (int64_t r = 0; r < nrows; ++r) {
      ok = ok && (r == bad ? std::isnan(lse[r]) : std::isfinite(lse[r]));
      for (int64_t d = 0; d < D; ++d) ok = ok && (r == bad ? std::isnan(o[r * D + d]) : std::isfinite(o[r * D + d]));
    }
    check.expect(ok, "forward NaN propagation", config, "the NaN row must be NaN and every other row finite");
  }
}

void run_dtype(Checker& check, Random& rng, const Case& c, int which) {
  switch (which % 3) {
    case 0: run<float>(check, rng, c); break;
    case 1: run<bf16>(check, rng, c); break;
    default: run<half>(check, rng, c); break;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("gqa", argc, argv);
  // {B, Hq, Hkv, Sq, Sk, D, causal, lens, mask, mask_shape, split, strided}
  const std::vector<Case> quick = {
      {2, 4, 1, 7, 17, 32, true, true, 1, 0, 0, true},      // causal Sq < Sk, ragged lens, bool mask
      {2, 3, 1, 33, 130, 64, false, false, 2, 1, 0, false},  // additive mask per head, several key tiles
      {1, 4, 4, 33, 17, 80, true, false, 0, 0, 0, true},    // G = 1, causal Sq > Sk (dead rows), D = 80
      {2, 8, 2, 1, 130, 128, false, true, 1, 2, 32, false},  // decode, padding mask, forced splits
      {3, 12, 4, 7, 130, 64, true, true, 0, 0, 64, true},   // causal chunked prefill with splits, ragged
      {2, 3, 3, 1, 1, 32, false, false, 0, 0, 0, false},    // one key
      {2, 9, 3, 7, 130, 128, true, false, 2, 3, 0, true},   // mask broadcast over keys, D = 128
      {1, 4, 1, 33, 33, 256, true, false, 1, 0, 0, false},  // largest bucket, Sq = Sk causal
      {3, 4, 1, 1, 130, 80, true, true, 2, 2, 64, false},   // decode, causal, lens, additive, splits
      {2, 6, 2, 0, 17, 64, false, false, 0, 0, 0, false},   // empty query
      {2, 6, 2, 5, 0, 64, false, false, 0, 0, 0, false},    // no keys: o = 0, lse = −inf
      {1, 4, 1, 1, 1100, 64, false, true, 0, 0, -1, false},  // plan_splits on a long decode
  };
  std::vector<Case> extra;
  for (int64_t G : {1, 3, 4})
    for (int64_t D : {32, 64, 80, 128})
      for (int64_t Sq : {1, 7, 33})
        for (int64_t Sk : {1, 17, 130}) {
          const int64_t h = extra.size();
          extra.push_back({2, 2 * G, 2, Sq, Sk, D, h % 2 == 0, h % 3 == 0, static_cast<int>(h % 3),
                           static_cast<int>(h % 4), Sq == 1 && Sk > 64 ? 64 : 0, h % 5 == 0});
        }
  Random rng(1212);
  int which = 0;
  const std::vector<Case> cases = check.select(quick, extra, quick.size());
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    if (ci < quick.size()) {  // every dtype on every quick case
      for (int rep = 0; rep < 3; ++rep) run_dtype(check, rng, cases[ci], rep);
    } else {
      run_dtype(check, rng, cases[ci], which++);
    }
  }
  run_nan(check, rng);
  return check.finish();
}
