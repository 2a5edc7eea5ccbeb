// The multi-LoRA kernels of multi_lora.cuh (SIMT shrink, expand, grad_out, grad_in) and
// multi_lora_tc.cuh (tensor-core shrink and expand) run under the host emulator, each checked
// against a float64 reference of the CPU semantics (csrc/multi_lora/multi_lora_cpu.cpp):
// tokens in random (unsorted) adapter order, base-only tokens (id -1 or out of range), mixed
// and out-of-range ranks (clamped to [0, r_max]), uneven output slices, y a column block of a
// wider buffer; and the compile-time options: dropout on x (shrink, grad_in; the mask of a
// token is row t of lora_linear's Philox mask), per-adapter rank gates and output scales
// (expand, grad_out). Then malformed grouping metadata, which must neither crash nor hang
// (the kernels bounds-check every index they read from it).
#include "emu_check.h"

#include "lrkernels/multi_lora.cuh"

#include <array>
#include <numeric>

using namespace lrkernels;
using namespace emu_check;

namespace {

enum class DType { f32, f16, bf16 };

struct Case {
  DType dtype;
  bool tensor_cores;
  int64_t tokens, in, out, adapters, r_max, slices;
  bool per_adapter_ranks;  // else every adapter has rank r_max (ranks = null)
  bool fp32_adapters = false;  // A and B in float32 on an fp16/bf16 x (SIMT kernels only)
  int options = 0;             // kDropout | kGate | kOutScale
};

constexpr int kDropout = 1, kGate = 2, kOutScale = 4;

// Dropout on x as the kernels draw it: element (t, k) of x (t the global token row) kept by
// bit k % 8 of the Philox draw (seed, t, k / 8), kept values scaled by keep_scale.
struct Dropout {
  int64_t seed = -123456789012LL;  // negative: the kernels take it as uint64
  DropoutParams params;
  explicit Dropout(double p) {
    if (p > 0) {
      params.threshold = dropout_threshold(p);
      params.keep_scale = dropout_keep_scale(params.threshold);
      params.seed = &seed;
    }
  }
  double apply(double v, int64_t t, int64_t k) const {
    if (params.threshold == 0) return v;
    const uint32_t bits = dropout_keep_bits(static_cast<uint64_t>(seed), t, k >> 3, params.threshold);
    return ((bits >> (k & 7)) & 1u) ? v * params.keep_scale : 0.0;
  }
};

// Whether the latest launch was one of multi_lora_tc.cuh's tensor-core kernels.
template <typename T>
bool last_launch_was_tensor_cores() {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    const void* k = emu::last_kernel();
    auto is = [k](auto* kernel) { return k == reinterpret_cast<const void*>(kernel); };
    return is(&multi_lora::shrink_tc_kernel<T, 16, false>) || is(&multi_lora::shrink_tc_kernel<T, 32, false>) ||
           is(&multi_lora::shrink_tc_kernel<T, 64, false>) || is(&multi_lora::shrink_tc_kernel<T, 16, true>) ||
           is(&multi_lora::shrink_tc_kernel<T, 32, true>) || is(&multi_lora::shrink_tc_kernel<T, 64, true>) ||
           is(&multi_lora::expand_tc_kernel<T, 16, false, false>) ||
           is(&multi_lora::expand_tc_kernel<T, 16, false, true>) ||
           is(&multi_lora::expand_tc_kernel<T, 16, true, false>) ||
           is(&multi_lora::expand_tc_kernel<T, 16, true, true>) ||
           is(&multi_lora::expand_tc_kernel<T, 32, false, false>) ||
           is(&multi_lora::expand_tc_kernel<T, 32, false, true>) ||
           is(&multi_lora::expand_tc_kernel<T, 32, true, false>) ||
           is(&multi_lora::expand_tc_kernel<T, 32, true, true>);
  }
}

