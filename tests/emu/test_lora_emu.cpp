// lora_linear's SIMT kernels, i.e. the multi-LoRA kernels of multi_lora.cuh (shrink, expand,
// grad_out, grad_in) in their one-adapter case as csrc/lora/lora_cuda.cu launches them: the
// identity grouping (one_adapter_segments), the scale a scalar field, rank_scale (r,) and
// out_scale (out,) as the gains of adapter 0, dropout, gates and output scales on and off.
// They run under the host emulator, each checked against a float64 reference of the CPU
// semantics (csrc/lora/lora_cpu.cpp). Every kernel gets the reference's own inputs (e.g.
// expand reads the reference hidden), so a failure points at one kernel.
#include "emu_check.h"

#include <array>

#include "lrkernels/multi_lora.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

// f16_f32a / bf16_f32a: x (y, dy, dx) in fp16/bf16, the adapter tensors (A, B, g, o) in fp32.
enum class DType { f32, f16, bf16, f16_f32a, bf16_f32a };

struct Case {
  DType dtype;
  int64_t tokens, in, out, rank;
  bool rank_scale, out_scale;
  double dropout_p;
  float scale;
};

struct Dropout {
  int64_t seed = -7777777777LL;  // negative: the kernels take it as uint64
  DropoutParams params;
  explicit Dropout(double p) {
    if (p > 0) {
      params.threshold = dropout_threshold(p);
      params.keep_scale = dropout_keep_scale(params.threshold);
      params.seed = &seed;
    }
  }
  // drop(v) at x[t, k]: the Philox draw of (seed, t, k / 8), bit k % 8.
  double apply(double v, int64_t t, int64_t k) const {
    if (params.threshold == 0) return v;
    const uint32_t bits = dropout_keep_bits(static_cast<uint64_t>(seed), t, k >> 3, params.threshold);
    return ((bits >> (k & 7)) & 1u) ? v * params.keep_scale : 0.0;
  }
};

template <typename T, typename AT = T>
void run(Checker& check, Random& rng, const Case& c) {
  const int64_t T_ = c.tokens, in = c.in, out = c.out, r = c.rank;
  char buf[200];
  std::snprintf(buf, sizeof buf, "[%s%s T=%ld in=%ld out=%ld r=%ld g=%d o=%d p=%.2f s=%.2f]", type_name<T>(),
                std::is_same_v<T, AT> ? "" : "+f32-adapters", T_, in, out, r, c.rank_scale, c.out_scale, c.dropout_p,
                c.scale);
  const std::string config = buf;
  const double tol = tolerance<T>();
  const auto x = rng.tensor<T>(T_ * in, 1.0);
  const auto a = rng.tensor<AT>(r * in, 1 / std::sqrt(double(std::max<int64_t>(in, 1))));
  const auto b = rng.tensor<AT>(out * r, 1 / std::sqrt(double(r)));
  const auto g = rng.tensor<AT>(r, 1.0), o = rng.tensor<AT>(out, 1.0);
  const auto y0 = rng.tensor<T>(T_ * out, 1.0), dy = rng.tensor<T>(T_ * out, 1.0), dx0 = rng.tensor<T>(T_ * in, 1.0);
  const auto X = to_double(x), A = to_double(a), B = to_double(b), G = to_double(g), O = to_double(o);
  const auto DY = to_double(dy);
  const Dropout drop(c.dropout_p);
  auto gate = [&](int64_t j) { return c.scale * (c.rank_scale ? G[j] : 1.0); };  // s · g_j
  auto out_gate = [&](int64_t n) { return c.out_scale ? O[n] : 1.0; };            // o_n

  // float64 reference: u = drop(x) Aᵀ, h = s g ⊙ u, y = y0 + (h Bᵀ) ⊙ o, and the backward.
  std::vector<double> XD(T_ * in), U(T_ * r), H(T_ * r), Y = to_double(y0), DH(T_ * r), DU(T_ * r), P(out * r),
      DX = to_double(dx0), GA(r * in);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t k = 0; k < in; ++k) XD[t * in + k] = drop.apply(X[t * in + k], t, k);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) acc += XD[t * in + k] * A[j * in + k];
      U[t * r + j] = acc;
      H[t * r + j] = acc * gate(j);
    }
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t n = 0; n < out; ++n) {
      double acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += H[t * r + j] * B[n * r + j];
      Y[t * out + n] += acc * out_gate(n);
    }
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0;
      for (int64_t n = 0; n < out; ++n) acc += DY[t * out + n] * B[n * r + j] * out_gate(n);
      DH[t * r + j] = acc;
      DU[t * r + j] = acc * gate(j);
    }
  for (int64_t n = 0; n < out; ++n)
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0;
      for (int64_t t = 0; t < T_; ++t) acc += DY[t * out + n] * H[t * r + j];
      P[n * r + j] = acc;
    }
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t k = 0; k < in; ++k) {
      double acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += DU[t * r + j] * A[j * in + k];
      DX[t * in + k] += drop.apply(acc, t, k);
    }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t k = 0; k < in; ++k) {
      double acc = 0;
      for (int64_t t = 0; t < T_; ++t) acc += DU[t * r + j] * XD[t * in + k];
      GA[j * in + k] = acc;
    }

  const MultiLoraSegmentsView seg = multi_lora::one_adapter_segments(T_, r);
  // shrink (hidden zero-filled, as the binding does: the kernel adds into it); K split or not
  for (bool split : {true, false}) {
    std::vector<float> hidden(T_ * r, 0.f);
    MultiLoraShrinkParams sp;
    sp.x = x.data(); sp.a = a.data(); sp.hidden = hidden.data();
    sp.in_features = in; sp.dropout = drop.params; sp.allow_k_split = split; sp.seg = seg;
    const long before = emu::launch_count();
    if (multi_lora::launch_shrink<T, AT>(sp, nullptr) != cudaSuccess) check.launch_failed("shrink", config);
    if (!split && emu::launch_count() != before)
      check.expect(emu::last_grid().y == 1, "shrink grid", config, "split K though allow_k_split is false");
    check.compare(split ? "hidden" : "hidden (K unsplit)", config, hidden, U, tol);
  }

  // expand, from the reference u
  const std::vector<float> u_ref(U.begin(), U.end());
  auto y = y0;
  MultiLoraExpandParams ep;
  ep.hidden = u_ref.data(); ep.b = b.data(); ep.y = y.data(); ep.ldy = out; ep.out_total = out;
  ep.slice_start[1] = out; ep.seg = seg;
  ep.rank_scale = c.rank_scale ? g.data() : nullptr; ep.out_scale = c.out_scale ? o.data() : nullptr;
  ep.scale = c.scale;
  if (multi_lora::launch_expand<T, AT>(ep, nullptr) != cudaSuccess) check.launch_failed("expand", config);
  check.compare("y", config, y, Y, tol);

  // grad_out: grad_hidden and grad_b_raw, zero-initialised
  std::vector<float> grad_hidden(T_ * r, 0.f), grad_b_raw(out * r, 0.f);
  MultiLoraGradOutParams gp;
  gp.grad_out = dy.data(); gp.hidden = u_ref.data(); gp.b = b.data();
  gp.rank_scale = ep.rank_scale; gp.out_scale = ep.out_scale;
  gp.grad_z = grad_hidden.data(); gp.grad_b = grad_b_raw.data();
  gp.out_features = out; gp.scale = c.scale; gp.seg = seg;
  if (multi_lora::launch_grad_out<T, AT>(gp, nullptr) != cudaSuccess) check.launch_failed("grad_out", config);
  check.compare("grad_hidden", config, grad_hidden, DH, tol);
  check.compare("grad_b_raw", config, grad_b_raw, P, tol);

  // grad_in, from the reference du: grad_x in place on dx0, grad_a zero-initialised
  const std::vector<float> du_ref(DU.begin(), DU.end());
  std::vector<float> grad_a(r * in, 0.f);
  auto dx = dx0;
  MultiLoraGradInParams ip;
  ip.x = x.data(); ip.a = a.data(); ip.grad_u = du_ref.data(); ip.grad_x = dx.data(); ip.grad_a = grad_a.data();
  ip.in_features = in; ip.dropout = drop.params; ip.seg = seg;
  if (multi_lora::launch_grad_in<T, AT>(ip, nullptr) != cudaSuccess) check.launch_failed("grad_in", config);
  check.compare("grad_x", config, dx, DX, tol);
  check.compare("grad_a", config, grad_a, GA, tol);
}