// The path a launcher reported must be the one requested (tensor cores only for 16-bit x with
// adapters of its type), and a launch it made must be of that path's kernels.
template <typename T, typename AT>
void check_path(Checker& check, const char* what, const std::string& config, bool requested, bool ran,
                long launches_before) {
  const bool want = requested && !std::is_same_v<T, float> && std::is_same_v<T, AT>;
  check.expect(ran == want, what, config, want ? "did not take the tensor cores" : "took the tensor cores");
  if (emu::launch_count() != launches_before)
    check.expect(last_launch_was_tensor_cores<T>() == want, what, config, "launched the other path's kernel");
}

// The grouping of multi_lora_segments: tokens stably sorted by adapter, base-only last.
struct Grouping {
  std::vector<int32_t> token_order, adapter_offsets, ranks;
  std::vector<int64_t> adapter;    // per token: its adapter, -1 = base only
  std::vector<int64_t> rank_used;  // per adapter: the rank clamped to [0, r_max]

  Grouping() = default;
  Grouping(const std::vector<int64_t>& ids, int64_t L, int64_t r_max, const std::vector<int64_t>* rank_list) {
    const int64_t T_ = static_cast<int64_t>(ids.size());
    std::vector<int64_t> key(T_);
    adapter.resize(T_);
    for (int64_t t = 0; t < T_; ++t) {
      const bool valid = ids[t] >= 0 && ids[t] < L;
      key[t] = valid ? ids[t] : L;
      adapter[t] = valid ? ids[t] : -1;
    }
    token_order.resize(T_);
    std::iota(token_order.begin(), token_order.end(), 0);
    std::stable_sort(token_order.begin(), token_order.end(), [&](int32_t a, int32_t b) { return key[a] < key[b]; });
    for (int64_t l = 0; l <= L; ++l)
      adapter_offsets.push_back(static_cast<int32_t>(
          std::count_if(key.begin(), key.end(), [&](int64_t k) { return k < l; })));
    for (int64_t l = 0; l < L; ++l) {
      const int64_t r = rank_list ? (*rank_list)[l] : r_max;
      if (rank_list) ranks.push_back(static_cast<int32_t>(r));
      rank_used.push_back(std::clamp<int64_t>(r, 0, r_max));
    }
  }

  MultiLoraSegmentsView view(int64_t L, int64_t r_max) const {
    MultiLoraSegmentsView v;
    v.token_order = token_order.data();
    v.adapter_offsets = adapter_offsets.data();
    v.ranks = ranks.empty() ? nullptr : ranks.data();
    v.tokens = static_cast<int64_t>(token_order.size());
    v.num_adapters = L;
    v.r_max = r_max;
    return v;
  }
};

template <typename T, typename AT = T>
void run(Checker& check, Random& rng, const Case& c) {
  const int64_t T_ = c.tokens, in = c.in, out = c.out, L = c.adapters, r_max = c.r_max, S = c.slices;
  char buf[240];
  const bool has_drop = c.options & kDropout, has_g = c.options & kGate, has_o = c.options & kOutScale;
  std::snprintf(buf, sizeof buf, "[%s%s%s T=%ld in=%ld out=%ld L=%ld r_max=%ld S=%ld ranks=%d p=%.1f g=%d o=%d]",
                type_name<T>(), std::is_same_v<T, AT> ? "" : "+f32-adapters", c.tensor_cores ? "-tc" : "", T_, in,
                out, L, r_max, S, c.per_adapter_ranks, has_drop ? 0.3 : 0.0, has_g, has_o);
  const std::string config = buf;
  const double tol = tolerance<T>();
  // ids: 10% base only (-1), 10% out of range (also base only), the rest a random adapter
  std::vector<int64_t> ids(T_);
  for (int64_t& id : ids) {
    const int64_t u = rng.integer(0, 9);
    id = u == 0 ? -1 : u == 1 ? (rng.integer(0, 1) ? L + 5 : -50) : rng.integer(0, L - 1);
  }
  // ranks: mostly in [0, r_max], some out of range (clamped); adapter 0 has the full r_max
  std::vector<int64_t> rank_list(L);
  for (int64_t& r : rank_list)
    r = rng.integer(0, 6) == 0 ? (rng.integer(0, 1) ? -3 : r_max + 9) : rng.integer(0, r_max);
  rank_list[0] = r_max;
  const Grouping grouping(ids, L, r_max, c.per_adapter_ranks ? &rank_list : nullptr);
  const MultiLoraSegmentsView seg = grouping.view(L, r_max);
  auto adapter_of = [&](int64_t t) { return grouping.adapter[t]; };
  auto rank_of = [&](int64_t l) { return grouping.rank_used[l]; };

  const auto x = rng.tensor<T>(T_ * in, 1.0);
  const auto a = rng.tensor<AT>(S * L * r_max * in, 1 / std::sqrt(double(std::max<int64_t>(in, 1))));
  const auto b = rng.tensor<AT>(L * out * r_max, 1 / std::sqrt(double(r_max)));
  std::vector<float> scales(L);
  for (float& s : scales) s = static_cast<float>(0.5 + rng.integer(0, 100) / 100.0);
  std::vector<int64_t> slice_size(S);  // uneven, some possibly empty
  int64_t remaining = out;
  for (int64_t s = 0; s < S; ++s) {
    slice_size[s] = s == S - 1 ? remaining : rng.integer(0, remaining);
    remaining -= slice_size[s];
  }
  // gains: rank_scale (L, r_max) and out_scale (L, out) in the adapters' type
  const auto g = rng.tensor<AT>(L * r_max, 1.0), o = rng.tensor<AT>(L * out, 1.0);
  const auto X = to_double(x), A = to_double(a), B = to_double(b), G = to_double(g), O = to_double(o);
  const Dropout drop(has_drop ? 0.3 : 0.0);
  auto gate = [&](int64_t l, int64_t j) { return has_g ? G[l * r_max + j] : 1.0; };
  auto out_gate = [&](int64_t l, int64_t n) { return has_o ? O[l * out + n] : 1.0; };
  std::vector<double> XD(T_ * in);  // drop(x), by global token row
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t k = 0; k < in; ++k) XD[t * in + k] = drop.apply(X[t * in + k], t, k);

  // shrink: hidden[s, t, j] = drop(x)_t · A[s, a_t, j] for j < r(a_t), zero elsewhere
  std::vector<double> H(S * T_ * r_max, 0.0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t l = adapter_of(t);
      if (l < 0) continue;
      for (int64_t j = 0; j < rank_of(l); ++j) {
        double acc = 0;
        for (int64_t k = 0; k < in; ++k) acc += XD[t * in + k] * A[((s * L + l) * r_max + j) * in + k];
        H[(s * T_ + t) * r_max + j] = acc;
      }
    }
  std::vector<float> hidden(S * T_ * r_max, 0.f);
  MultiLoraShrinkParams sp;
  sp.x = x.data(); sp.a = a.data(); sp.hidden = hidden.data(); sp.in_features = in; sp.slices = S;
  sp.use_tensor_cores = c.tensor_cores; sp.seg = seg; sp.dropout = drop.params;
  bool ran_tc = false;
  long before = emu::launch_count();
  if (multi_lora::launch_shrink<T, AT>(sp, nullptr, &ran_tc) != cudaSuccess) check.launch_failed("shrink", config);
  check_path<T, AT>(check, "shrink path", config, c.tensor_cores, ran_tc, before);
  check.compare("hidden", config, hidden, H, tol);

  // expand, from the reference hidden, into columns [1, 1 + out) of rows ldy = out + 3 apart:
  // the columns around y must come back untouched
  const std::vector<float> h_ref(H.begin(), H.end());
  const int64_t ldy = out + 3;
  auto y = rng.tensor<T>(T_ * ldy + 3, 1.0);
  std::vector<double> Y = to_double(y);
  for (int64_t s = 0, col = 0; s < S; col += slice_size[s], ++s)
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t l = adapter_of(t);
      if (l < 0) continue;
      for (int64_t n = col; n < col + slice_size[s]; ++n) {
        double acc = 0;
        for (int64_t j = 0; j < rank_of(l); ++j)
          acc += double(h_ref[(s * T_ + t) * r_max + j]) * gate(l, j) * B[(l * out + n) * r_max + j];
        Y[t * ldy + 1 + n] += scales[l] * acc * out_gate(l, n);
      }
    }
  MultiLoraExpandParams ep;
  ep.hidden = h_ref.data(); ep.b = b.data(); ep.scales = scales.data(); ep.y = y.data() + 1; ep.ldy = ldy;
  ep.out_total = out; ep.slices = S; ep.slice_start[0] = 0;
  for (int64_t s = 0; s < S; ++s) ep.slice_start[s + 1] = ep.slice_start[s] + slice_size[s];
  ep.use_tensor_cores = c.tensor_cores; ep.seg = seg;
  ep.rank_scale = has_g ? g.data() : nullptr; ep.out_scale = has_o ? o.data() : nullptr;
  before = emu::launch_count();
  if (multi_lora::launch_expand<T, AT>(ep, nullptr, &ran_tc) != cudaSuccess) check.launch_failed("expand", config);
  check_path<T, AT>(check, "expand path", config, c.tensor_cores, ran_tc, before);
  check.compare("y", config, y, Y, tol);

  // The backward kernels have no slices and no tensor-core variant (fp32-adapter cases run them).
  if (S != 1 || (c.tensor_cores && std::is_same_v<T, AT>)) return;

  // grad_out: grad_z[t, j] = Σ_n dy[t, n] o[a_t, n] B[a_t, n, j],
  //           grad_b[l, n, j] = Σ_t dy[t, n] s_l g[l, j] hidden[t, j]   (P: ∂L/∂B = o ⊙ P)
  const auto dy = rng.tensor<T>(T_ * out, 1.0);
  const auto DY = to_double(dy);
  std::vector<double> DZ(T_ * r_max, 0.0), GB(L * out * r_max, 0.0);
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t l = adapter_of(t);
    if (l < 0) continue;
    for (int64_t j = 0; j < rank_of(l); ++j) {
      double acc = 0;
      for (int64_t n = 0; n < out; ++n) {
        acc += DY[t * out + n] * out_gate(l, n) * B[(l * out + n) * r_max + j];
        GB[(l * out + n) * r_max + j] += scales[l] * gate(l, j) * DY[t * out + n] * double(h_ref[t * r_max + j]);
      }
      DZ[t * r_max + j] = acc;
    }
  }
  std::vector<float> grad_z(T_ * r_max, 0.f), grad_b(L * out * r_max, 0.f);
  MultiLoraGradOutParams gp;
  gp.grad_out = dy.data(); gp.hidden = h_ref.data(); gp.b = b.data(); gp.scales = scales.data();
  gp.grad_z = grad_z.data(); gp.grad_b = grad_b.data(); gp.out_features = out; gp.seg = seg;
  gp.rank_scale = ep.rank_scale; gp.out_scale = ep.out_scale;
  if (multi_lora::launch_grad_out<T, AT>(gp, nullptr) != cudaSuccess) check.launch_failed("grad_out", config);
  check.compare("grad_z", config, grad_z, DZ, tol);
  check.compare("grad_b", config, grad_b, GB, tol);

  // grad_in with du = s · g ⊙ grad_z (reference): grad_x[t] += drop'(du_t A[a_t]),
  // grad_a[l] += du_tᵀ drop(x)_t
  std::vector<float> du(T_ * r_max);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t j = 0; j < r_max; ++j) {
      const int64_t l = adapter_of(t);
      du[t * r_max + j] = l >= 0 ? float(DZ[t * r_max + j] * scales[l] * gate(l, j)) : 0.f;
    }
  auto dx = rng.tensor<T>(T_ * in, 1.0);
  std::vector<double> DX = to_double(dx), GA(L * r_max * in, 0.0);
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t l = adapter_of(t);
    if (l < 0) continue;
    for (int64_t k = 0; k < in; ++k) {
      double acc = 0;
      for (int64_t j = 0; j < rank_of(l); ++j) {
        acc += double(du[t * r_max + j]) * A[(l * r_max + j) * in + k];
        GA[(l * r_max + j) * in + k] += double(du[t * r_max + j]) * XD[t * in + k];
      }
      DX[t * in + k] += drop.apply(acc, t, k);
    }
  }
  std::vector<float> grad_a(L * r_max * in, 0.f);
  MultiLoraGradInParams ip;
  ip.x = x.data(); ip.a = a.data(); ip.grad_u = du.data(); ip.grad_x = dx.data(); ip.grad_a = grad_a.data();
  ip.in_features = in; ip.seg = seg; ip.dropout = drop.params;
  if (multi_lora::launch_grad_in<T, AT>(ip, nullptr) != cudaSuccess) check.launch_failed("grad_in", config);
  check.compare("grad_x", config, dx, DX, tol);
  check.compare("grad_a", config, grad_a, GA, tol);
}