// Each shape in every dtype, with dropout off and on, plus fp32 adapters on a 16-bit x
// (fp16 and bf16 in turn); rank_scale / out_scale / scale rotate over the cases so each is on
// and off in every dtype.
std::vector<Case> expand_shapes(const std::vector<std::array<int64_t, 4>>& shapes) {
  std::vector<Case> cases;
  int n = 0;
  for (const auto& [T_, in, out, r] : shapes)
    for (double p : {0.0, 0.3})
      for (DType dt : {DType::f32, DType::f16, DType::bf16, n % 8 < 4 ? DType::f16_f32a : DType::bf16_f32a}) {
        const bool g = n % 2 == 0, o = n % 3 != 0;
        const float s = n % 4 == 1 ? 1.0f : 0.7f;
        cases.push_back({dt, T_, in, out, r, g, o, p, s});
        ++n;
      }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("lora (SIMT, the one-adapter multi-LoRA kernels)", argc, argv);
  // (T, in, out, r). Tails in every dimension (the kernels tile T by 32/64, features by 64
  // and 128, ranks by chunks of 8-64 lanes); rank 1, odd, 16, over one chunk, 256; T = 0.
  const std::vector<Case> quick = expand_shapes({{7, 13, 17, 3},
                                                 {1, 1, 1, 1},
                                                 {0, 16, 8, 4},
                                                 {33, 64, 65, 16},
                                                 {40, 100, 48, 19},
                                                 {65, 130, 129, 33},
                                                 {3, 20, 10, 65},
                                                 {5, 70, 33, 64},
                                                 {34, 9, 130, 100},
                                                 {9, 70, 20, 256}});
  const std::vector<Case> extra = expand_shapes({{70, 200, 140, 24},
                                                 {17, 70, 20, 256},
                                                 {130, 64, 64, 8}});
  Random rng(1234);
  for (const Case& c : check.select(quick, extra, 6)) {
    switch (c.dtype) {
      case DType::f32: run<float>(check, rng, c); break;
      case DType::f16: run<half>(check, rng, c); break;
      case DType::bf16: run<bf16>(check, rng, c); break;
      case DType::f16_f32a: run<half, float>(check, rng, c); break;
      case DType::bf16_f32a: run<bf16, float>(check, rng, c); break;
    }
  }
  return check.finish();
}