// Malformed grouping metadata (offsets, order and ranks out of range, unsorted): the kernels
// must stay in bounds and not hang. Nothing to compare; an out-of-bounds access shows under
// a sanitizer build (LRK_EMU_SANITIZE=ON), a divergent barrier or bad launch aborts here.
template <typename T>
void run_malformed(Random& rng, bool tensor_cores) {
  const int64_t T_ = rng.integer(1, 80), in = rng.integer(1, 100), out = rng.integer(1, 70), L = rng.integer(1, 5),
                r_max = rng.integer(1, 40);
  Grouping g;
  for (int64_t i = 0; i < T_; ++i) g.token_order.push_back(static_cast<int32_t>(rng.integer(-3, T_ + 3)));
  for (int64_t l = 0; l <= L; ++l) g.adapter_offsets.push_back(static_cast<int32_t>(rng.integer(-5, T_ + 5)));
  for (int64_t l = 0; l < L; ++l) g.ranks.push_back(static_cast<int32_t>(rng.integer(-5, r_max + 5)));
  const MultiLoraSegmentsView seg = g.view(L, r_max);
  const auto x = rng.tensor<T>(T_ * in, 1.0), a = rng.tensor<T>(L * r_max * in, 1.0),
             b = rng.tensor<T>(L * out * r_max, 1.0), dy = rng.tensor<T>(T_ * out, 1.0);
  auto y = rng.tensor<T>(T_ * out, 1.0), dx = rng.tensor<T>(T_ * in, 1.0);
  std::vector<float> hidden(T_ * r_max, 0.f), scales(L, 1.f), grad_z(T_ * r_max, 0.f), grad_b(L * out * r_max, 0.f),
      grad_a(L * r_max * in, 0.f);
  // every option on: the gains are indexed by the (checked) adapter and rank, the mask by token
  const auto gain = rng.tensor<T>(L * r_max, 1.0), o = rng.tensor<T>(L * out, 1.0);
  const Dropout drop(0.25);
  MultiLoraShrinkParams sp;
  sp.x = x.data(); sp.a = a.data(); sp.hidden = hidden.data(); sp.in_features = in; sp.seg = seg;
  sp.use_tensor_cores = tensor_cores; sp.dropout = drop.params;
  multi_lora::launch_shrink<T>(sp, nullptr);
  MultiLoraExpandParams ep;
  ep.hidden = hidden.data(); ep.b = b.data(); ep.scales = scales.data(); ep.y = y.data(); ep.ldy = out;
  ep.out_total = out; ep.slices = 1; ep.slice_start[1] = out; ep.seg = seg; ep.use_tensor_cores = tensor_cores;
  ep.rank_scale = gain.data(); ep.out_scale = o.data();
  multi_lora::launch_expand<T>(ep, nullptr);
  MultiLoraGradOutParams gp;
  gp.grad_out = dy.data(); gp.hidden = hidden.data(); gp.b = b.data(); gp.scales = scales.data();
  gp.grad_z = grad_z.data(); gp.grad_b = grad_b.data(); gp.out_features = out; gp.seg = seg;
  gp.rank_scale = gain.data(); gp.out_scale = o.data();
  multi_lora::launch_grad_out<T>(gp, nullptr);
  MultiLoraGradInParams ip;
  ip.x = x.data(); ip.a = a.data(); ip.grad_u = grad_z.data(); ip.grad_x = dx.data(); ip.grad_a = grad_a.data();
  ip.in_features = in; ip.seg = seg; ip.dropout = drop.params;
  multi_lora::launch_grad_in<T>(ip, nullptr);
}

// Each shape with and without per-adapter ranks, in fp32 and fp16/bf16 (SIMT), fp16 and bf16
// on the tensor-core path, and fp16/bf16 x with fp32 adapters (SIMT, though tensor cores are
// requested); then the options: all three on in fp32 SIMT and on the tensor cores, and one or
// two of them (rotating) on a 16-bit SIMT and an fp32-adapter case.
std::vector<Case> expand_shapes(const std::vector<std::array<int64_t, 6>>& shapes) {
  std::vector<Case> cases;
  int n = 0;
  for (const auto& [T_, in, out, L, r_max, S] : shapes)
    for (bool ranks : {false, true}) {
      const int all = kDropout | kGate | kOutScale, v = n++ % 3;
      const int some = v == 0 ? kDropout | kGate : v == 1 ? kOutScale | kDropout : kGate | kOutScale;
      cases.push_back({DType::f32, false, T_, in, out, L, r_max, S, ranks});
      cases.push_back({ranks ? DType::bf16 : DType::f16, false, T_, in, out, L, r_max, S, ranks});
      cases.push_back({DType::f16, true, T_, in, out, L, r_max, S, ranks});
      cases.push_back({DType::bf16, true, T_, in, out, L, r_max, S, ranks});
      // fp32 adapters on a 16-bit x, tensor cores requested: the launchers must take SIMT
      cases.push_back({ranks ? DType::f16 : DType::bf16, true, T_, in, out, L, r_max, S, ranks, true});
      cases.push_back({DType::f32, false, T_, in, out, L, r_max, S, ranks, false, all});
      cases.push_back({ranks ? DType::f16 : DType::bf16, true, T_, in, out, L, r_max, S, ranks, false, all});
      cases.push_back({ranks ? DType::bf16 : DType::f16, false, T_, in, out, L, r_max, S, ranks, false, some});
      cases.push_back({ranks ? DType::bf16 : DType::f16, true, T_, in, out, L, r_max, S, ranks, true, some});
    }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("multi_lora", argc, argv);
  // (T, in, out, L, r_max, S). Tails of every tile (tokens 16/32/64 per block, features 64
  // and 128), ranks 1, odd, 16, over a chunk (33, 40, 100); several slices; T = 0; prefill
  // sizes (>= 64 tokens on an adapter) for the tensor-core tiles.
  const std::vector<Case> quick = expand_shapes({{7, 13, 17, 3, 5, 1},
                                                 {0, 16, 8, 3, 4, 1},
                                                 {1, 1, 1, 1, 1, 1},
                                                 {50, 64, 65, 4, 16, 1},
                                                 {33, 100, 48, 5, 19, 1},
                                                 {70, 96, 128, 5, 16, 3},
                                                 {130, 96, 80, 2, 40, 1},
                                                 {90, 40, 70, 3, 8, 2},
                                                 {20, 30, 20, 2, 100, 1},
                                                 {200, 70, 66, 3, 33, 1},
                                                 {64, 200, 72, 2, 64, 2},
                                                 {40, 20, 24, 2, 256, 1}});
  const std::vector<Case> extra = expand_shapes({{130, 50, 40, 2, 256, 1},
                                                 {150, 300, 130, 4, 100, 1},
                                                 {300, 128, 192, 6, 48, 4}});
  Random rng(99);
  for (const Case& c : check.select(quick, extra, 18)) {
    switch (c.dtype) {
      case DType::f32: run<float>(check, rng, c); break;
      case DType::f16: c.fp32_adapters ? run<half, float>(check, rng, c) : run<half>(check, rng, c); break;
      case DType::bf16: c.fp32_adapters ? run<bf16, float>(check, rng, c) : run<bf16>(check, rng, c); break;
    }
  }
  if (!check.negative_control()) {
    for (int i = 0; i < (check.full() ? 12 : 3); ++i) {
      run_malformed<float>(rng, false);
      run_malformed<half>(rng, true);
    }
  }
  return check.finish();
}
